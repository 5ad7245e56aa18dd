"""Variables are data, never code: hostile values reach steps literally, nothing runs."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from run_harness import Stack

HCL_JOBSPEC = """
variable "msg" {
  type = string
}

job "echo" {
  type = "batch"
  group "g" {
    task "main" {
      driver = "raw_exec"
      config {
        command = "/bin/sh"
        args    = ["-c", "printf 'env=%s\\\\n' \\"$NP_VAR_MSG\\"; printf 'arg=%s\\\\n' \\"$1\\"",
                   "sh", var.msg]
      }
    }
  }
}
"""


def hostile_values(marker: Path) -> list[str]:
    return [
        f"$(touch {marker})",
        f"'; touch {marker}; '",
        # (HCL's %{ directives are escaped too, as %%{; the dev agent's HCL parser does not
        # unescape %%{ yet, so that case is covered by test_specjobs' hcl_literal table.)
        f'"; touch {marker}; " ${{var.msg}} `touch {marker}` \\',
    ]


@pytest.mark.parametrize("case", [0, 1, 2])
async def test_hostile_variable_in_a_specification_flow(stack: Stack, case: int) -> None:
    marker = Path(f"/tmp/pwned-{uuid.uuid4().hex}")
    value = hostile_values(marker)[case]
    await stack.create_flow(
        "inject",
        {
            "variables": [{"name": "msg", "type": "string", "required": True}],
            "specification": {
                "steps": [
                    {
                        "name": "echo",
                        "job": {"hcl": HCL_JOBSPEC, "variables": {"msg": "${var.msg}"}},
                    }
                ]
            },
        },
    )
    run_id = await stack.start_run("inject", {"msg": value})
    run = await stack.wait_run(run_id)
    assert run.status.phase == "success", run.status
    stdout = stack.data_dir / "logs" / "runs" / "default" / run_id / "echo" / "logs" / "stdout.log"
    expected = f"env={value}\narg={value}\n".encode()
    await stack.wait_run(
        run_id, until=lambda _r: stdout.exists() and stdout.read_bytes() == expected
    )
    assert not marker.exists()
