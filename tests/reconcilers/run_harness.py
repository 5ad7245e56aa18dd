"""Helpers of the run reconciler tests: a dev agent + controller stack, flows, and waiting."""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from shell_jobs import shell_job

from nomad_pipeline.app import ControllerApp, ControllerConfig
from nomad_pipeline.devagent.server import DevAgent, DevAgentConfig
from nomad_pipeline.nomad.client import NomadClient
from nomad_pipeline.resources.kinds import TERMINAL_PHASES, Flow, Run
from nomad_pipeline.resources.meta import ObjectMeta
from nomad_pipeline.store.interface import Store

DEADLINE_SECONDS = 30.0


@dataclass
class Stack:
    address: str
    nomad_address: str
    app: ControllerApp
    nomad: NomadClient
    http: aiohttp.ClientSession
    data_dir: Path

    async def create_flow(self, name: str, spec: dict[str, Any]) -> Flow:
        flow = Flow(metadata=ObjectMeta(name=name), spec=spec)
        created: Flow = await self.app.store.create(flow)
        return created

    async def start_run(self, flow: str, variables: dict[str, Any] | None = None) -> str:
        async with self.http.post(
            f"{self.address}/v1/flows/{flow}/run", json={"variables": variables or {}}
        ) as response:
            body = await response.json()
            assert response.status == 201, body
            run_id: str = body["run_id"]
            return run_id

    async def run(self, name: str) -> Run:
        run: Run = await self.app.store.get(Run, "default", name)
        return run

    async def wait_run(
        self,
        name: str,
        until: Callable[[Run], bool] | None = None,
        deadline: float = DEADLINE_SECONDS,
    ) -> Run:
        """Poll the store (with a deadline) until ``until`` holds; default: the run ended."""
        return await wait_run_in_store(self.app.store, name, until, deadline)


async def wait_run_in_store(
    store: Store,
    name: str,
    until: Callable[[Run], bool] | None = None,
    deadline: float = DEADLINE_SECONDS,
) -> Run:
    """Poll ``store`` (with a deadline) until ``until`` holds for run ``name``; default: ended."""
    check = until or (lambda run: run.status.phase in TERMINAL_PHASES)
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while True:
        run = await store.get(Run, "default", name)
        if check(run):
            return run
        if loop.time() > end:
            raise AssertionError(f"run {name} did not get there in time: {run.status!r}")
        await asyncio.sleep(0.02)


async def start_stack(
    tmp_path: Path, *, http_addr: str = "127.0.0.1:0", advertise_addr: str | None = None
) -> AsyncIterator[Stack]:
    agent = DevAgent(DevAgentConfig(port=0, data_dir=tmp_path / "nomad"))
    nomad_address = await agent.start()
    app = ControllerApp(
        ControllerConfig(
            data_dir=tmp_path / "controller",
            http_addr=http_addr,
            nomad_addr=nomad_address,
            nomad_token="",
            state_backend="dev",
            advertise_addr=advertise_addr,
        )
    )
    try:
        address = await app.start()
        async with aiohttp.ClientSession() as http, NomadClient(nomad_address) as nomad:
            yield Stack(address, nomad_address, app, nomad, http, tmp_path / "controller")
    finally:
        await app.stop()
        await agent.stop()


async def wait_for(what: str, check: Callable[[], bool]) -> None:
    """Poll ``check()`` with a deadline."""
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE_SECONDS
    while not check():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def spec_step(name: str, script: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "job": {"json": shell_job(script)}, **extra}


def quoted(text: str) -> str:
    return shlex.quote(text)
