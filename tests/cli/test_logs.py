"""``logs`` against the real log routes and log store: plain reads, prefixes, and -f."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cli_harness import Controller, start_controller

from nomad_pipeline.controller.api import logs
from nomad_pipeline.controller.logstore import LogStore
from nomad_pipeline.resources.kinds import Run

RUN_ID = "01jcli0000000000000000000a"
LINE_DEADLINE = 30.0


def run_object(steps: dict[str, str]) -> Run:
    return Run.model_validate(
        {
            "apiVersion": "nomad-pipeline.io/v1",
            "kind": "Run",
            "metadata": {"name": RUN_ID, "namespace": "default"},
            "spec": {
                "flow": "build-test",
                "flow_spec": {
                    "inline": {"steps": [{"name": name, "run": "echo"} for name in steps]}
                },
            },
            "status": {
                "phase": "running",
                "steps": [{"name": name, "phase": phase} for name, phase in steps.items()],
            },
        }
    )


@pytest.fixture
async def log_store(tmp_path: Path) -> LogStore:
    return LogStore(tmp_path / "logs")


@pytest.fixture
async def with_logs(tmp_path: Path, log_store: LogStore) -> AsyncIterator[Controller]:
    routes: list[Any] = [logs.provide_log_store(log_store), logs.setup]
    async for running in start_controller(tmp_path, routes):
        yield running


async def store_run(controller: Controller, steps: dict[str, str]) -> Run:
    created = await controller.store.create(run_object(steps))
    return await controller.store.update_status(
        run_object(steps).model_copy(update={"metadata": created.metadata})
    )


async def test_logs_of_one_step_and_of_every_step(
    with_logs: Controller, log_store: LogStore
) -> None:
    await store_run(with_logs, {"build": "success", "test": "success"})
    await log_store.append("default", RUN_ID, "build", "stdout", b"compiling\ndone\n")
    await log_store.append("default", RUN_ID, "test", "stdout", b"ok\n")
    await log_store.append("default", RUN_ID, "test", "stderr", b"warning: slow\n")

    one = await with_logs.cli("logs", RUN_ID, "build")
    assert (one.code, one.out, one.err) == (0, "compiling\ndone\n", "")

    every = await with_logs.cli("logs", RUN_ID)
    assert every.out.splitlines() == ["[build] compiling", "[build] done", "[test] ok"]

    errors = await with_logs.cli("logs", RUN_ID, "test", "--stderr")
    assert errors.err == "warning: slow\n"

    unknown = await with_logs.cli("logs", RUN_ID, "deploy")
    assert unknown.code == 1
    assert unknown.err.startswith("error: NotFound: ")
    assert "deploy" in unknown.err


async def test_logs_follow_streams_until_the_step_ends(
    with_logs: Controller, log_store: LogStore
) -> None:
    run = await store_run(with_logs, {"build": "running"})
    await log_store.append("default", RUN_ID, "build", "stdout", b"first\n")
    follower = await with_logs.start_cli("logs", RUN_ID, "build", "-f")
    assert follower.stdout is not None
    try:
        assert await asyncio.wait_for(follower.stdout.readline(), LINE_DEADLINE) == b"first\n"
        # A line written while the step runs reaches the follower.
        await log_store.append("default", RUN_ID, "build", "stdout", b"second\n")
        assert await asyncio.wait_for(follower.stdout.readline(), LINE_DEADLINE) == b"second\n"
        # The stream, and the command, end once the run shows the step finished.
        finished = run.model_copy(
            update={"status": run.status.model_copy(update={"phase": "success"})}
        )
        await with_logs.store.update_status(finished)
        assert await asyncio.wait_for(follower.wait(), LINE_DEADLINE) == 0
        assert await follower.stdout.read() == b""
    finally:
        if follower.returncode is None:
            follower.kill()
            await follower.wait()
