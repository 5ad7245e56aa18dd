"""Runs advance by blocking queries when Nomad's event stream is unavailable, and the event
stream takes over again once it is back.

A real dev agent sits behind a small HTTP proxy that refuses ``/v1/event/stream`` (as a cluster
with its event broker disabled, or a proxy that cuts long streams, would) and forwards every
other request, streams included.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from run_harness import spec_step, wait_for, wait_run_in_store

from nomad_pipeline.controller.admission import ensure_default_namespace
from nomad_pipeline.controller.manager import Manager
from nomad_pipeline.devagent.server import DevAgent, DevAgentConfig
from nomad_pipeline.nomad.client import NomadClient
from nomad_pipeline.reconcilers.run import RunSettings
from nomad_pipeline.reconcilers.runsetup import RunController, build_run_controller
from nomad_pipeline.resources.kinds import Flow, Run, RunSpec
from nomad_pipeline.resources.meta import ObjectMeta
from nomad_pipeline.resources.ulid import new_ulid
from nomad_pipeline.store.memory import MemoryStore

# Hop-by-hop and recomputed headers are not copied through the proxy.
_SKIPPED_HEADERS = {"content-length", "transfer-encoding", "connection", "content-encoding"}


@dataclass
class EventStreamGate:
    """A proxy to Nomad whose event stream can be refused."""

    target: str
    refuse_events: bool = True
    refused: int = 0
    session: aiohttp.ClientSession = field(init=False)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/v1/event/stream" and self.refuse_events:
            self.refused += 1
            return web.Response(status=500, text="event stream disabled by the test proxy")
        async with self.session.request(
            request.method,
            f"{self.target}{request.path_qs}",
            data=await request.read(),
            headers={k: v for k, v in request.headers.items() if k.lower() != "host"},
            timeout=aiohttp.ClientTimeout(total=None),
        ) as upstream:
            response = web.StreamResponse(
                status=upstream.status,
                headers={
                    k: v for k, v in upstream.headers.items() if k.lower() not in _SKIPPED_HEADERS
                },
            )
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response


@dataclass
class Stack:
    gate: EventStreamGate
    store: MemoryStore
    built: RunController
    nomad: NomadClient

    async def start_run(self, flow: Flow) -> str:
        name = new_ulid()
        spec = RunSpec(flow=flow.metadata.name, flow_spec=flow.spec)
        await self.store.create(Run(metadata=ObjectMeta(name=name), spec=spec))
        return name

    async def wait_run(self, name: str) -> Run:
        return await wait_run_in_store(self.store, name)

    async def transition_overheads(self, run: Run) -> list[float]:
        """Seconds from each step's allocation ending to the next step's job registered."""
        overheads: list[float] = []
        previous_end: int | None = None
        for step in run.status.steps:
            assert step.nomad_job_id is not None
            job, _ = await self.nomad.get_job(step.nomad_job_id)
            if previous_end is not None:
                overheads.append((int(job["SubmitTime"]) - previous_end) / 1e9)
            allocations, _ = await self.nomad.job_allocations(step.nomad_job_id)
            previous_end = max(int(a["ModifyTime"]) for a in allocations)
        return overheads


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    agent = DevAgent(DevAgentConfig(port=0, data_dir=tmp_path / "nomad"))
    nomad_address = await agent.start()
    gate = EventStreamGate(nomad_address)
    proxy = web.Application()
    proxy.router.add_route("*", "/{tail:.*}", gate.handle)
    # Cancelled with their client, so blocking queries do not hold the shutdown up.
    runner = web.AppRunner(proxy, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as gate.session:
            await site.start()
            port = runner.addresses[0][1]
            async with NomadClient(f"http://127.0.0.1:{port}") as nomad:
                store = MemoryStore()
                await store.start()
                await ensure_default_namespace(store)
                built = build_run_controller(
                    store,
                    nomad,
                    log_root=tmp_path / "logs",
                    settings=RunSettings(
                        controller_address=lambda: None, runner_secret=os.urandom(32)
                    ),
                )
                manager = Manager(built.runnables)
                running = asyncio.create_task(manager.run())
                try:
                    yield Stack(gate, store, built, nomad)
                finally:
                    manager.stop()
                    await running
                    await store.close()
    finally:
        await runner.cleanup()
        await agent.stop()


def four_steps(name: str) -> Flow:
    steps = [spec_step(f"s{index}", f"echo {index}") for index in range(4)]
    return Flow(metadata=ObjectMeta(name=name), spec={"specification": {"steps": steps}})


async def test_steps_advance_by_blocking_queries_without_the_event_stream(stack: Stack) -> None:
    events = stack.built.events
    # By six failures the stream is retried only every few seconds: a run that advanced only
    # when a retry re-read Nomad would take seconds per step.
    await wait_for("the event stream to fail six times", lambda: events.reconnects >= 6)
    assert events.fallback is not None
    flow = await stack.store.create(four_steps("fallback"))
    run = await stack.wait_run(await stack.start_run(flow))
    assert run.status.phase == "success", run.status
    overheads = await stack.transition_overheads(run)
    assert len(overheads) == 3
    assert max(overheads) < 1.0, overheads


async def test_the_event_stream_takes_over_again_once_it_is_back(stack: Stack) -> None:
    events = stack.built.events
    await wait_for("the blocking-query fallback", lambda: events.fallback is not None)
    flow = await stack.store.create(four_steps("handover"))
    first = await stack.wait_run(await stack.start_run(flow))
    assert first.status.phase == "success", first.status
    stack.gate.refuse_events = False
    refused = stack.gate.refused
    second = await stack.wait_run(await stack.start_run(flow))
    assert second.status.phase == "success", second.status
    # The stream reconnects (within its retry delay) and, once it delivers, the fallback stops.
    await wait_for("the fallback to stop", lambda: events.fallback is None)
    assert stack.gate.refused == refused
    third = await stack.wait_run(await stack.start_run(flow))
    assert third.status.phase == "success", third.status
