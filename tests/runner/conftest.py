"""Fixtures of the runner tests (helpers in runner_harness.py)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from ports import free_port
from runner_harness import RUNNER, Controller, RunnerProcess

from nomad_pipeline.controller.logstore import LogStore
from nomad_pipeline.controller.runnertoken import runner_token
from nomad_pipeline.resources.kinds import Namespace
from nomad_pipeline.resources.meta import ObjectMeta
from nomad_pipeline.store.memory import MemoryStore


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    store = MemoryStore()
    await store.start()
    await store.create(Namespace(metadata=ObjectMeta(name="default")))
    data_dir = tmp_path / "data"
    result = Controller(
        store=store, data_dir=data_dir, log_store=LogStore(data_dir / "logs"), port=free_port()
    )
    await result.start()
    try:
        yield result
    finally:
        await result.stop()
        await store.close()


@pytest.fixture
async def start_runner(
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Any]]:
    started: list[RunnerProcess] = []

    async def start(
        controller: Controller,
        *,
        name: str = "01run",
        work_dir: Path | None = None,
        token: str | None = None,
        env: dict[str, str] | None = None,
    ) -> RunnerProcess:
        work = work_dir or tmp_path / "work"
        work.mkdir(exist_ok=True)
        alloc_dir = tmp_path / "alloc"
        alloc_dir.mkdir(exist_ok=True)
        environ = {
            "PATH": os.environ["PATH"],
            "HOME": str(tmp_path),
            "NP_CONTROLLER_ADDR": controller.address,
            "NP_RUN_NAMESPACE": "default",
            "NP_RUN_NAME": name,
            "NP_RUN_TOKEN": token or runner_token(controller.secret, "default", name),
            "NP_WORK_DIR": str(work),
            "NOMAD_ALLOC_DIR": str(alloc_dir),
            "NP_RUNNER_KILL_GRACE": "1",
            **(env or {}),
        }
        process = await asyncio.create_subprocess_exec(
            str(RUNNER),
            env=environ,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        runner = RunnerProcess(process)
        assert process.stdout is not None and process.stderr is not None
        runner._readers = [
            asyncio.create_task(runner._read(process.stdout, "stdout_text"), name="out"),
            asyncio.create_task(runner._read(process.stderr, "stderr_text"), name="err"),
        ]
        started.append(runner)
        return runner

    yield start
    for runner in started:
        if runner.process.returncode is None:
            runner.process.kill()
            await runner.process.wait()
        for reader in runner._readers:
            reader.cancel()
