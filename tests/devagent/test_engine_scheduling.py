"""Engine: dispatch, allocation stop, rescheduling, events and restarts over persisted state."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from engine_support import (
    SECOND,
    allocs,
    batch_job,
    eval_complete,
    job,
    job_dead,
    running_engine,
    shell_task,
    wait_until,
)

from nomad_pipeline.devagent.state import NomadHTTPError


def parameterized(job_id: str, **parameters: object) -> dict[str, object]:
    task = shell_task(
        'cat local/input.json > $NOMAD_ALLOC_DIR/data/out; echo " $NOMAD_META_run" >> '
        "$NOMAD_ALLOC_DIR/data/out",
        DispatchPayload={"File": "input.json"},
    )
    spec = batch_job(job_id, tasks=[task], Meta={"run": "default", "fixed": "f"})
    spec["ParameterizedJob"] = {"Payload": "optional", "MetaOptional": ["run"], **parameters}
    return spec


async def test_dispatch_creates_a_child_with_payload_and_merged_meta(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        reply = await engine.register_job("default", parameterized("tmpl"))
        assert reply["EvalID"] == "" and reply["EvalCreateIndex"] == 0
        assert job(engine, "tmpl")["Status"] == "running"
        dispatched = await engine.dispatch_job(
            "default", "tmpl", payload=b'{"x": 1}', meta={"run": "r7"}, idempotency_token="tok"
        )
        child_id = dispatched["DispatchedJobID"]
        prefix, _, suffix = child_id.partition("/dispatch-")
        unix, _, hex8 = suffix.partition("-")
        assert prefix == "tmpl" and unix.isdigit() and len(hex8) == 8
        assert dispatched["EvalID"] and dispatched["JobCreateIndex"] > 0
        child = job(engine, child_id)
        assert child["ParentID"] == "tmpl" and child["Dispatched"]
        assert child["Name"] == child_id and child["ParameterizedJob"] is None
        assert child["Meta"] == {"run": "r7", "fixed": "f"}
        assert base64.b64decode(child["Payload"]) == b'{"x": 1}'
        await wait_until(engine, lambda: job_dead(engine, child_id))
        [alloc] = allocs(engine, child_id)
        assert alloc["ClientStatus"] == "complete", alloc["TaskStates"]
        out = engine.alloc_dir(alloc["ID"]) / "alloc" / "data" / "out"
        assert out.read_text() == '{"x": 1} r7\n'
        again = await engine.dispatch_job(
            "default", "tmpl", payload=b"{}", meta={}, idempotency_token="tok"
        )
        assert again["DispatchedJobID"] == child_id
        summary = engine.job_summary("default", "tmpl")
        assert summary["Children"] == {"Pending": 0, "Running": 0, "Dead": 1}
        templated = await engine.dispatch_job(
            "default", "tmpl", payload=None, meta={}, id_prefix_template="nightly"
        )
        assert templated["DispatchedJobID"].startswith("tmpl/dispatch-nightly-")


@pytest.mark.parametrize(
    ("parameters", "payload", "meta", "message"),
    [
        (
            {"Payload": "required"},
            None,
            {},
            "Payload is not provided but required by parameterized job",
        ),
        ({"Payload": "forbidden"}, b"x", {}, "Payload provided but forbidden by parameterized job"),
        ({}, b"x" * 16385, {}, "Payload exceeds maximum size; 16385 > 16384"),
        (
            {},
            None,
            {"b": "1", "a": "2"},
            "Dispatch request included unpermitted metadata keys: [a b]",
        ),
        (
            {"MetaRequired": ["need", "also"]},
            None,
            {},
            "Dispatch did not provide required meta keys: [also need]",
        ),
    ],
)
async def test_dispatch_errors_are_nomads(
    tmp_path: Path,
    parameters: dict[str, object],
    payload: bytes | None,
    meta: dict[str, str],
    message: str,
) -> None:
    async with running_engine(tmp_path) as engine:
        await engine.register_job("default", parameterized("p", **parameters))
        with pytest.raises(NomadHTTPError) as caught:
            await engine.dispatch_job("default", "p", payload=payload, meta=meta)
        assert (caught.value.status, caught.value.text) == (500, message)


async def test_dispatch_of_unknown_plain_or_stopped_jobs(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        with pytest.raises(NomadHTTPError, match=r"^parameterized job not found$"):
            await engine.dispatch_job("default", "none", payload=None, meta={})
        await engine.register_job("default", batch_job("plain"))
        with pytest.raises(NomadHTTPError, match='Specified job "plain" is not a parameterized'):
            await engine.dispatch_job("default", "plain", payload=None, meta={})
        await engine.register_job("default", parameterized("p"))
        await engine.deregister_job("default", "p", purge=False)
        assert job(engine, "p")["Status"] == "dead"
        with pytest.raises(NomadHTTPError, match='Specified job "p" is stopped'):
            await engine.dispatch_job("default", "p", payload=None, meta={})


async def test_stop_allocation_places_a_replacement(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        await engine.register_job("default", batch_job("svc", "exec sleep 30"))
        first = await wait_until(
            engine,
            lambda: (a := allocs(engine, "svc")) and a[0]["ClientStatus"] == "running" and a[0],
        )
        reply = await engine.stop_allocation(first["ID"])
        assert reply["EvalID"] and reply["Index"] > first["ModifyIndex"]
        replacement = await wait_until(
            engine,
            lambda: (
                (a := allocs(engine, "svc"))
                and len(a) == 2
                and a[1]["ClientStatus"] == "running"
                and a[1]
            ),
        )
        old = engine.state.get("allocs", first["ID"])
        assert old is not None
        assert old["DesiredStatus"] == "stop" and old["NextAllocation"] == replacement["ID"]
        assert replacement["PreviousAllocation"] == first["ID"]
        assert replacement["Name"] == first["Name"]
        with pytest.raises(NomadHTTPError) as caught:
            await engine.stop_allocation("00000000-0000-0000-0000-000000000000")
        assert (caught.value.status, caught.value.text) == (404, "alloc not found")
        await engine.deregister_job("default", "svc", purge=False)
        await wait_until(
            engine, lambda: all(a["ClientStatus"] == "complete" for a in allocs(engine, "svc"))
        )


async def test_reschedule_creates_a_follow_up_allocation_after_the_delay(tmp_path: Path) -> None:
    reschedule = {
        "Attempts": 1,
        "Interval": 3600 * SECOND,
        "Delay": 5 * SECOND,
        "DelayFunction": "constant",
        "Unlimited": False,
    }
    async with running_engine(tmp_path) as engine:
        await engine.register_job("default", batch_job("again", "exit 1", reschedule=reschedule))
        first = await wait_until(
            engine,
            lambda: (a := allocs(engine, "again")) and a[0]["FollowupEvalID"] and a[0],
        )
        followup = engine.state.get("evals", first["FollowupEvalID"])
        assert followup is not None
        assert followup["TriggeredBy"] == "alloc-failure" and followup["Status"] == "pending"
        assert followup["WaitUntil"] != "0001-01-01T00:00:00Z"
        assert job(engine, "again")["Status"] == "pending"
        await wait_until(engine, lambda: job_dead(engine, "again"), timeout=20)
        old, new = allocs(engine, "again")
        assert old["ID"] == first["ID"]
        assert old["NextAllocation"] == new["ID"] and new["PreviousAllocation"] == old["ID"]
        assert old["DesiredStatus"] == "stop"
        assert old["DesiredDescription"] == "alloc was rescheduled because it failed"
        [event] = new["RescheduleTracker"]["Events"]
        assert event["PrevAllocID"] == old["ID"] and event["Delay"] == 5 * SECOND
        assert new["ClientStatus"] == "failed" and new["NextAllocation"] == ""
        assert new["FollowupEvalID"] == ""


async def test_events_are_emitted_for_jobs_evals_and_allocations(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        start = engine.state.index
        await engine.register_job("default", batch_job("ev"))
        await wait_until(engine, lambda: job_dead(engine, "ev"))
        seen: list[tuple[str, str]] = []
        stream = engine.state.subscribe(start)
        async for batch in stream:
            for event in batch.events:
                seen.append((event["Topic"], event["Type"]))
                if event["Topic"] == "Allocation":
                    assert "Job" not in event["Payload"]["Allocation"]
                    assert event["FilterKeys"] == ["ev", ""]
            if batch.index >= engine.state.index:
                break
        await stream.aclose()
        assert ("Job", "JobRegistered") in seen
        assert ("Evaluation", "JobRegistered") in seen
        assert ("Allocation", "PlanResult") in seen
        assert ("Evaluation", "EvaluationUpdated") in seen
        assert ("Allocation", "AllocationUpdated") in seen
        assert ("Job", "AllocationUpdated") in seen


async def test_restart_over_the_same_data_marks_running_allocations_lost(tmp_path: Path) -> None:
    async with running_engine(tmp_path, persist=True) as engine:
        await engine.register_job("default", batch_job("done", "exit 0"))
        await wait_until(engine, lambda: job_dead(engine, "done"))
        await engine.register_job("default", batch_job("busy", "exec sleep 30"))
        running = await wait_until(
            engine,
            lambda: (a := allocs(engine, "busy")) and a[0]["ClientStatus"] == "running" and a[0],
        )
        node_id = engine.node["ID"]
    async with running_engine(tmp_path, persist=True) as engine:
        assert engine.node["ID"] == node_id
        lost = engine.state.get("allocs", running["ID"])
        assert lost is not None
        assert lost["ClientStatus"] == "lost"
        state = lost["TaskStates"]["main"]
        assert state["State"] == "dead" and state["Failed"]
        assert state["Events"][-1]["Type"] == "Failed Restoring Task"
        await wait_until(engine, lambda: job_dead(engine, "busy"))
        [done] = allocs(engine, "done")
        assert done["ClientStatus"] == "complete"
        assert job(engine, "done")["Status"] == "dead"
        json.dumps(lost)


async def test_evaluate_with_force_reschedule_replaces_a_final_failure(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        await engine.register_job("default", batch_job("forced", "exit 1"))
        await wait_until(engine, lambda: job_dead(engine, "forced"))
        [failed] = allocs(engine, "forced")
        plain = await engine.evaluate_job("default", "forced")
        await wait_until(engine, lambda: eval_complete(engine, plain["EvalID"]))
        assert len(allocs(engine, "forced")) == 1  # no budget left: nothing to do
        await engine.evaluate_job("default", "forced", force_reschedule=True)
        await wait_until(
            engine, lambda: len(allocs(engine, "forced")) == 2 and job_dead(engine, "forced")
        )
        old, new = allocs(engine, "forced")
        assert old["ID"] == failed["ID"] and old["NextAllocation"] == new["ID"]
        assert new["PreviousAllocation"] == old["ID"]
        with pytest.raises(NomadHTTPError) as caught:
            await engine.evaluate_job("default", "unknown")
        assert (caught.value.status, caught.value.text) == (404, "job not found")


async def test_periodic_job_launches_children_at_cron_times(tmp_path: Path) -> None:
    spec = batch_job("tick", "exit 0")
    spec["Periodic"] = {"Spec": "* * * * * *", "ProhibitOverlap": True}  # every second
    async with running_engine(tmp_path) as engine:
        reply = await engine.register_job("default", spec)
        assert reply["EvalID"] == ""
        parent = job(engine, "tick")
        assert parent["Status"] == "running"
        assert parent["Periodic"]["SpecType"] == "cron" and parent["Periodic"]["Enabled"]
        child = await wait_until(
            engine,
            lambda: next(
                (
                    j
                    for j in engine.state.rows("jobs")
                    if j.get("ParentID") == "tick" and j["Status"] == "dead"
                ),
                None,
            ),
            timeout=10,
        )
        prefix, _, unix = child["ID"].partition("/periodic-")
        assert prefix == "tick" and unix.isdigit()
        assert child["Periodic"] is None and child["Name"] == child["ID"]
        [evaluation] = engine.job_evaluations("default", child["ID"])
        assert evaluation["TriggeredBy"] == "periodic-job"
        [alloc] = allocs(engine, child["ID"])
        assert alloc["ClientStatus"] == "complete"
        await engine.deregister_job("default", "tick", purge=False)
        assert job(engine, "tick")["Status"] == "dead"


async def test_invalid_periodic_spec_is_rejected(tmp_path: Path) -> None:
    spec = batch_job("badcron")
    spec["Periodic"] = {"Spec": "not a cron"}
    async with running_engine(tmp_path) as engine:
        with pytest.raises(NomadHTTPError, match="Invalid cron spec 'not a cron'"):
            await engine.register_job("default", spec)
