"""summarise_allocations: a table of what Nomad reports and the step outcome it means."""

from __future__ import annotations

from typing import Any

import pytest

from nomad_pipeline.reconcilers.outcomes import (
    StepOutcome,
    placement_failure,
    summarise_allocations,
)


def job(status: str = "dead", version: int = 0, stop: bool = False) -> dict[str, Any]:
    return {"ID": "r1-build", "Status": status, "Version": version, "Stop": stop}


def terminated(code: int) -> dict[str, Any]:
    return {
        "Type": "Terminated",
        "DisplayMessage": f"Exit Code: {code}",
        "Details": {"exit_code": str(code)},
    }


def alloc(
    alloc_id: str = "a1",
    client: str = "complete",
    desired: str = "run",
    version: int = 0,
    exit_code: int | None = 0,
    failed: bool = False,
    next_alloc: str = "",
    followup: str = "",
    create_index: int = 10,
) -> dict[str, Any]:
    events: list[dict[str, Any]] = [{"Type": "Started", "DisplayMessage": "Task started"}]
    if exit_code is not None:
        events.append(terminated(exit_code))
    if failed:
        events.append({"Type": "Not Restarting", "DisplayMessage": "Policy allows no restarts"})
    return {
        "ID": alloc_id,
        "JobVersion": version,
        "ClientStatus": client,
        "ClientDescription": "",
        "DesiredStatus": desired,
        "DesiredDescription": "alloc not needed due to job update" if desired == "stop" else "",
        "NextAllocation": next_alloc,
        "FollowupEvalID": followup,
        "CreateIndex": create_index,
        "TaskStates": {"main": {"State": "dead", "Failed": failed, "Events": events}},
    }


MISSING_DRIVER_EVAL = {
    "Status": "complete",
    "BlockedEval": "b1",
    "FailedTGAllocs": {
        "step": {
            "NodesEvaluated": 1,
            "NodesFiltered": 1,
            "NodesAvailable": {"dc1": 1},
            "ConstraintFiltered": {"missing drivers": 1},
        }
    },
}

CASES: list[
    tuple[str, list[dict[str, Any]], dict[str, Any], dict[str, Any] | None, StepOutcome]
] = [
    (
        "no allocation yet",
        [],
        job("pending"),
        {"Status": "complete", "FailedTGAllocs": None},
        StepOutcome("pending", "waiting for Nomad to place the job"),
    ),
    (
        "success",
        [alloc()],
        job(),
        None,
        StepOutcome("success", exit_code=0, alloc_id="a1"),
    ),
    (
        "running",
        [alloc(client="running", exit_code=None)],
        job("running"),
        None,
        StepOutcome("running", alloc_id="a1"),
    ),
    (
        "complete but the job status has not caught up",
        [alloc()],
        job("running"),
        None,
        StepOutcome("running", alloc_id="a1"),
    ),
    (
        "failed with exit code",
        [alloc(client="failed", exit_code=3, failed=True)],
        job(),
        None,
        StepOutcome(
            "failed",
            "task 'main' failed: Exit Code: 3; Policy allows no restarts",
            exit_code=3,
            alloc_id="a1",
        ),
    ),
    (
        "failed, reschedule pending: not final",
        [alloc(client="failed", exit_code=1, failed=True, followup="e2")],
        job("pending"),
        None,
        StepOutcome("running", alloc_id="a1"),
    ),
    (
        "failed then replaced by a success",
        [
            alloc("a1", client="failed", exit_code=1, failed=True, next_alloc="a2"),
            alloc("a2", create_index=20),
        ],
        job(),
        None,
        StepOutcome("success", exit_code=0, alloc_id="a2"),
    ),
    (
        "allocations of an older version are ignored",
        [alloc("old", client="failed", exit_code=1, failed=True), alloc("new", version=1)],
        job(version=1),
        None,
        StepOutcome("success", exit_code=0, alloc_id="new"),
    ),
    (
        "stopped job is cancelled",
        [alloc(desired="stop", exit_code=143)],
        job(version=1, stop=True),
        None,
        StepOutcome("cancelled", "the Nomad job was stopped"),
    ),
    (
        "allocation stopped without a replacement",
        [alloc(desired="stop", exit_code=143)],
        job(),
        None,
        StepOutcome(
            "cancelled",
            "allocation stopped: alloc not needed due to job update",
            alloc_id="a1",
        ),
    ),
    (
        "lost allocation",
        [alloc(client="lost", exit_code=None)],
        job(),
        None,
        StepOutcome("failed", "allocation lost: node down", alloc_id="a1"),
    ),
    (
        "missing driver",
        [],
        job("pending"),
        MISSING_DRIVER_EVAL,
        StepOutcome(
            "failed",
            "placement failed for group 'step': missing drivers (1 of 1 nodes filtered)",
        ),
    ),
]


@pytest.mark.parametrize(
    ("allocations", "nomad_job", "evaluation", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_summarise_allocations(
    allocations: list[dict[str, Any]],
    nomad_job: dict[str, Any],
    evaluation: dict[str, Any] | None,
    expected: StepOutcome,
) -> None:
    assert summarise_allocations(allocations, nomad_job, evaluation) == expected


def test_placement_failure_names_exhausted_dimensions() -> None:
    evaluation = {
        "FailedTGAllocs": {
            "step": {"NodesEvaluated": 1, "NodesExhausted": 1, "DimensionExhausted": {"memory": 1}}
        }
    }
    assert placement_failure(evaluation) == (
        "placement failed for group 'step': memory exhausted (1 nodes)"
    )


def test_placed_evaluation_is_no_failure() -> None:
    assert placement_failure({"Status": "complete", "FailedTGAllocs": None}) is None
    assert placement_failure(None) is None
