"""Deleting runs on a real dev agent: the stop-jobs finalizer stops a running run's Nomad jobs,
deletes its logs, and only then lets the run go; a restarted controller finishes a deletion."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from run_harness import DEADLINE_SECONDS, Stack, spec_step

from nomad_pipeline.app import ControllerApp, ControllerConfig
from nomad_pipeline.cli.main import main
from nomad_pipeline.controller.api.runs import create_run
from nomad_pipeline.devagent.server import DevAgent, DevAgentConfig
from nomad_pipeline.errors import NotFound
from nomad_pipeline.nomad.client import NomadClient
from nomad_pipeline.resources.kinds import Flow, Run
from nomad_pipeline.resources.meta import ObjectMeta
from nomad_pipeline.store.interface import Store
from nomad_pipeline.store.nomadvars import NomadVarsStore

RUNS = "/apis/nomad-pipeline.io/v1/namespaces/default/runs"
SLEEPY = {"specification": {"steps": [spec_step("long", "sleep 30"), spec_step("next", "true")]}}


async def wait_gone(store: Store, name: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE_SECONDS
    while True:
        try:
            run = await store.get(Run, "default", name)
        except NotFound:
            return
        assert loop.time() < end, f"run {name} was not deleted: {run.metadata!r}"
        await asyncio.sleep(0.02)


async def wait_path_gone(path: Path) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE_SECONDS
    while path.exists():
        assert loop.time() < end, f"{path} was not deleted"
        await asyncio.sleep(0.02)


def long_step_running(run: Run) -> bool:
    return bool(run.status.steps) and run.status.steps[0].phase == "running"


async def test_deleting_a_running_run_stops_its_job_and_removes_it(stack: Stack) -> None:
    chatty = "while true; do echo tick; sleep 0.05; done"
    await stack.create_flow(
        "chatty",
        {"specification": {"steps": [spec_step("long", chatty), spec_step("next", "true")]}},
    )
    run_id = await stack.start_run("chatty")
    log_dir = stack.data_dir / "logs" / "runs" / "default" / run_id
    stdout = log_dir / "long" / "logs" / "stdout.log"
    # Its logs are being copied while it is deleted.
    await stack.wait_run(
        run_id, until=lambda _run: stdout.exists() and b"tick" in stdout.read_bytes()
    )
    job, _ = await stack.nomad.get_job(f"{run_id}-long")
    assert job["Stop"] is False

    async with stack.http.delete(f"{stack.address}{RUNS}/{run_id}") as response:
        body = await response.json()
        assert response.status == 202, body
        assert body["metadata"]["deletion_timestamp"]
        assert body["metadata"]["finalizers"] == ["nomad-pipeline.io/stop-jobs"]

    await wait_gone(stack.app.store, run_id)
    job, _ = await stack.nomad.get_job(f"{run_id}-long")
    assert job["Stop"] is True
    # The next step never started: its job was never registered.
    listed, _ = await stack.nomad.list_jobs(f"{run_id}-next")
    assert listed == []
    # The logs went before the run did, and their copier with them: nothing writes them again.
    assert not log_dir.exists()


async def test_cli_delete_of_a_running_run_waits_for_its_jobs_to_stop(stack: Stack) -> None:
    await stack.create_flow("sleepy", SLEEPY)
    run_id = await stack.start_run("sleepy")
    await stack.wait_run(run_id, until=long_step_running)
    out, err = io.StringIO(), io.StringIO()

    code = await asyncio.to_thread(
        main,
        ["delete", "run", run_id, "--addr", stack.address],
        stdin=io.StringIO(""),
        stdout=out,
        stderr=err,
    )

    assert (code, out.getvalue(), err.getvalue()) == (
        0,
        f"run.nomad-pipeline.io/{run_id} deleted\n",
        "",
    )
    # Gone means finalized: the job was stopped before the run went.
    job, _ = await stack.nomad.get_job(f"{run_id}-long")
    assert job["Stop"] is True
    with pytest.raises(NotFound):
        await stack.run(run_id)


async def test_deleting_a_finished_run_removes_it_and_its_logs(stack: Stack) -> None:
    await stack.create_flow("quick", {"specification": {"steps": [spec_step("say", "echo hi")]}})
    run_id = await stack.start_run("quick")
    run = await stack.wait_run(run_id)
    assert run.status.phase == "success"
    log_dir = stack.data_dir / "logs" / "runs" / "default" / run_id
    await stack.wait_run(run_id, until=lambda _run: (log_dir / "say").exists())

    async with stack.http.delete(f"{stack.address}/v1/runs/{run_id}") as response:
        assert response.status == 200, await response.text()
        assert await response.json() == {}

    await wait_gone(stack.app.store, run_id)
    await wait_path_gone(log_dir)


async def test_a_restarted_controller_finishes_a_deletion(tmp_path: Path) -> None:
    agent = DevAgent(DevAgentConfig(port=0, data_dir=tmp_path / "nomad"))
    nomad_address = await agent.start()
    config = ControllerConfig(
        data_dir=tmp_path / "controller",
        http_addr="127.0.0.1:0",
        nomad_addr=nomad_address,
        nomad_token="",
        state_backend="nomad-vars",
    )
    try:
        async with NomadClient(nomad_address) as nomad:
            first = ControllerApp(config)
            await first.start()
            try:
                await first.store.create(Flow(metadata=ObjectMeta(name="sleepy"), spec=SLEEPY))
                flow = await first.store.get(Flow, "default", "sleepy")
                run_id = (await create_run(first.store, flow, {})).metadata.name
                await _wait_until(first.store, run_id)
            finally:
                await first.stop()

            # The deletion is asked for while no controller runs (as if one died right after).
            outside = NomadVarsStore(nomad)
            await outside.start()
            try:
                marked = await outside.delete(Run, "default", run_id)
            finally:
                await outside.close()
            assert marked.metadata.deleting
            job, _ = await nomad.get_job(f"{run_id}-long")
            assert job["Stop"] is False

            second = ControllerApp(config)
            await second.start()
            try:
                await wait_gone(second.store, run_id)
            finally:
                await second.stop()
            job, _ = await nomad.get_job(f"{run_id}-long")
            assert job["Stop"] is True
    finally:
        await agent.stop()


async def _wait_until(store: Store, run_id: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE_SECONDS
    while not long_step_running(run := await store.get(Run, "default", run_id)):
        assert loop.time() < end, f"run {run_id} did not start: {run.status!r}"
        await asyncio.sleep(0.02)
