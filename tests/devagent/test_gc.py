"""Garbage collection in the dev agent: server GC (timed and forced), client GC, persistence."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from devagent_http_support import (
    Api,
    api_client,
    batch_job,
    eventually,
    job_allocations,
    running_agent,
    wait_job_status,
)

from nomad_pipeline.devagent.gc import GCConfig, alloc_gc_eligible, job_gcable
from nomad_pipeline.devagent.server import build_parser, config_from_args

HOUR_NS = 3600 * 1_000_000_000


class MovableClock:
    """The wall clock, or a fixed time a test sets (nanoseconds, as the records' times)."""

    def __init__(self) -> None:
        self.fixed: int | None = None

    def __call__(self) -> int:
        return time.time_ns() if self.fixed is None else self.fixed


async def run_to_status(api: Api, job: dict[str, Any], status: str) -> dict[str, Any]:
    await api.ok("PUT", "/v1/jobs", json_body={"Job": job})
    body: dict[str, Any] = await wait_job_status(api, job["ID"], status)
    return body


async def evaluations(api: Api, job_id: str) -> list[dict[str, Any]]:
    evals: list[dict[str, Any]] = await api.ok("GET", f"/v1/job/{job_id}/evaluations")
    return evals


async def status_of(api: Api, path: str) -> int:
    status, _, _ = await api.get(path)
    return status


async def read_events_until(
    response: aiohttp.ClientResponse, wanted: tuple[str, str], timeout: float = 20.0
) -> dict[str, Any]:
    """The first event of (Type, Key) ``wanted`` on an open event stream."""
    async with asyncio.timeout(timeout):
        while True:
            line = await response.content.readline()
            assert line, "the event stream ended"
            batch = json.loads(line)
            for event in batch.get("Events") or []:
                if (event["Type"], event["Key"]) == wanted:
                    return dict(event)


async def test_timed_server_gc_purges_old_dead_jobs_only(tmp_path: Path) -> None:
    clock = MovableClock()
    config = GCConfig(job_gc_interval=0.05)
    async with (
        running_agent(gc=config, gc_clock=clock) as agent,
        api_client(agent) as api,
    ):
        await run_to_status(api, batch_job("old", "echo old"), "dead")
        (old_alloc,) = await job_allocations(api, "old")
        old_evals = await evaluations(api, "old")
        boundary = time.time_ns()
        await run_to_status(api, batch_job("young", "echo young"), "dead")
        await run_to_status(api, batch_job("busy", "sleep 60"), "running")
        (busy_alloc,) = await job_allocations(api, "busy")

        stream = await api.session.get(api.address + "/v1/event/stream", params={"topic": "Job"})
        async with stream:
            # "old" ended before the boundary, "young" after it: four hours on, only "old" has
            # been dead for the whole job_gc_threshold (and the eval thresholds are all past).
            clock.fixed = boundary + 4 * HOUR_NS
            event = await read_events_until(stream, ("JobBatchDeregistered", "old"))
        assert event["Topic"] == "Job"
        assert event["Payload"]["Job"]["ID"] == "old"
        assert await status_of(api, "/v1/job/old") == 404
        assert await status_of(api, f"/v1/allocation/{old_alloc['ID']}") == 404
        for evaluation in old_evals:
            assert await status_of(api, f"/v1/evaluation/{evaluation['ID']}") == 404

        young = await api.ok("GET", "/v1/job/young")
        assert young["Status"] == "dead"
        assert len(await job_allocations(api, "young")) == 1
        # The younger job's most recent evaluation stays whatever its age.
        assert len(await evaluations(api, "young")) == 1
        busy = await api.ok("GET", f"/v1/allocation/{busy_alloc['ID']}")
        assert busy["ClientStatus"] == "running"
        assert (await api.ok("GET", "/v1/job/busy"))["Status"] == "running"


async def test_old_evaluations_go_but_the_latest_stays(tmp_path: Path) -> None:
    clock = MovableClock()
    # A job threshold no test reaches: only evaluation GC acts.
    config = GCConfig(job_gc_threshold=1000 * 3600.0)
    async with running_agent(gc=config, gc_clock=clock) as agent, api_client(agent) as api:
        await run_to_status(api, batch_job("stopped", "echo done"), "dead")
        (alloc,) = await job_allocations(api, "stopped")
        (register_eval,) = await evaluations(api, "stopped")
        await api.ok("DELETE", "/v1/job/stopped")
        await wait_job_status(api, "stopped", "dead")

        async def deregister_done() -> dict[str, Any] | None:
            evals = await evaluations(api, "stopped")
            latest = max(evals, key=lambda e: e["CreateIndex"])
            return latest if len(evals) == 2 and latest["Status"] == "complete" else None

        deregister_eval = await eventually(deregister_done)

        # An hour on: batch evaluations wait for batch_eval_gc_threshold (24h).
        clock.fixed = time.time_ns() + 2 * HOUR_NS
        reaped = await agent.garbage_collector.collect_server(force=False)
        assert not reaped
        clock.fixed = time.time_ns() + 25 * HOUR_NS
        reaped = await agent.garbage_collector.collect_server(force=False)
        assert reaped.jobs == []
        assert reaped.evals == [register_eval["ID"]]
        assert reaped.allocs == [alloc["ID"]]
        assert await status_of(api, f"/v1/evaluation/{register_eval['ID']}") == 404
        assert await status_of(api, f"/v1/allocation/{alloc['ID']}") == 404
        kept = await api.ok("GET", f"/v1/evaluation/{deregister_eval['ID']}")
        assert kept["JobID"] == "stopped"
        assert (await api.ok("GET", "/v1/job/stopped"))["Stop"] is True


async def test_system_gc_forces_collection_of_a_just_finished_job(tmp_path: Path) -> None:
    async with running_agent(data_dir=tmp_path / "data") as agent, api_client(agent) as api:
        await run_to_status(api, batch_job("finished", "echo bye"), "dead")
        (alloc,) = await job_allocations(api, "finished")
        alloc_dir = tmp_path / "data" / "alloc" / alloc["ID"]
        assert alloc_dir.is_dir()
        await run_to_status(api, batch_job("running", "sleep 60"), "running")
        _, headers, _ = await api.get("/v1/jobs")
        index = headers["X-Nomad-Index"]
        blocked = asyncio.create_task(
            api.get("/v1/jobs", params={"index": index, "wait": "30s"}), name="blocked-list"
        )

        status, _, body = await api.put("/v1/system/gc")
        assert (status, body) == (200, "")

        list_status, list_headers, jobs = await asyncio.wait_for(blocked, 10)
        assert list_status == 200
        assert int(list_headers["X-Nomad-Index"]) > int(index)
        assert [job["ID"] for job in jobs] == ["running"]
        assert await status_of(api, "/v1/job/finished") == 404
        assert await status_of(api, f"/v1/allocation/{alloc['ID']}") == 404
        assert await job_allocations(api, "running")
        # The client destroys what the server no longer knows.
        assert not alloc_dir.exists()

        status, _, body = await api.call("POST", "/v1/system/gc")
        assert (status, body) == (200, "")
        status, _, body = await api.get("/v1/system/gc")
        assert (status, body) == (405, "Invalid method")


async def test_system_gc_needs_the_management_token() -> None:
    async with running_agent(acl_token="secret-token") as agent, api_client(agent) as api:
        status, _, body = await api.put("/v1/system/gc")
        assert (status, body) == (403, "Permission denied")
        status, _, body = await api.put("/v1/system/gc", headers={"X-Nomad-Token": "wrong"})
        assert (status, body) == (403, "ACL token not found")
        status, _, body = await api.put("/v1/system/gc", headers={"X-Nomad-Token": "secret-token"})
        assert (status, body) == (200, "")


async def test_a_parent_with_live_children_is_kept() -> None:
    async with running_agent() as agent, api_client(agent) as api:
        parent = batch_job(
            "render", "sleep 60", parameterized={"Payload": "optional"}, kill_timeout_ns=100_000_000
        )
        await api.ok("PUT", "/v1/jobs", json_body={"Job": parent})
        dispatched = await api.ok("PUT", "/v1/job/render/dispatch", json_body={})
        child_id = dispatched["DispatchedJobID"]
        await wait_job_status(api, child_id, "running")
        await api.ok("DELETE", "/v1/job/render")
        assert (await api.ok("GET", "/v1/job/render"))["Status"] == "dead"

        await api.ok("PUT", "/v1/system/gc")
        assert (await api.ok("GET", "/v1/job/render"))["Stop"] is True
        assert await status_of(api, f"/v1/job/{child_id}") == 200

        await api.ok("DELETE", f"/v1/job/{child_id}")
        await wait_job_status(api, child_id, "dead")

        # The child is dead once its allocation is told to stop; GC waits for the client to
        # have finished it.
        async def child_collected() -> bool:
            await api.ok("PUT", "/v1/system/gc")
            return await status_of(api, f"/v1/job/{child_id}") == 404

        await eventually(child_collected)
        assert await status_of(api, "/v1/job/render") == 404


async def test_client_gc_removes_the_oldest_alloc_dirs_above_gc_max_allocs() -> None:
    config = GCConfig(gc_max_allocs=2, client_gc_interval=0.05)
    async with running_agent(gc=config) as agent, api_client(agent) as api:
        allocs = []
        for n in range(3):
            await run_to_status(api, batch_job(f"step-{n}", f"echo out-{n}"), "dead")
            (alloc,) = await job_allocations(api, f"step-{n}")
            allocs.append(alloc)
        oldest = allocs[0]["ID"]
        params = {"task": "main", "type": "stdout", "plain": "true", "origin": "start"}

        async def collected() -> tuple[int, str] | None:
            status, _, body = await api.get(f"/v1/client/fs/logs/{oldest}", params=params)
            return (status, body) if status == 404 else None

        assert await eventually(collected) == (
            404,
            f"state for allocation {oldest} not found on client",
        )
        status, _, body = await api.get(
            f"/v1/client/fs/cat/{oldest}", params={"path": "alloc/logs/main.stdout.0"}
        )
        assert (status, body) == (404, f"state for allocation {oldest} not found on client")
        # The record stays on the server until server GC.
        assert (await api.ok("GET", f"/v1/allocation/{oldest}"))["ClientStatus"] == "complete"
        for n, alloc in enumerate(allocs[1:], start=1):
            logs = await api.ok("GET", f"/v1/client/fs/logs/{alloc['ID']}", params=params)
            assert logs == f"out-{n}\n"


async def test_purged_rows_stay_purged_after_a_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with running_agent(data_dir=data_dir) as agent, api_client(agent) as api:
        await run_to_status(api, batch_job("gone", "echo gone"), "dead")
        (alloc,) = await job_allocations(api, "gone")
        (evaluation,) = await evaluations(api, "gone")
        await run_to_status(api, batch_job("kept", "sleep 60"), "running")
        await api.ok("PUT", "/v1/system/gc")
        _, headers, _ = await api.get("/v1/jobs")
        index_before = int(headers["X-Nomad-Index"])
    async with running_agent(data_dir=data_dir) as agent, api_client(agent) as api:
        assert await status_of(api, "/v1/job/gone") == 404
        assert await status_of(api, f"/v1/allocation/{alloc['ID']}") == 404
        assert await status_of(api, f"/v1/evaluation/{evaluation['ID']}") == 404
        assert await status_of(api, "/v1/job/gone/versions") == 404
        assert not (data_dir / "alloc" / alloc["ID"]).exists()
        _, headers, jobs = await api.get("/v1/jobs")
        assert [job["ID"] for job in jobs] == ["kept"]
        assert int(headers["X-Nomad-Index"]) >= index_before
        await api.ok("DELETE", "/v1/job/kept", params={"purge": "true"})


def test_gc_flags_take_go_durations_with_nomads_defaults() -> None:
    parser = build_parser()
    defaults = config_from_args(parser.parse_args([])).gc
    assert defaults == GCConfig(
        job_gc_interval=300.0,
        job_gc_threshold=4 * 3600.0,
        eval_gc_threshold=3600.0,
        batch_eval_gc_threshold=24 * 3600.0,
        client_gc_interval=60.0,
        gc_max_allocs=50,
    )
    args = parser.parse_args(
        [
            "--job-gc-interval=30s",
            "--job-gc-threshold=1h30m",
            "--eval-gc-threshold=10m",
            "--batch-eval-gc-threshold=2h",
            "--client-gc-interval=5s",
            "--gc-max-allocs=7",
        ]
    )
    assert config_from_args(args).gc == GCConfig(
        job_gc_interval=30.0,
        job_gc_threshold=5400.0,
        eval_gc_threshold=600.0,
        batch_eval_gc_threshold=7200.0,
        client_gc_interval=5.0,
        gc_max_allocs=7,
    )
    with pytest.raises(ValueError, match=r"^--job-gc-threshold: time: missing unit"):
        config_from_args(parser.parse_args(["--job-gc-threshold=4"]))
    with pytest.raises(ValueError, match=r"^--client-gc-interval: .* must be a positive"):
        config_from_args(parser.parse_args(["--client-gc-interval=0s"]))
    with pytest.raises(ValueError, match=r"^--gc-max-allocs: -1 must not be negative"):
        config_from_args(parser.parse_args(["--gc-max-allocs=-1"]))


@pytest.mark.parametrize(
    ("job", "gcable"),
    [
        ({"Type": "batch", "Status": "dead"}, True),
        ({"Type": "batch", "Status": "running"}, False),
        ({"Type": "service", "Status": "dead"}, False),
        ({"Type": "service", "Status": "dead", "Stop": True}, True),
        ({"Type": "batch", "Status": "running", "Periodic": {"Enabled": True}}, False),
        ({"Type": "batch", "Status": "dead", "Stop": True, "Periodic": {"Enabled": True}}, True),
        ({"Type": "batch", "Status": "running", "ParameterizedJob": {"Payload": "x"}}, False),
        (
            {"Type": "batch", "Status": "dead", "Stop": True, "ParameterizedJob": {"Payload": "x"}},
            True,
        ),
    ],
)
def test_job_gcable_follows_nomad(job: dict[str, Any], gcable: bool) -> None:
    assert job_gcable(job) is gcable


@pytest.mark.parametrize(
    ("alloc", "job", "eligible"),
    [
        ({"ClientStatus": "complete", "DesiredStatus": "run"}, None, True),
        ({"ClientStatus": "running", "DesiredStatus": "stop"}, None, False),
        ({"ClientStatus": "complete", "DesiredStatus": "run", "ModifyTime": 20}, None, False),
        ({"ClientStatus": "failed", "DesiredStatus": "run"}, {"Status": "running"}, False),
        (
            {"ClientStatus": "failed", "DesiredStatus": "run", "NextAllocation": "n"},
            {"Status": "running"},
            True,
        ),
        ({"ClientStatus": "failed", "DesiredStatus": "stop"}, {"Status": "running"}, True),
        ({"ClientStatus": "failed", "DesiredStatus": "run"}, {"Status": "dead"}, True),
        ({"ClientStatus": "lost", "DesiredStatus": "run"}, {"Status": "running"}, True),
    ],
)
def test_alloc_gc_eligibility(
    alloc: dict[str, Any], job: dict[str, Any] | None, eligible: bool
) -> None:
    assert alloc_gc_eligible({"ModifyTime": 5, **alloc}, job, cutoff=10) is eligible
