"""Specification steps' log copies: each allocation's output once, resumable, no writes for
silent steps (``speclogs.py``)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from run_harness import Stack, spec_step, wait_for

from nomad_pipeline.controller.logstore import LogStore
from nomad_pipeline.nomad.client import NomadClient
from nomad_pipeline.reconcilers.speclogs import OFFSETS_FILE, LogCopier, LogSource

DEADLINE_SECONDS = 20.0


def step_dir(stack: Stack, run_id: str, step: str) -> Path:
    return stack.data_dir / "logs" / "runs" / "default" / run_id / step / "logs"


async def wait_copied(stack: Stack, run_id: str, step: str) -> None:
    """Until the controller's copier is done with the step (every LogStore over one root in a
    process shares that knowledge)."""
    logs = LogStore(stack.data_dir / "logs")
    await wait_for(
        f"the logs of {run_id}/{step}", lambda: logs.step_finished("default", run_id, step)
    )


async def test_each_attempts_output_is_copied_once_after_the_previous(
    stack: Stack, tmp_path: Path
) -> None:
    marker = tmp_path / "count"
    script = (
        f"n=$(cat {marker} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {marker}; "
        "echo attempt-$n; [ $n -ge 2 ]"
    )
    await stack.create_flow(
        "flaky-logs", {"specification": {"steps": [spec_step("flaky", script, retries=1)]}}
    )
    run_id = await stack.start_run("flaky-logs")
    run = await stack.wait_run(run_id)
    assert (run.status.phase, run.status.steps[0].attempts) == ("success", 2)

    await wait_copied(stack, run_id, "flaky")
    logs = step_dir(stack, run_id, "flaky")
    assert (logs / "stdout.log").read_bytes() == b"attempt-1\nattempt-2\n"
    bases = json.loads((logs / OFFSETS_FILE).read_text())
    # The second allocation's output starts where the first one's ended.
    assert sorted(base["stdout"] for base in bases.values()) == [0, len(b"attempt-1\n")]


async def test_a_follower_of_a_retried_step_sees_every_attempt_and_ends_with_the_step(
    stack: Stack, tmp_path: Path
) -> None:
    marker = tmp_path / "count"
    gate = tmp_path / "gate"
    # The first attempt prints, then waits for the gate (so the follower is attached while it
    # runs) and fails; the second prints and succeeds.
    script = (
        f"n=$(cat {marker} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {marker}; "
        f"echo attempt-$n; if [ $n -eq 1 ]; then while [ ! -e {gate} ]; do sleep 0.02; done; "
        "exit 3; fi"
    )
    await stack.create_flow(
        "follow-retries", {"specification": {"steps": [spec_step("flaky", script, retries=1)]}}
    )
    run_id = await stack.start_run("follow-retries")
    logs = LogStore(stack.data_dir / "logs")
    received = bytearray()
    # Never set: only the controller's "logs finished" mark can end this follower.
    never = asyncio.Event()

    async def follow() -> None:
        async for chunk in logs.follow("default", run_id, "flaky", "stdout", until=never):
            received.extend(chunk)

    follower = asyncio.create_task(follow())
    try:
        await wait_for("the first attempt's output", lambda: bytes(received) == b"attempt-1\n")
        gate.touch()
        async with asyncio.timeout(DEADLINE_SECONDS):
            await follower
    finally:
        follower.cancel()
    assert bytes(received) == b"attempt-1\nattempt-2\n"
    run = await stack.run(run_id)
    # The follower ended because the step did: its final phase is stored.
    assert (run.status.steps[0].phase, run.status.steps[0].attempts) == ("success", 2)


async def test_a_new_copier_resumes_where_the_file_ends(stack: Stack) -> None:
    await stack.create_flow(
        "talk", {"specification": {"steps": [spec_step("talk", "echo out-line; echo err >&2")]}}
    )
    run_id = await stack.start_run("talk")
    run = await stack.wait_run(run_id)
    await wait_copied(stack, run_id, "talk")
    alloc_id = run.status.steps[0].alloc_id
    assert alloc_id is not None

    # A restarted controller copying the same ended allocation again appends nothing.
    async with NomadClient(stack.nomad_address) as nomad:
        copier = LogCopier(nomad, LogStore(stack.data_dir / "logs"))
        copier.start(LogSource("default", run_id, "talk", "default", alloc_id, "main"), ended=True)
        await wait_for("the second copy", lambda: len(copier) == 0)
        await copier.close()
    # Nothing new in either file: one listing of the log directory, no log request.
    assert copier.requests == 1

    logs = step_dir(stack, run_id, "talk")
    assert (logs / "stdout.log").read_bytes() == b"out-line\n"
    assert (logs / "stderr.log").read_bytes() == b"err\n"


async def test_a_step_that_prints_nothing_writes_no_offsets(stack: Stack) -> None:
    await stack.create_flow("quiet", {"specification": {"steps": [spec_step("quiet", "true")]}})
    run_id = await stack.start_run("quiet")
    run = await stack.wait_run(run_id)
    assert run.status.phase == "success"
    await wait_copied(stack, run_id, "quiet")
    assert not (step_dir(stack, run_id, "quiet") / OFFSETS_FILE).exists()
