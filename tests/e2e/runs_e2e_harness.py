"""End-to-end harness of the run tests: a dev agent, the controller as a real subprocess
(``nomad-pipeline server --state-backend nomad-vars``), and the CLI as a subprocess."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from controller_process import CLI, ControllerProcess

from nomad_pipeline.devagent.server import DevAgent, DevAgentConfig
from nomad_pipeline.nomad.client import NomadClient

TERMINAL = {"success", "failed", "cancelled", "skipped"}


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@dataclass
class E2E:
    controller: ControllerProcess
    nomad: NomadClient
    http: aiohttp.ClientSession
    tmp_path: Path

    async def cli(self, *argv: str, timeout: float = 60.0) -> CliResult:
        process = await asyncio.create_subprocess_exec(
            CLI,
            "--addr",
            self.controller.address,
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(timeout):
            out, err = await process.communicate()
        assert process.returncode is not None
        return CliResult(process.returncode, out.decode(), err.decode())

    async def apply(self, manifest: str, name: str = "flow.yaml") -> None:
        path = self.tmp_path / name
        path.write_text(manifest)
        result = await self.cli("apply", "-f", str(path))
        assert result.code == 0, result

    async def get_run(self, run_id: str) -> dict[str, Any]:
        result = await self.cli("get", "run", run_id, "-o", "json")
        assert result.code == 0, result
        run: dict[str, Any] = json.loads(result.out)
        return run

    async def api_get_run(self, run_id: str) -> dict[str, Any]:
        url = (
            f"{self.controller.address}/apis/nomad-pipeline.io/v1/namespaces/default/runs/{run_id}"
        )
        async with self.http.get(url) as response:
            assert response.status == 200, await response.text()
            run: dict[str, Any] = await response.json()
            return run

    async def wait_run(
        self, run_id: str, *, deadline: float = 60.0, phases: set[str] = TERMINAL
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        run: dict[str, Any] = {}
        while True:
            try:
                run = await self.api_get_run(run_id)
                if run.get("status", {}).get("phase") in phases:
                    return run
            except aiohttp.ClientError:
                pass
            if loop.time() > end:
                raise AssertionError(
                    f"run {run_id} did not reach {sorted(phases)} in time: {run.get('status')}"
                )
            await asyncio.sleep(0.05)


async def start_e2e(tmp_path: Path) -> AsyncIterator[E2E]:
    agent = DevAgent(DevAgentConfig(port=0, data_dir=tmp_path / "nomad"))
    nomad_address = await agent.start()
    controller = ControllerProcess(nomad_address, tmp_path / "controller")
    try:
        async with aiohttp.ClientSession() as http, NomadClient(nomad_address) as nomad:
            await controller.start(http)
            yield E2E(controller, nomad, http, tmp_path)
    finally:
        await controller.stop()
        await agent.stop()


RAW_EXEC_JOBSPEC = """
variable "script" {
  type = string
}

job "step" {
  type = "batch"
  group "step" {
    task "main" {
      driver = "raw_exec"
      config {
        command = "/bin/sh"
        args    = ["-c", var.script]
      }
    }
  }
}
"""
