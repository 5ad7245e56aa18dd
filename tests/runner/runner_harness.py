"""Helpers of the runner tests: a real controller API and the real runner executable."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nomad_pipeline.controller.api import logs, runnerapi
from nomad_pipeline.controller.api.app import ApiServer, build_api, start_api
from nomad_pipeline.controller.logstore import LogStore
from nomad_pipeline.controller.runnertoken import load_or_create_secret
from nomad_pipeline.resources.kinds import FlowSpec, Run, RunSpec
from nomad_pipeline.resources.meta import ObjectMeta
from nomad_pipeline.store.memory import MemoryStore

RUNNER = Path(sys.executable).parent / "nomad-pipeline-runner"
DEADLINE = 30.0


@dataclass
class Controller:
    store: MemoryStore
    data_dir: Path
    log_store: LogStore
    port: int
    server: ApiServer | None = None

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def secret(self) -> bytes:
        return load_or_create_secret(self.data_dir)

    async def start(self) -> None:
        app = build_api(
            self.store,
            log_root=self.data_dir / "logs",
            extra_routes=[logs.provide_log_store(self.log_store), logs.setup, runnerapi.setup],
        )
        self.server = await start_api(app, port=self.port, shutdown_timeout=1.0)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None

    async def create_run(
        self,
        steps: list[dict[str, Any]],
        *,
        name: str = "01run",
        variables: dict[str, Any] | None = None,
        flow_variables: list[dict[str, Any]] | None = None,
    ) -> Run:
        spec = FlowSpec.model_validate(
            {"variables": flow_variables or [], "inline": {"steps": steps}}
        )
        run = Run(
            metadata=ObjectMeta(name=name, namespace="default"),
            spec=RunSpec(flow="flow", flow_spec=spec, variables=variables or {}),
        )
        return await self.store.create(run)

    async def run(self, name: str = "01run") -> Run:
        return await self.store.get(Run, "default", name)

    async def log(self, step: str, stream: str = "stdout", name: str = "01run") -> str:
        data = await self.log_store.read("default", name, step, stream)  # type: ignore[arg-type]
        return data.decode()


@dataclass
class RunnerProcess:
    process: asyncio.subprocess.Process
    stderr_text: str = ""
    stdout_text: str = ""
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _readers: list[asyncio.Task[None]] = field(default_factory=list)

    async def _read(self, stream: asyncio.StreamReader, attribute: str) -> None:
        while chunk := await stream.read(4096):
            async with self._changed:
                setattr(self, attribute, getattr(self, attribute) + chunk.decode())
                self._changed.notify_all()

    async def wait_for_stderr(self, text: str, *, count: int = 1) -> None:
        async with asyncio.timeout(DEADLINE), self._changed:
            await self._changed.wait_for(lambda: self.stderr_text.count(text) >= count)

    async def wait(self) -> int:
        async with asyncio.timeout(DEADLINE):
            code = await self.process.wait()
            await asyncio.gather(*self._readers)
        return code
