"""Inline flows on a real dev agent: the runner job, shared work dir, handlers, injection."""

from __future__ import annotations

import uuid
from pathlib import Path

from ports import free_port
from run_harness import Stack, start_stack

from nomad_pipeline.reconcilers.inlinejob import ENV_CONTROLLER_ADDR


def log_of(stack: Stack, run_id: str, step: str, stream: str = "stdout") -> Path:
    return stack.data_dir / "logs" / "runs" / "default" / run_id / step / "logs" / f"{stream}.log"


async def test_inline_flow_runs_steps_in_one_allocation(stack: Stack) -> None:
    await stack.create_flow(
        "inline",
        {
            "inline": {
                "steps": [
                    {"name": "write", "run": "echo shared > file.txt"},
                    {"name": "read", "run": "cat file.txt"},
                    {"name": "fail", "run": "exit 4"},
                    {"name": "after", "run": "echo never"},
                    {
                        "name": "handler",
                        "run": "echo handled",
                        "condition": 'steps.fail.status == "failed"',
                    },
                ]
            }
        },
    )
    run_id = await stack.start_run("inline")
    run = await stack.wait_run(run_id)
    phases = {s.name: s.phase for s in run.status.steps}
    assert phases == {
        "write": "success",
        "read": "success",
        "fail": "failed",
        "after": "skipped",
        "handler": "success",
    }, run.status
    assert run.status.phase == "failed"
    fail = run.status.step("fail")
    assert fail is not None and fail.exit_code == 4
    assert {s.nomad_job_id for s in run.status.steps} == {f"inline-{run_id}"}
    read_log = log_of(stack, run_id, "read")
    await stack.wait_run(run_id, until=lambda _r: read_log.exists())
    assert read_log.read_bytes() == b"shared\n"


async def test_hostile_variable_in_an_inline_flow(stack: Stack) -> None:
    marker = Path(f"/tmp/pwned-{uuid.uuid4().hex}")
    await stack.create_flow(
        "inline-inject",
        {
            "variables": [{"name": "msg", "type": "string", "required": True}],
            "inline": {
                "steps": [
                    {"name": "tpl", "run": "printf '%s\\n' ${var.msg}"},
                    {"name": "quoted", "run": 'echo "said: ${var.msg}"'},
                    {"name": "env", "run": 'printf "%s\\n" "$NP_VAR_MSG"'},
                ]
            },
        },
    )
    for value in (f"$(touch {marker})", f"'; touch {marker}; '", f"`touch {marker}`"):
        run_id = await stack.start_run("inline-inject", {"msg": value})
        run = await stack.wait_run(run_id)
        assert run.status.phase == "success", run.status
        for step, expected in (
            # The runner turns ${var.msg} into "${NP_VAR_MSG}": one word, never run.
            ("tpl", f"{value}\n"),
            ("quoted", f"said: {value}\n"),
            ("env", f"{value}\n"),
        ):
            path = log_of(stack, run_id, step)
            await stack.wait_run(run_id, until=lambda _r, p=path: p.exists())
            assert path.read_text() == expected, step
        assert not marker.exists()


async def test_runners_reach_the_controller_at_its_advertised_address(tmp_path: Path) -> None:
    port = free_port()
    # Bound on every interface, advertised under a name: runners get the name, not 0.0.0.0.
    advertised = f"http://localhost:{port}"
    async for stack in start_stack(
        tmp_path, http_addr=f"0.0.0.0:{port}", advertise_addr=advertised
    ):
        await stack.create_flow("where", {"inline": {"steps": [{"name": "hi", "run": "echo hi"}]}})
        run_id = await stack.start_run("where")
        run = await stack.wait_run(run_id)
        assert run.status.phase == "success", run.status
        job, _ = await stack.nomad.get_job(f"where-{run_id}")
        env = job["TaskGroups"][0]["Tasks"][0]["Env"]
        assert env[ENV_CONTROLLER_ADDR] == advertised
