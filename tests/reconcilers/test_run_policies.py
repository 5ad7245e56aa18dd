"""Flow-level policies on a real dev agent: concurrency, flow timeout, retention, rerun,
parameterized jobs."""

from __future__ import annotations

import asyncio
from typing import Any

from run_harness import Stack, spec_step
from shell_jobs import shell_job

from nomad_pipeline.errors import NotFound
from nomad_pipeline.resources.kinds import Run


def flow(*steps: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"specification": {"steps": list(steps)}, **extra}


async def test_concurrency_queue_runs_one_at_a_time(stack: Stack) -> None:
    await stack.create_flow(
        "queued", flow(spec_step("work", "sleep 0.3"), concurrency={"max": 1, "policy": "queue"})
    )
    first = await stack.start_run("queued")
    second = await stack.start_run("queued")
    queued = await stack.wait_run(second, until=lambda r: r.status.message.startswith("queued"))
    assert queued.status.phase == "pending"
    done_first = await stack.wait_run(first)
    done_second = await stack.wait_run(second)
    assert (done_first.status.phase, done_second.status.phase) == ("success", "success")
    assert done_first.status.end_time is not None and done_second.status.start_time is not None
    assert done_second.status.start_time >= done_first.status.end_time


async def test_concurrency_skip_and_cancel_oldest(stack: Stack) -> None:
    await stack.create_flow(
        "skipper", flow(spec_step("work", "sleep 30"), concurrency={"max": 1, "policy": "skip"})
    )
    running = await stack.start_run("skipper")
    await stack.wait_run(running, until=lambda r: r.status.phase == "running")
    skipped = await stack.wait_run(await stack.start_run("skipper"))
    assert skipped.status.phase == "skipped"
    assert "concurrency" in skipped.status.message

    await stack.create_flow(
        "newest-wins",
        flow(spec_step("work", "sleep 30"), concurrency={"max": 1, "policy": "cancel-oldest"}),
    )
    oldest = await stack.start_run("newest-wins")
    await stack.wait_run(
        oldest, until=lambda r: bool(r.status.steps) and r.status.steps[0].phase == "running"
    )
    newest = await stack.start_run("newest-wins")
    cancelled = await stack.wait_run(oldest)
    assert cancelled.status.phase == "cancelled"
    started = await stack.wait_run(
        newest, until=lambda r: bool(r.status.steps) and r.status.steps[0].phase == "running"
    )
    assert started.status.phase == "running"
    for name in (running, newest):
        async with stack.http.put(f"{stack.address}/v1/runs/{name}/cancel") as response:
            assert response.status == 200


async def test_flow_timeout_stops_the_run(stack: Stack) -> None:
    await stack.create_flow(
        "deadline", flow(spec_step("a", "true"), spec_step("b", "sleep 30"), timeout="1s")
    )
    run = await stack.wait_run(await stack.start_run("deadline"), deadline=15)
    assert run.status.phase == "failed"
    assert "timed out after 1s" in run.status.message
    assert [s.phase for s in run.status.steps] == ["success", "failed"]


async def test_retention_keeps_the_last_runs_and_deletes_their_logs(stack: Stack) -> None:
    await stack.create_flow(
        "kept", flow(spec_step("echo", "echo kept"), run_retention={"keep_last": 1})
    )
    first = await stack.start_run("kept")
    await stack.wait_run(first)
    log_dir = stack.data_dir / "logs" / "runs" / "default" / first
    second = await stack.start_run("kept")
    await stack.wait_run(second)
    loop = asyncio.get_running_loop()
    end = loop.time() + 20
    while True:
        try:
            await stack.run(first)
        except NotFound:
            break
        assert loop.time() < end, "the older run was not deleted"
        await asyncio.sleep(0.05)
    end = loop.time() + 10
    while log_dir.exists():
        assert loop.time() < end, "the older run's logs were not deleted"
        await asyncio.sleep(0.05)
    assert (await stack.run(second)).status.phase == "success"


async def test_rerun_from_failed_reuses_succeeded_steps(stack: Stack) -> None:
    marker = stack.data_dir / "fixed"
    await stack.create_flow(
        "fixable",
        flow(spec_step("build", "echo built"), spec_step("test", f"test -e {marker}")),
    )
    original = await stack.wait_run(await stack.start_run("fixable"))
    assert original.status.phase == "failed"
    marker.write_text("now it passes")
    async with stack.http.post(
        f"{stack.address}/v1/runs/{original.metadata.name}/rerun", params={"from_failed": "true"}
    ) as response:
        assert response.status == 201, await response.text()
        rerun_id = (await response.json())["run_id"]
    rerun: Run = await stack.wait_run(rerun_id)
    assert rerun.status.phase == "success"
    build, test = rerun.status.steps
    assert build.message == f"reused from run {original.metadata.name}"
    assert build.nomad_job_id == f"{original.metadata.name}-build"
    assert test.nomad_job_id == f"{rerun_id}-test"


async def test_parameterized_jobspec_is_dispatched(stack: Stack) -> None:
    job = shell_job("echo dispatched")
    job["ParameterizedJob"] = {"Payload": "optional"}
    await stack.create_flow("param", flow({"name": "child", "job": {"json": job}}))
    run = await stack.wait_run(await stack.start_run("param"))
    assert run.status.phase == "success", run.status
    parent = run.status.steps[0].nomad_job_id
    assert parent is not None
    children, _ = await stack.nomad.list_jobs(f"{parent}/dispatch-")
    assert len(children) == 1


async def test_cancel_stops_a_dispatched_child(stack: Stack) -> None:
    job = shell_job("sleep 30")
    job["ParameterizedJob"] = {"Payload": "optional"}
    await stack.create_flow("param-cancel", flow({"name": "child", "job": {"json": job}}))
    run_id = await stack.start_run("param-cancel")
    parent = f"{run_id}-child"

    async def children() -> list[dict[str, Any]]:
        listed, _ = await stack.nomad.list_jobs(f"{parent}/dispatch-")
        return listed

    loop = asyncio.get_running_loop()
    end = loop.time() + 20
    while not await children():
        assert loop.time() < end, "the parameterized job was not dispatched"
        await asyncio.sleep(0.05)
    async with stack.http.put(f"{stack.address}/v1/runs/{run_id}/cancel") as response:
        assert response.status == 200
    run = await stack.wait_run(run_id)
    assert run.status.phase == "cancelled"
    (child,) = await children()
    assert child["Stop"] is True
