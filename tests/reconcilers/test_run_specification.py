"""Specification flows on a real dev agent: order, DAG with failure handler, retries, timeouts."""

from __future__ import annotations

from pathlib import Path

from run_harness import Stack, spec_step
from shell_jobs import shell_job

from nomad_pipeline.resources.kinds import Run, RunSpec
from nomad_pipeline.resources.meta import ObjectMeta
from nomad_pipeline.resources.ulid import new_ulid


async def test_sequential_flow_succeeds(stack: Stack) -> None:
    await stack.create_flow(
        "seq",
        {"specification": {"steps": [spec_step("one", "echo one"), spec_step("two", "echo two")]}},
    )
    run_id = await stack.start_run("seq")
    run = await stack.wait_run(run_id)
    assert run.status.phase == "success", run.status
    assert [s.phase for s in run.status.steps] == ["success", "success"]
    assert all(s.exit_code == 0 for s in run.status.steps)
    assert run.status.steps[0].nomad_job_id == f"{run_id}-one"


async def test_step_logs_are_copied_into_the_log_store(stack: Stack) -> None:
    await stack.create_flow(
        "logs",
        {"specification": {"steps": [spec_step("talk", "echo out-line; echo err-line >&2")]}},
    )
    run_id = await stack.start_run("logs")
    await stack.wait_run(run_id)
    step_dir = stack.data_dir / "logs" / "runs" / "default" / run_id / "talk" / "logs"
    run = await stack.wait_run(
        run_id,
        # The two streams are copied independently: either file may appear first.
        until=lambda _run: (
            (step_dir / "stderr.log").exists()
            and (step_dir / "stdout.log").exists()
            and b"err-line" in (step_dir / "stderr.log").read_bytes()
            and b"out-line" in (step_dir / "stdout.log").read_bytes()
        ),
    )
    assert run.status.phase == "success"
    assert (step_dir / "stdout.log").read_bytes() == b"out-line\n"


async def test_dag_failing_branch_runs_the_failure_handler(stack: Stack) -> None:
    await stack.create_flow(
        "dag",
        {
            "specification": {
                "steps": [
                    spec_step("checkout", "true"),
                    spec_step("lint", "true", needs=["checkout"]),
                    spec_step("unit", "exit 3", needs=["checkout"]),
                    spec_step("package", "true", needs=["lint", "unit"]),
                    spec_step(
                        "on_failure",
                        "echo handled",
                        needs=["package"],
                        condition='steps.unit.status == "failed"',
                    ),
                ]
            }
        },
    )
    run_id = await stack.start_run("dag")
    run = await stack.wait_run(run_id)
    phases = {s.name: s.phase for s in run.status.steps}
    assert phases == {
        "checkout": "success",
        "lint": "success",
        "unit": "failed",
        "package": "skipped",
        "on_failure": "success",
    }
    unit = run.status.step("unit")
    assert unit is not None and unit.exit_code == 3
    assert "Exit Code: 3" in unit.message
    assert run.status.phase == "failed"


async def test_retries_run_new_attempts_with_new_jobs(stack: Stack, tmp_path: Path) -> None:
    marker = tmp_path / "count"
    # Fails twice, succeeds on the third attempt.
    script = (
        f"n=$(cat {marker} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {marker}; [ $n -ge 3 ]"
    )
    await stack.create_flow(
        "retry", {"specification": {"steps": [spec_step("flaky", script, retries=3)]}}
    )
    run_id = await stack.start_run("retry")
    run = await stack.wait_run(run_id)
    step = run.status.steps[0]
    assert (run.status.phase, step.phase, step.attempts) == ("success", "success", 3)
    assert step.nomad_job_id == f"{run_id}-flaky-a3"
    for job_id in (f"{run_id}-flaky", f"{run_id}-flaky-a2", f"{run_id}-flaky-a3"):
        job, _ = await stack.nomad.get_job(job_id)
        assert job["Version"] == 0


async def test_step_timeout_stops_the_job(stack: Stack) -> None:
    await stack.create_flow(
        "slow",
        {"specification": {"steps": [spec_step("sleepy", "sleep 30", timeout="1s")]}},
    )
    run_id = await stack.start_run("slow")
    run = await stack.wait_run(run_id, deadline=15)
    step = run.status.steps[0]
    assert (run.status.phase, step.phase) == ("failed", "failed")
    assert "timed out after 1s" in step.message
    job, _ = await stack.nomad.get_job(f"{run_id}-sleepy")
    assert job["Stop"] is True


async def test_cancel_mid_run_stops_every_job(stack: Stack) -> None:
    await stack.create_flow(
        "cancel",
        {"specification": {"steps": [spec_step("long", "sleep 30"), spec_step("next", "true")]}},
    )
    run_id = await stack.start_run("cancel")
    await stack.wait_run(
        run_id, until=lambda r: bool(r.status.steps) and r.status.steps[0].phase == "running"
    )
    async with stack.http.put(f"{stack.address}/v1/runs/{run_id}/cancel") as response:
        assert response.status == 200, await response.text()
    run = await stack.wait_run(run_id)
    assert run.status.phase == "cancelled"
    assert [s.phase for s in run.status.steps] == ["cancelled", "skipped"]
    job, _ = await stack.nomad.get_job(f"{run_id}-long")
    assert job["Stop"] is True
    async with stack.http.put(f"{stack.address}/v1/runs/{run_id}/cancel") as response:
        assert response.status == 409


async def test_placement_failure_fails_the_step_with_nomads_reason(stack: Stack) -> None:
    job = {
        "ID": "docker",
        "Type": "batch",
        "TaskGroups": [
            {
                "Name": "step",
                "Tasks": [{"Name": "main", "Driver": "docker", "Config": {"image": "alpine:3"}}],
            }
        ],
    }
    await stack.create_flow(
        "docker", {"specification": {"steps": [{"name": "boxed", "job": {"json": job}}]}}
    )
    run_id = await stack.start_run("docker")
    run = await stack.wait_run(run_id)
    step = run.status.steps[0]
    assert (run.status.phase, step.phase) == ("failed", "failed")
    assert "missing drivers" in step.message


async def test_seed_style_name_format_and_condition(stack: Stack) -> None:
    await stack.create_flow(
        "seed",
        {
            "specification": {
                "steps": [
                    {
                        "name": "step1",
                        "job": {
                            "json": shell_job("exit 1"),
                            "name_format": "${nomad_pipeline.run_id}-first",
                        },
                    },
                    spec_step(
                        "step2-conditional",
                        "echo step1 failed",
                        condition='specifications.step1.status == "failed"',
                    ),
                ]
            }
        },
    )
    run_id = await stack.start_run("seed")
    run = await stack.wait_run(run_id)
    first, handler = run.status.steps
    assert first.nomad_job_id == f"{run_id}-first"
    assert (first.phase, handler.phase, run.status.phase) == ("failed", "success", "failed")


async def _register_as_a_crashed_controller(stack: Stack, job_id: str, script: str) -> None:
    """A step's job on Nomad under its deterministic ID, never recorded in the run's status: what
    a controller killed between its register and its status write leaves behind."""
    await stack.nomad.register_job({**shell_job(script), "ID": job_id, "Name": job_id})


async def test_a_registered_but_unrecorded_job_is_adopted_not_registered_again(
    stack: Stack,
) -> None:
    flow = await stack.create_flow(
        "adopt", {"specification": {"steps": [spec_step("one", "echo fresh")]}}
    )
    run_id = new_ulid()
    await _register_as_a_crashed_controller(stack, f"{run_id}-one", "echo adopted")
    await stack.app.store.create(
        Run(metadata=ObjectMeta(name=run_id), spec=RunSpec(flow="adopt", flow_spec=flow.spec))
    )
    run = await stack.wait_run(run_id)
    assert run.status.phase == "success", run.status
    assert run.status.steps[0].nomad_job_id == f"{run_id}-one"
    job, _ = await stack.nomad.get_job(f"{run_id}-one")
    assert job["Version"] == 0
    evaluations, _ = await stack.nomad.job_evaluations(f"{run_id}-one")
    assert [e["TriggeredBy"] for e in evaluations] == ["job-register"]


async def test_cancel_stops_a_job_registered_but_never_recorded(stack: Stack) -> None:
    flow = await stack.create_flow(
        "orphan", {"specification": {"steps": [spec_step("long", "sleep 30")]}}
    )
    run_id = new_ulid()
    await _register_as_a_crashed_controller(stack, f"{run_id}-long", "sleep 30")
    await stack.app.store.create(
        Run(
            metadata=ObjectMeta(name=run_id),
            spec=RunSpec(flow="orphan", flow_spec=flow.spec, cancel=True),
        )
    )
    run = await stack.wait_run(run_id)
    assert run.status.phase == "cancelled", run.status
    job, _ = await stack.nomad.get_job(f"{run_id}-long")
    assert job["Stop"] is True
