"""Crash safety: SIGKILL the controller at 20+ moments while runs progress, restart it, and
every run still ends correctly, each step's Nomad job registered exactly once, none stuck.

Kill points are driven by what Nomad reports (never by sleeping): after a random number (1-4)
of job or allocation events the controller is killed, so kills land right after a job register,
while a step runs, between steps, and during the start-up reconcile of a restarted controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from runs_e2e_harness import E2E, RAW_EXEC_JOBSPEC, start_e2e

from nomad_pipeline.errors import NomadPipelineError

pytestmark = pytest.mark.timeout(300)

KILLS = 22
ROTATION = ["crash-seq", "crash-dag", "crash-seq", "crash-inline"]
# With nothing happening on Nomad for this long, the kill lands in a quiet moment instead.
QUIET_KILL_SECONDS = 5.0

FLOWS = """
apiVersion: nomad-pipeline.io/v1
kind: Flow
metadata:
  name: crash-seq
spec:
  specification:
    steps:
{seq_steps}
---
apiVersion: nomad-pipeline.io/v1
kind: Flow
metadata:
  name: crash-dag
spec:
  specification:
    steps:
      - name: a
        job: {{path: step.nomad.hcl, variables: {{script: "sleep 0.2"}}}}
      - name: b
        needs: [a]
        job: {{path: step.nomad.hcl, variables: {{script: "sleep 0.1; exit 7"}}}}
      - name: c
        needs: [a]
        job: {{path: step.nomad.hcl, variables: {{script: "sleep 0.3"}}}}
      - name: d
        needs: [b, c]
        job: {{path: step.nomad.hcl, variables: {{script: "true"}}}}
      - name: handler
        needs: [d]
        condition: 'steps.b.status == "failed"'
        job: {{path: step.nomad.hcl, variables: {{script: "echo handled"}}}}
---
apiVersion: nomad-pipeline.io/v1
kind: Flow
metadata:
  name: crash-inline
spec:
  inline:
    steps:
      - name: one
        run: sleep 0.3; echo one > shared
      - name: two
        run: sleep 0.3; cat shared
      - name: three
        run: sleep 0.3
"""
SEQ_STEPS = [f"s{index}" for index in range(5)]
DAG_EXPECTED = {"a": "success", "b": "failed", "c": "success", "d": "skipped", "handler": "success"}


@pytest.fixture
async def e2e(tmp_path: Path) -> AsyncIterator[E2E]:
    (tmp_path / "step.nomad.hcl").write_text(RAW_EXEC_JOBSPEC)
    async for running in start_e2e(tmp_path):
        yield running


async def _events(e2e: E2E, queue: asyncio.Queue[None]) -> None:
    """One queue item per Job/Allocation event batch the dev agent publishes."""
    index = 0
    while True:
        try:
            async for batch in e2e.nomad.event_stream(["Job", "Allocation"], index=index):
                index = batch["Index"]
                queue.put_nowait(None)
        except NomadPipelineError:
            continue


async def _start_run(e2e: E2E, flow: str) -> str:
    async with e2e.http.post(
        f"{e2e.controller.address}/v1/flows/{flow}/run", json={"variables": {}}
    ) as response:
        body: dict[str, Any] = await response.json()
        assert response.status == 201, body
        run_id: str = body["run_id"]
        return run_id


async def test_runs_survive_sigkill_at_many_points(e2e: E2E) -> None:
    job = '{path: step.nomad.hcl, variables: {script: "sleep 0.15"}}'
    seq_steps = "".join(f"      - name: {name}\n        job: {job}\n" for name in SEQ_STEPS)
    await e2e.apply(FLOWS.format(seq_steps=seq_steps), "flows.yaml")
    rng = random.Random(20261128)
    events: asyncio.Queue[None] = asyncio.Queue()
    watcher = asyncio.create_task(_events(e2e, events), name="test-event-watch")
    runs: dict[str, str] = {}
    try:
        for kill in range(KILLS):
            # One new run per round (cycling through the flows) keeps work in flight, and kills
            # also land around run creation.
            flow = ROTATION[kill % len(ROTATION)]
            runs[await _start_run(e2e, flow)] = flow
            if kill % 5 == 4:
                # Kill during the restarted controller's first reconciles.
                await e2e.controller.kill()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(QUIET_KILL_SECONDS):
                        for _ in range(rng.randint(1, 4)):
                            await events.get()
                await e2e.controller.kill()
            while not events.empty():
                events.get_nowait()
            await e2e.controller.start(e2e.http)
        assert e2e.controller.starts >= 21
        finished = {run_id: await e2e.wait_run(run_id, deadline=90) for run_id in runs}
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher

    for run_id, flow in runs.items():
        status = finished[run_id]["status"]
        steps = {step["name"]: step for step in status["steps"]}
        if flow == "crash-seq":
            assert status["phase"] == "success", (run_id, status)
            assert [steps[name]["phase"] for name in SEQ_STEPS] == ["success"] * len(SEQ_STEPS)
        elif flow == "crash-dag":
            assert status["phase"] == "failed", (run_id, status)
            assert {name: step["phase"] for name, step in steps.items()} == DAG_EXPECTED
        else:
            assert status["phase"] == "success", (run_id, status)
            assert all(step["phase"] == "success" for step in steps.values()), status
        await _assert_registered_once(e2e, run_id, flow, steps)


async def _assert_registered_once(
    e2e: E2E, run_id: str, flow: str, steps: dict[str, dict[str, Any]]
) -> None:
    """Each job of the run exists once, at Version 0, with exactly one register evaluation."""
    jobs, _ = await e2e.nomad.list_jobs(run_id if flow != "crash-inline" else flow)
    ids = sorted(job["ID"] for job in jobs if run_id in job["ID"])
    if flow == "crash-inline":
        expected = [f"crash-inline-{run_id}"]
    else:
        expected = sorted(
            step["nomad_job_id"] for step in steps.values() if step["nomad_job_id"] is not None
        )
        assert all(step["attempts"] <= 1 for step in steps.values()), steps
    assert ids == expected, (run_id, ids)
    for job_id in ids:
        job, _ = await e2e.nomad.get_job(job_id)
        assert job["Version"] == 0, (job_id, job["Version"])
        evaluations, _ = await e2e.nomad.job_evaluations(job_id)
        registers = [e for e in evaluations if e.get("TriggeredBy") == "job-register"]
        assert len(registers) == 1, (job_id, [e.get("TriggeredBy") for e in evaluations])
