"""run (--wait, --follow), cancel and rerun against the real run, log and object routes.

No reconciler runs here: the test writes the run's status into the store, as the run
reconciler would, and checks what the CLI prints and how it exits.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cli_harness import DEFAULT_NAMESPACE_MANIFEST, Controller, start_controller

from nomad_pipeline.controller.api import logs, runs
from nomad_pipeline.controller.logstore import LogStore
from nomad_pipeline.resources.kinds import Run, StepStatus

LINE_DEADLINE = 30.0

MANIFESTS = (
    DEFAULT_NAMESPACE_MANIFEST
    + """\
---
apiVersion: nomad-pipeline.io/v1
kind: Flow
metadata: {name: hello, namespace: default}
spec:
  variables:
    - {name: who, type: string, default: world}
    - {name: count, type: number, default: 1}
  inline:
    steps:
      - {name: build, run: "echo build"}
      - {name: test, run: "echo test"}
"""
)


@pytest.fixture
async def log_store(tmp_path: Path) -> LogStore:
    return LogStore(tmp_path / "logs")


@pytest.fixture
async def with_runs(tmp_path: Path, log_store: LogStore) -> AsyncIterator[Controller]:
    routes: list[Any] = [logs.provide_log_store(log_store), logs.setup, runs.setup]
    async for running in start_controller(tmp_path, routes):
        applied = await running.cli("apply", "-f", "-", stdin=MANIFESTS)
        assert applied.code == 0, applied.err
        yield running


async def set_status(controller: Controller, name: str, phase: str, **steps: str) -> None:
    """Write the run's status as the run reconciler would."""
    run = await controller.store.get(Run, "default", name)
    status = run.status.model_copy(
        update={
            "phase": phase,
            "message": f"step test {phase}" if phase == "failed" else "",
            "steps": [
                StepStatus(
                    name=step,
                    phase=step_phase,  # type: ignore[arg-type]
                    attempts=0 if step_phase == "pending" else 1,
                    exit_code={"success": 0, "failed": 2}.get(step_phase),
                )
                for step, step_phase in steps.items()
            ],
        }
    )
    await controller.store.update_status(run.model_copy(update={"status": status}))


async def read_line(stream: asyncio.StreamReader) -> str:
    line = await asyncio.wait_for(stream.readline(), timeout=LINE_DEADLINE)
    assert line, "the command ended before printing the expected line"
    return line.decode().rstrip("\n")


async def test_run_prints_the_run_name_alone_and_creates_the_run(with_runs: Controller) -> None:
    result = await with_runs.cli("run", "hello", "--var", "who=you", "--var", "count=3")
    assert (result.code, result.err) == (0, "")
    run_id = result.out.strip()
    assert result.out == run_id + "\n"
    run = await with_runs.store.get(Run, "default", run_id)
    assert run.spec.flow == "hello"
    assert run.spec.variables == {"who": "you", "count": 3}

    bad = await with_runs.cli("run", "hello", "--var", "count=lots")
    assert bad.code == 1
    assert bad.err.startswith("error: Invalid: ")
    assert "count" in bad.err
    assert len(bad.err.splitlines()) == 1

    missing = await with_runs.cli("run", "nope")
    assert missing.code == 1
    assert missing.err.startswith("error: NotFound: ")


async def test_run_wait_follow_prints_transitions_and_logs_and_exits_non_zero_on_failure(
    with_runs: Controller, log_store: LogStore
) -> None:
    waiter = await with_runs.start_cli("run", "hello", "--follow")
    assert waiter.stdout is not None
    try:
        run_id = await read_line(waiter.stdout)
        assert await read_line(waiter.stdout) == f"run {run_id}: pending"
        await set_status(with_runs, run_id, "running", build="running", test="pending")
        assert await read_line(waiter.stdout) == "step build: running"
        assert await read_line(waiter.stdout) == f"run {run_id}: running"
        # The step's output streams while it runs.
        await log_store.append("default", run_id, "build", "stdout", b"compiling\n")
        assert await read_line(waiter.stdout) == "[build] compiling"

        await set_status(with_runs, run_id, "failed", build="success", test="failed")
        rest = [await read_line(waiter.stdout) for _ in range(3)]
        assert rest == [
            "step build: success (exit code 0)",
            "step test: failed (exit code 2)",
            f"run {run_id}: failed: step test failed",
        ]
        assert await asyncio.wait_for(waiter.wait(), LINE_DEADLINE) == 1
    finally:
        if waiter.returncode is None:
            waiter.kill()
            await waiter.wait()


async def test_run_wait_exits_zero_on_success(with_runs: Controller) -> None:
    waiting = asyncio.create_task(with_runs.cli("run", "hello", "--wait"))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LINE_DEADLINE
    while not (listed := await with_runs.store.list(Run, "default")).items:
        assert loop.time() < deadline, "the run was never created"
        await asyncio.sleep(0.02)
    run_id = listed.items[0].metadata.name
    await set_status(with_runs, run_id, "success", build="success", test="success")
    result = await asyncio.wait_for(waiting, LINE_DEADLINE)
    assert result.code == 0
    assert result.out.splitlines()[0] == run_id
    assert result.out.splitlines()[-1] == f"run {run_id}: success"


async def test_cancel_and_rerun(with_runs: Controller) -> None:
    run_id = (await with_runs.cli("run", "hello")).out.strip()
    cancelled = await with_runs.cli("cancel", run_id)
    assert (cancelled.code, cancelled.out) == (
        0,
        f"run.nomad-pipeline.io/{run_id} cancel requested\n",
    )
    assert (await with_runs.store.get(Run, "default", run_id)).spec.cancel

    await set_status(with_runs, run_id, "failed", build="success", test="failed")
    too_late = await with_runs.cli("cancel", run_id)
    assert too_late.code == 1
    assert too_late.err.startswith("error: Conflict: ")
    assert "already finished" in too_late.err

    rerun = await with_runs.cli("rerun", run_id, "--from-failed")
    assert rerun.code == 0
    new_id = rerun.out.strip()
    assert new_id != run_id
    again = await with_runs.store.get(Run, "default", new_id)
    assert (again.spec.rerun_of, again.spec.from_failed) == (run_id, True)

    listed = await with_runs.cli("get", "runs", "-o", "name")
    assert sorted(listed.out.splitlines()) == sorted(
        [f"run.nomad-pipeline.io/{run_id}", f"run.nomad-pipeline.io/{new_id}"]
    )
