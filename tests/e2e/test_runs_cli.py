"""Running flows end to end through the CLI: controller subprocess (nomad-vars backend) on a
dev agent; `apply`, `run --wait`, `cancel`, `get run -o json`."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from runs_e2e_harness import E2E, RAW_EXEC_JOBSPEC, start_e2e

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def e2e(tmp_path: Path) -> AsyncIterator[E2E]:
    (tmp_path / "step.nomad.hcl").write_text(RAW_EXEC_JOBSPEC)
    async for running in start_e2e(tmp_path):
        yield running


def spec_flow(name: str, steps: str, extra: str = "") -> str:
    return f"""
apiVersion: nomad-pipeline.io/v1
kind: Flow
metadata:
  name: {name}
spec:
{extra}
  specification:
    steps:
{steps}
"""


def step(name: str, script: str, extra: str = "") -> str:
    return f"""
      - name: {name}
        job:
          path: step.nomad.hcl
          variables:
            script: {script!r}
{extra}"""


async def test_sequential_flow_through_the_cli(e2e: E2E) -> None:
    await e2e.apply(spec_flow("seq", step("build", "echo built") + step("test", "echo tested")))
    result = await e2e.cli("run", "seq", "--wait")
    assert result.code == 0, result
    run_id = result.out.splitlines()[0]
    run = await e2e.get_run(run_id)
    status = run["status"]
    assert status["phase"] == "success"
    assert [(s["name"], s["phase"], s["exit_code"]) for s in status["steps"]] == [
        ("build", "success", 0),
        ("test", "success", 0),
    ]
    build = status["steps"][0]
    assert build["nomad_job_id"] == f"{run_id}-build"
    assert build["nomad_namespace"] == "default"
    assert build["attempts"] == 1
    assert build["alloc_id"] and build["start_time"] and build["end_time"]
    logs = await e2e.cli("logs", run_id, "build")
    assert logs.code == 0, logs
    assert "built" in logs.out


async def test_dag_with_failing_branch_and_handler(e2e: E2E) -> None:
    steps = (
        step("checkout", "true")
        + step("unit", "exit 2", "        needs: [checkout]\n")
        + step("lint", "true", "        needs: [checkout]\n")
        + step("package", "true", "        needs: [unit, lint]\n")
        + step(
            "notify",
            "echo unit failed",
            "        needs: [package]\n        condition: 'steps.unit.status == \"failed\"'\n",
        )
    )
    await e2e.apply(spec_flow("dag", steps))
    result = await e2e.cli("run", "dag", "--wait")
    assert result.code != 0
    run = await e2e.api_get_run(result.out.splitlines()[0])
    phases = {s["name"]: s["phase"] for s in run["status"]["steps"]}
    assert phases == {
        "checkout": "success",
        "unit": "failed",
        "lint": "success",
        "package": "skipped",
        "notify": "success",
    }
    assert run["status"]["phase"] == "failed"


async def test_cancel_mid_run(e2e: E2E) -> None:
    await e2e.apply(spec_flow("long", step("wait", "sleep 60") + step("after", "true")))
    result = await e2e.cli("run", "long")
    assert result.code == 0, result
    run_id = result.out.splitlines()[0]
    await e2e.wait_run(run_id, phases={"running"})
    loop = asyncio.get_running_loop()
    end = loop.time() + 30
    while (await e2e.api_get_run(run_id))["status"]["steps"][0].get("phase") != "running":
        assert loop.time() < end
        await asyncio.sleep(0.05)
    cancel = await e2e.cli("cancel", run_id)
    assert cancel.code == 0, cancel
    run = await e2e.wait_run(run_id)
    assert run["status"]["phase"] == "cancelled"
    job, _ = await e2e.nomad.get_job(f"{run_id}-wait")
    assert job["Stop"] is True
    again = await e2e.cli("cancel", run_id)
    assert again.code == 1 and "Conflict" in again.err


async def test_timeout_and_retries(e2e: E2E) -> None:
    marker = e2e.tmp_path / "attempts"
    flaky = f"n=$(cat {marker} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {marker}; [ $n -ge 2 ]"
    steps = step("flaky", flaky, "        retries: 2\n") + step(
        "slow", "sleep 60", "        timeout: 1s\n"
    )
    await e2e.apply(spec_flow("retry", steps))
    result = await e2e.cli("run", "retry", "--wait")
    assert result.code != 0
    run = await e2e.api_get_run(result.out.splitlines()[0])
    flaky_status, slow_status = run["status"]["steps"]
    assert (flaky_status["phase"], flaky_status["attempts"]) == ("success", 2)
    assert flaky_status["nomad_job_id"].endswith("-flaky-a2")
    assert slow_status["phase"] == "failed"
    assert "timed out" in slow_status["message"]


async def test_placement_failure_names_the_missing_driver(e2e: E2E) -> None:
    manifest = """
apiVersion: nomad-pipeline.io/v1
kind: Flow
metadata:
  name: docker
spec:
  specification:
    steps:
      - name: boxed
        job:
          hcl: |
            job "boxed" {
              type = "batch"
              group "g" {
                task "main" {
                  driver = "docker"
                  config {
                    image = "alpine:3"
                  }
                }
              }
            }
"""
    await e2e.apply(manifest)
    result = await e2e.cli("run", "docker", "--wait")
    assert result.code != 0
    run = await e2e.api_get_run(result.out.splitlines()[0])
    boxed = run["status"]["steps"][0]
    assert boxed["phase"] == "failed"
    assert "missing drivers" in boxed["message"]


async def test_variables_never_become_code(e2e: E2E) -> None:
    marker = Path(f"/tmp/pwned-{uuid.uuid4().hex}")
    manifest = """
apiVersion: nomad-pipeline.io/v1
kind: Flow
metadata:
  name: inject
spec:
  variables:
    - name: msg
      required: true
  specification:
    steps:
      - name: echo
        job:
          path: step.nomad.hcl
          variables:
            script: 'printf "%s\\n" "$NP_VAR_MSG"'
"""
    await e2e.apply(manifest)
    for value in (f"$(touch {marker})", f"'; touch {marker}; '"):
        result = await e2e.cli("run", "inject", "--var", f"msg={value}", "--wait")
        assert result.code == 0, result
        run_id = result.out.splitlines()[0]
        stdout = e2e.controller.data_dir / "logs/runs/default" / run_id / "echo/logs/stdout.log"
        await e2e.wait_run(run_id)
        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        while not (stdout.exists() and stdout.read_text() == f"{value}\n"):
            assert loop.time() < end, stdout.read_text() if stdout.exists() else "no log"
            await asyncio.sleep(0.05)
    assert not marker.exists()


async def test_unknown_variable_is_refused(e2e: E2E) -> None:
    await e2e.apply(spec_flow("vars", step("one", "true")))
    result = await e2e.cli("run", "vars", "--var", "nope=1")
    assert result.code == 1
    assert "nope" in result.err
