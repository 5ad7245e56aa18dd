"""plan(): tables of flows, step states and the decisions they lead to."""

from __future__ import annotations

import pytest

from nomad_pipeline.reconcilers.planning import (
    Plan,
    PlanStep,
    StepState,
    plan,
    predecessors,
)
from nomad_pipeline.resources.expressions import evaluation_context

SEQUENTIAL = [
    PlanStep("build"),
    PlanStep("test"),
    PlanStep("notify_failure", condition='steps.build.status == "failed"'),
    PlanStep("publish"),
]

DAG = [
    PlanStep("checkout"),
    PlanStep("lint", needs=("checkout",)),
    PlanStep("unit", needs=("checkout",)),
    PlanStep("package", needs=("lint", "unit")),
    PlanStep("on_failure", needs=("package",), condition='steps.unit.status == "failed"'),
    PlanStep("independent"),
]


def states(**phases: str) -> dict[str, StepState]:
    return {name: StepState(phase) for name, phase in phases.items()}  # type: ignore[arg-type]


CONTEXT = evaluation_context(variables={"env": "prod", "trigger.branch": "main"}, run={"id": "r1"})

CASES: list[tuple[str, list[PlanStep], dict[str, StepState], Plan]] = [
    (
        "sequential: first step starts",
        SEQUENTIAL,
        {},
        Plan(start=["build"], phase="running"),
    ),
    (
        "sequential: waits for the running step",
        SEQUENTIAL,
        states(build="running"),
        Plan(phase="running"),
    ),
    (
        "sequential: success moves on; the failure handler's condition is false",
        SEQUENTIAL,
        states(build="success", test="success"),
        Plan(
            start=["publish"],
            skip={"notify_failure": "condition 'steps.build.status == \"failed\"' is false"},
            phase="running",
        ),
    ),
    (
        "sequential: a failure skips what follows but runs the handler",
        SEQUENTIAL,
        states(build="failed"),
        Plan(
            start=["notify_failure"],
            skip={
                "test": "a step it depends on did not succeed",
                "publish": "a step it depends on did not succeed",
            },
            phase="running",
        ),
    ),
    (
        "sequential: handler done, run failed",
        SEQUENTIAL,
        states(build="failed", test="skipped", notify_failure="success", publish="skipped"),
        Plan(phase="failed"),
    ),
    (
        "all succeeded or skipped: success",
        SEQUENTIAL,
        states(build="success", test="success", notify_failure="skipped", publish="success"),
        Plan(phase="success"),
    ),
    (
        "a cancelled step makes the run cancelled",
        SEQUENTIAL,
        states(build="cancelled", test="skipped", notify_failure="skipped", publish="skipped"),
        Plan(phase="cancelled"),
    ),
    (
        "dag: roots start in parallel",
        DAG,
        {},
        Plan(start=["checkout", "independent"], phase="running"),
    ),
    (
        "dag: independent branches run in parallel",
        DAG,
        states(checkout="success", independent="running"),
        Plan(start=["lint", "unit"], phase="running"),
    ),
    (
        "dag: a failed branch skips its dependents, the handler waits for them",
        DAG,
        states(checkout="success", lint="running", unit="failed", independent="success"),
        Plan(skip={"package": "a step it depends on did not succeed"}, phase="running"),
    ),
    (
        "dag: the handler runs once everything before it is terminal",
        DAG,
        states(checkout="success", lint="success", unit="failed", independent="success"),
        Plan(
            start=["on_failure"],
            skip={"package": "a step it depends on did not succeed"},
            phase="running",
        ),
    ),
    (
        "conditions read variables and the seed's spellings",
        [
            PlanStep("a"),
            PlanStep("b", condition='var.env == "prod" && trigger.branch == "main"'),
            PlanStep("c", condition='specifications.a.status == "success"'),
            PlanStep("d", condition='inline.steps.b.status == "skipped"'),
        ],
        states(a="success"),
        Plan(start=["b"], phase="running"),
    ),
    (
        "a condition that cannot be evaluated fails its step",
        [PlanStep("a", condition="var.env < 3")],
        {},
        Plan(
            fail={"a": "condition 'var.env < 3' failed: cannot compare a string with a number"},
            phase="failed",
        ),
    ),
]


@pytest.mark.parametrize(
    ("steps", "step_states", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_plan(steps: list[PlanStep], step_states: dict[str, StepState], expected: Plan) -> None:
    decided = plan(steps, step_states, CONTEXT)
    if expected.fail:
        assert decided.fail.keys() == expected.fail.keys()
        assert decided.phase == expected.phase
        return
    assert decided == expected


def test_predecessors_are_transitive() -> None:
    found = predecessors(DAG)
    assert found["package"] == {"checkout", "lint", "unit"}
    assert found["independent"] == frozenset()


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([PlanStep("a", needs=("b",)), PlanStep("b", needs=("a",))], "cycle"),
        ([PlanStep("a", needs=("ghost",))], "unknown step 'ghost'"),
    ],
)
def test_bad_needs(steps: list[PlanStep], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        predecessors(steps)
