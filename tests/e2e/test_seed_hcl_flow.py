"""The seed's HCL format end to end: ``apply -f`` seed-format files, ``run --wait`` them.

The files follow the seed's examples (a specification cascade with ``name_format`` and a
failure handler, and an inline flow with a handler step), adapted to ``raw_exec`` so they run
on the dev agent.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from runs_e2e_harness import E2E, start_e2e

pytestmark = pytest.mark.timeout(120)

NAMESPACE_HCL = """
namespace {
  id          = "seed"
  description = "the seed's examples, adapted to raw_exec"
}
"""

SPECIFICATION_FLOW_HCL = """
flow "job-cascade" {
  namespace = "seed"

  variable "end_msg" {
    type    = string
    default = "step completed successfully"
  }

  variable "step2_script" {
    type    = string
    default = "echo step2 done"
  }

  specification "step1" {
    job {
      name_format = "${nomad_pipeline.run_id}-step1"
      path        = "./jobs/step1.nomad.hcl"

      variables = {
        step_1_end_msg = "end_msg"
      }
    }
  }

  specification "step2" {
    job {
      name_format = "${nomad_pipeline.run_id}-second"
      path        = "./jobs/step2.nomad.hcl"

      variables = {
        step_2_script = "step2_script"
      }
    }
  }

  specification "step3" {
    job {
      name_format = "${nomad_pipeline.run_id}-step3"
      path        = "./jobs/step1.nomad.hcl"

      variables = {
        step_1_end_msg = "end_msg"
      }
    }
  }

  specification "step4-conditional" {
    condition = "ANY_FAILED"

    job {
      path = "./jobs/handler.nomad.hcl"
    }
  }
}
""".replace(
    # The seed's condition, one line in HCL: any of the first three steps failed.
    "ANY_FAILED",
    " || ".join(
        f'specifications.{step}.status == \\"failed\\"' for step in ("step1", "step2", "step3")
    ),
)

STEP1_JOBSPEC = """
variable "step_1_end_msg" {}

job "step1" {
  type = "batch"
  group "host" {
    task "echo" {
      driver = "raw_exec"

      config {
        command = "/bin/echo"
        args    = [var.step_1_end_msg]
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
"""

STEP2_JOBSPEC = """
variable "step_2_script" {
  type = string
}

job "step2" {
  type = "batch"
  group "host" {
    task "script" {
      driver = "raw_exec"

      config {
        command = "/bin/sh"
        args    = ["-c", var.step_2_script]
      }
    }
  }
}
"""

HANDLER_JOBSPEC = """
job "step4" {
  type = "batch"
  group "host" {
    task "notify" {
      driver = "raw_exec"

      config {
        command = "/bin/echo"
        args    = ["a step failed"]
      }
    }
  }
}
"""

INLINE_FLOW_HCL = """
flow "seed-inline" {
  namespace = "seed"

  variable "build_exit" {
    type    = number
    default = 0
  }

  inline "job" {
    runner {
      nomad_on_demand {
        namespace = "default"

        resource {
          cpu    = 100
          memory = 128
        }
      }
    }

    step "a" {
      run = <<EOH
echo "building" > build.log
exit ${var.build_exit}
EOH
    }

    step "b" {
      condition = "inline.steps.a.status == \\"failed\\""
      run       = <<EOH
echo "a failed: $(cat build.log)"
EOH
    }
  }
}
"""


@pytest.fixture
async def e2e(tmp_path: Path) -> AsyncIterator[E2E]:
    seed = tmp_path / "seed"
    (seed / "jobs").mkdir(parents=True)
    (seed / "namespace.hcl").write_text(NAMESPACE_HCL)
    (seed / "flow.hcl").write_text(SPECIFICATION_FLOW_HCL)
    (seed / "inline.hcl").write_text(INLINE_FLOW_HCL)
    (seed / "jobs" / "step1.nomad.hcl").write_text(STEP1_JOBSPEC)
    (seed / "jobs" / "step2.nomad.hcl").write_text(STEP2_JOBSPEC)
    (seed / "jobs" / "handler.nomad.hcl").write_text(HANDLER_JOBSPEC)
    async for running in start_e2e(tmp_path):
        for name in ("namespace.hcl", "flow.hcl", "inline.hcl"):
            applied = await running.cli("apply", "-f", str(seed / name))
            assert applied.code == 0, applied
        yield running


async def run_flow(e2e: E2E, flow: str, *variables: str) -> tuple[int, dict[str, Any]]:
    """``run --wait`` through the CLI: its exit code and the finished run's JSON."""
    arguments = [part for variable in variables for part in ("--var", variable)]
    result = await e2e.cli("run", flow, "-n", "seed", *arguments, "--wait")
    run_id = result.out.splitlines()[0]
    shown = await e2e.cli("get", "run", run_id, "-n", "seed", "-o", "json")
    assert shown.code == 0, shown
    run: dict[str, Any] = json.loads(shown.out)
    assert run["metadata"]["name"] == run_id
    return result.code, run


def steps(run: dict[str, Any]) -> list[tuple[str, str]]:
    return [(step["name"], step["phase"]) for step in run["status"]["steps"]]


async def nomad_job(e2e: E2E, job_id: str) -> dict[str, Any]:
    job, _ = await e2e.nomad.get_job(job_id)
    return job


async def test_specification_cascade_skips_the_handler_on_success(e2e: E2E) -> None:
    code, run = await run_flow(e2e, "job-cascade")
    assert code == 0, run["status"]
    run_id = run["metadata"]["name"]
    assert run["status"]["phase"] == "success"
    assert steps(run) == [
        ("step1", "success"),
        ("step2", "success"),
        ("step3", "success"),
        ("step4-conditional", "skipped"),
    ]
    job_ids = [step["nomad_job_id"] for step in run["status"]["steps"][:3]]
    assert job_ids == [f"{run_id}-step1", f"{run_id}-second", f"{run_id}-step3"]
    for job_id in job_ids:
        job = await nomad_job(e2e, job_id)
        assert job["ID"] == job["Name"] == job_id
        assert job["TaskGroups"][0]["Tasks"][0]["Driver"] == "raw_exec"
    # The flow variable reached the jobspec variable through the seed's mapping.
    step1 = await nomad_job(e2e, f"{run_id}-step1")
    assert step1["TaskGroups"][0]["Tasks"][0]["Config"]["args"] == ["step completed successfully"]
    handler = run["status"]["steps"][3]
    assert not handler["nomad_job_id"]


async def test_specification_cascade_runs_the_handler_on_failure(e2e: E2E) -> None:
    code, run = await run_flow(e2e, "job-cascade", "step2_script=echo broken; exit 3")
    assert code != 0
    run_id = run["metadata"]["name"]
    assert run["status"]["phase"] == "failed"
    assert steps(run) == [
        ("step1", "success"),
        ("step2", "failed"),
        ("step3", "skipped"),
        ("step4-conditional", "success"),
    ]
    step2 = run["status"]["steps"][1]
    assert step2["exit_code"] == 3
    assert step2["nomad_job_id"] == f"{run_id}-second"
    handler = run["status"]["steps"][3]
    # Without name_format, the job ID is <run-id>-<step>.
    assert handler["nomad_job_id"] == f"{run_id}-step4-conditional"
    assert (await nomad_job(e2e, handler["nomad_job_id"]))["Status"] == "dead"


async def test_seed_inline_flow_runs_its_handler_only_after_a_failure(e2e: E2E) -> None:
    code, run = await run_flow(e2e, "seed-inline")
    assert code == 0, run["status"]
    assert run["status"]["phase"] == "success"
    assert steps(run) == [("a", "success"), ("b", "skipped")]
    runner_job = await nomad_job(e2e, f"job-{run['metadata']['name']}")
    assert runner_job["TaskGroups"][0]["Tasks"][0]["Driver"] == "raw_exec"

    code, run = await run_flow(e2e, "seed-inline", "build_exit=4")
    assert code != 0
    assert run["status"]["phase"] == "failed"
    assert steps(run) == [("a", "failed"), ("b", "success")]
    assert run["status"]["steps"][0]["exit_code"] == 4
    # The runner reports a step's output before its end, so the log is complete by now.
    logs = await e2e.cli("logs", run["metadata"]["name"], "b", "-n", "seed")
    assert logs.code == 0, logs
    assert logs.out == "a failed: building\n"
