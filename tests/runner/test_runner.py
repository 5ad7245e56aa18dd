"""nomad-pipeline-runner, as a real process, against a real controller API over HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from runner_harness import DEADLINE, Controller

from nomad_pipeline.controller.runnertoken import load_or_create_secret, runner_token
from nomad_pipeline.resources.kinds import Run, StepStatus

StartRunner = Callable[..., Any]


def phases(run: Any) -> dict[str, str]:
    return {step.name: step.phase for step in run.status.steps}


async def wait_for_phase(controller: Controller, step: str, phase: str) -> None:
    """Wait (woken by store events, with a deadline) until ``step`` reaches ``phase``."""
    since = (await controller.store.list(Run, "default")).resource_version
    if phases(await controller.run()).get(step) == phase:
        return
    async with asyncio.timeout(DEADLINE):
        async for event in controller.store.watch(Run, "default", since=since):
            if isinstance(event.object, Run) and phases(event.object).get(step) == phase:
                return


async def test_ordered_steps_share_the_working_directory(
    controller: Controller, start_runner: StartRunner, tmp_path: Path
) -> None:
    await controller.create_run(
        [
            {"name": "write", "run": "echo built > artifact.txt\necho wrote it"},
            {"name": "read", "run": "cat artifact.txt\necho oops >&2"},
        ]
    )
    runner = await start_runner(controller)
    assert await runner.wait() == 0, runner.stderr_text

    run = await controller.run()
    assert phases(run) == {"write": "success", "read": "success"}
    write, read = run.status.steps
    assert write.exit_code == 0 and write.attempts == 1
    assert write.end_time is not None and read.start_time is not None
    assert write.end_time <= read.start_time
    assert await controller.log("write") == "wrote it\n"
    assert await controller.log("read") == "built\n"
    assert await controller.log("read", "stderr") == "oops\n"
    assert (tmp_path / "work" / "artifact.txt").read_text() == "built\n"


async def test_independent_steps_run_in_parallel(
    controller: Controller, start_runner: StartRunner
) -> None:
    # Each branch waits (with a deadline) until the other has started: run one after the other,
    # they would both time out and fail.
    def branch(me: str, other: str) -> str:
        return (
            f"touch {me}.started\n"
            f"for i in $(seq 1 200); do [ -f {other}.started ] && break; sleep 0.05; done\n"
            f"[ -f {other}.started ] && echo saw {other}"
        )

    await controller.create_run(
        [
            {"name": "left", "run": branch("left", "right"), "needs": []},
            {"name": "right", "run": branch("right", "left"), "needs": []},
            {"name": "join", "run": "echo joined", "needs": ["left", "right"]},
        ]
    )
    runner = await start_runner(controller)
    assert await runner.wait() == 0, runner.stderr_text

    run = await controller.run()
    assert phases(run) == {"left": "success", "right": "success", "join": "success"}
    left, right, join = run.status.steps
    assert left.start_time and left.end_time and right.start_time and right.end_time
    assert left.start_time < right.end_time and right.start_time < left.end_time
    assert join.start_time and join.start_time >= max(left.end_time, right.end_time)
    assert await controller.log("left") == "saw right\n"
    assert await controller.log("join") == "joined\n"


async def test_failure_runs_the_handler_and_skips_the_rest(
    controller: Controller, start_runner: StartRunner
) -> None:
    await controller.create_run(
        [
            {"name": "build", "run": "echo compiling\nexit 3"},
            {
                "name": "notify",
                "run": "echo build failed",
                "condition": 'steps.build.status == "failed"',
            },
            {"name": "deploy", "run": "echo deploying"},
            {
                "name": "celebrate",
                "run": "echo yay",
                "condition": 'inline.steps.build.status == "success"',
            },
        ]
    )
    runner = await start_runner(controller)
    assert await runner.wait() == 1

    run = await controller.run()
    assert phases(run) == {
        "build": "failed",
        "notify": "success",
        "deploy": "skipped",
        "celebrate": "skipped",
    }
    build = run.status.step("build")
    assert build is not None and build.exit_code == 3
    assert "exited with code 3" in build.message
    assert await controller.log("notify") == "build failed\n"
    assert await controller.log("deploy") == ""


async def test_a_step_that_exceeds_its_timeout_is_killed(
    controller: Controller, start_runner: StartRunner, tmp_path: Path
) -> None:
    await controller.create_run(
        [
            {
                "name": "slow",
                "run": "echo begin\n(sleep 30; touch late-child) &\nsleep 30\ntouch late",
                "timeout": "500ms",
            },
        ]
    )
    started = time.monotonic()
    runner = await start_runner(controller)
    assert await runner.wait() == 1
    assert time.monotonic() - started < 15

    slow = (await controller.run()).status.step("slow")
    assert slow is not None and slow.phase == "failed"
    assert "timed out after 0.5s" in slow.message
    assert await controller.log("slow") == "begin\n"
    assert not (tmp_path / "work" / "late").exists()


async def test_a_failing_step_is_retried(controller: Controller, start_runner: StartRunner) -> None:
    script = (
        "count=$(cat attempts 2>/dev/null || echo 0)\n"
        "count=$((count + 1)); echo $count > attempts\n"
        'echo "attempt $count"\n'
        '[ "$count" -ge 2 ]'
    )
    await controller.create_run([{"name": "flaky", "run": script, "retries": 2}])
    runner = await start_runner(controller)
    assert await runner.wait() == 0, runner.stderr_text

    flaky = (await controller.run()).status.step("flaky")
    assert flaky is not None and flaky.phase == "success" and flaky.attempts == 2
    assert await controller.log("flaky") == "attempt 1\nattempt 2\n"
    assert "attempt 1 of 3 exited with code 1; retrying" in await controller.log("flaky", "stderr")


async def test_variable_values_are_printed_never_run(
    controller: Controller, start_runner: StartRunner, tmp_path: Path
) -> None:
    pwned = tmp_path / "pwned"
    hostile = {
        "subshell": f"$(touch {pwned})",
        "quotes": f"'; touch {pwned}; '",
        "doubles": f'"; touch {pwned}; echo "',
        "backticks": f"`touch {pwned}`",
        "trigger.git_commit_message": f"fix\n$(touch {pwned}) && touch {pwned}",
    }
    script = (
        'echo "${var.subshell}"\n'
        "echo ${var.quotes}\n"
        'echo "${var.doubles}"\n'
        'echo "${var.backticks}"\n'
        'printf "%s|" "${var.trigger.git_commit_message}"\n'
        'printf "%s\\n" "$NP_VAR_SUBSHELL"\n'
        'echo "$NP_TRIGGER_GIT_COMMIT_MESSAGE" | tail -n 1'
    )
    await controller.create_run(
        [{"name": "echo", "run": script}],
        variables=hostile,
        flow_variables=[{"name": name} for name in hostile],
    )
    runner = await start_runner(controller)
    assert await runner.wait() == 0, runner.stderr_text

    assert not pwned.exists()
    assert await controller.log("echo") == (
        f"$(touch {pwned})\n"
        f"'; touch {pwned}; '\n"
        f'"; touch {pwned}; echo "\n'
        f"`touch {pwned}`\n"
        f"fix\n$(touch {pwned}) && touch {pwned}|"
        f"$(touch {pwned})\n"
        f"$(touch {pwned}) && touch {pwned}\n"
    )


async def test_reports_survive_an_unreachable_controller(
    controller: Controller, start_runner: StartRunner, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    await controller.create_run(
        [
            {"name": "first", "run": "for i in $(seq 1 50); do echo line $i; done"},
            {
                "name": "second",
                "run": (
                    "echo waiting\n"
                    "for i in $(seq 1 400); do [ -f release ] && break; sleep 0.05; done\n"
                    "for i in $(seq 51 100); do echo line $i; done"
                ),
            },
        ]
    )
    # The runner starts while the controller is down, and must keep trying.
    await controller.stop()
    runner = await start_runner(controller, work_dir=work)
    await runner.wait_for_stderr("controller unreachable, retrying")
    await controller.start()

    # Mid-run, the controller goes away again; the runner buffers until it is back.
    await wait_for_phase(controller, "second", "running")
    await controller.stop()
    failures = runner.stderr_text.count("controller unreachable, retrying")
    (work / "release").touch()
    await runner.wait_for_stderr("controller unreachable, retrying", count=failures + 1)
    await controller.start()
    assert await runner.wait() == 0, runner.stderr_text

    assert phases(await controller.run()) == {"first": "success", "second": "success"}
    assert await controller.log("first") == "".join(f"line {i}\n" for i in range(1, 51))
    assert await controller.log("second") == "waiting\n" + "".join(
        f"line {i}\n" for i in range(51, 101)
    )


async def test_sigterm_kills_the_steps_and_reports_them_cancelled(
    controller: Controller, start_runner: StartRunner, tmp_path: Path
) -> None:
    await controller.create_run(
        [
            {
                "name": "long",
                "run": "echo started\nsleep 60\ntouch finished",
            },
            {"name": "after", "run": "echo never"},
        ]
    )
    runner = await start_runner(controller)
    await wait_for_phase(controller, "long", "running")
    async with asyncio.timeout(DEADLINE):
        while "started" not in await controller.log("long"):
            await asyncio.sleep(0.02)
    runner.process.send_signal(signal.SIGTERM)
    assert await runner.wait() == 1

    run = await controller.run()
    assert phases(run) == {"long": "cancelled", "after": "cancelled"}
    assert not (tmp_path / "work" / "finished").exists()


async def test_a_cancelled_run_stops_its_runner(
    controller: Controller, start_runner: StartRunner
) -> None:
    await controller.create_run(
        [{"name": "long", "run": "for i in $(seq 1 600); do echo tick; sleep 0.1; done"}]
    )
    runner = await start_runner(controller)
    await wait_for_phase(controller, "long", "running")
    run = await controller.run()
    cancelled = run.model_copy(deep=True)
    cancelled.spec.cancel = True
    await controller.store.update(cancelled)
    assert await runner.wait() == 1
    long = (await controller.run()).status.step("long")
    assert long is not None and long.phase == "cancelled"


async def test_a_wrong_token_is_refused(controller: Controller, start_runner: StartRunner) -> None:
    await controller.create_run([{"name": "only", "run": "echo hi"}])
    runner = await start_runner(controller, token="0" * 64)
    assert await runner.wait() == 2
    assert "Unauthorized" in runner.stderr_text or "401" in runner.stderr_text
    assert phases(await controller.run()) == {}


async def test_a_printed_line_reaches_a_tail_client_quickly(
    controller: Controller, start_runner: StartRunner
) -> None:
    # The step prints its clock 20 times; a `logs -f`-style client notes when each line lands.
    script = "for i in $(seq 1 20); do date +%s.%N; sleep 0.05; done"
    await controller.create_run([{"name": "ticks", "run": script}])
    runner = await start_runner(controller)
    latencies: list[float] = []
    async with (
        aiohttp.ClientSession(controller.address) as session,
        session.get("/v1/runs/01run/logs", params={"step_id": "ticks", "tail": "true"}) as response,
    ):
        async with asyncio.timeout(DEADLINE):
            async for line in response.content:
                latencies.append(time.time() - float(line))
    assert await runner.wait() == 0, runner.stderr_text
    assert len(latencies) == 20
    latencies.sort()
    # p90 rather than the maximum: the machine running the tests is shared and busy.
    assert latencies[17] < 0.25, latencies


async def test_a_restarted_runner_skips_finished_steps_and_continues_the_sequence(
    controller: Controller, start_runner: StartRunner
) -> None:
    run = await controller.create_run(
        [{"name": "done", "run": "echo again"}, {"name": "todo", "run": "echo todo"}]
    )
    finished = run.model_copy(deep=True)
    finished.status.steps = [
        StepStatus(name="done", phase="success", exit_code=0, attempts=1),
        StepStatus(name="todo"),
    ]
    await controller.store.update_status(finished)
    await controller.log_store.set_report_seq("default", "01run", 41)

    runner = await start_runner(controller)
    assert await runner.wait() == 0, runner.stderr_text
    assert phases(await controller.run()) == {"done": "success", "todo": "success"}
    assert await controller.log("done") == ""
    assert await controller.log("todo") == "todo\n"
    assert await controller.log_store.report_seq("default", "01run") > 41


def test_the_token_secret_survives_a_restart(tmp_path: Path) -> None:
    first = load_or_create_secret(tmp_path / "data")
    assert load_or_create_secret(tmp_path / "data") == first
    assert (tmp_path / "data" / "runner-token.key").stat().st_mode & 0o777 == 0o600
    token = runner_token(first, "default", "01run")
    assert len(token) == 64
    assert token != runner_token(first, "default", "01other")
    assert token != runner_token(first, "other", "01run")


async def test_missing_configuration_is_named(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nomad_pipeline.runner",
        env={"PATH": os.environ["PATH"], "NP_CONTROLLER_ADDR": "http://127.0.0.1:1"},
        cwd=tmp_path,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(DEADLINE):
        _, stderr = await process.communicate()
    assert process.returncode == 2
    assert b"environment variable NP_RUN_NAMESPACE is required" in stderr
