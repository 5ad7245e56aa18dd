"""An API server on an ephemeral port over each store backend, and an HTTP client for it.

``api`` runs every test twice: over the memory store and over the nomad-vars store backed by a
dev agent (real Nomad Variables over HTTP).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import pytest
from controller_api_helpers import Api

from nomad_pipeline.controller.admission import ensure_default_namespace
from nomad_pipeline.controller.api.app import build_api, start_api
from nomad_pipeline.devagent.server import DevAgent, DevAgentConfig
from nomad_pipeline.nomad.client import NomadClient
from nomad_pipeline.resources.registry import KINDS
from nomad_pipeline.store.interface import Store
from nomad_pipeline.store.memory import MemoryStore
from nomad_pipeline.store.nomadvars import NomadVarsStore


async def open_store(backend: str, tmp_path: Path, stack: AsyncExitStack) -> Store:
    if backend == "memory":
        return MemoryStore()
    agent = DevAgent(DevAgentConfig(port=0, data_dir=tmp_path / "nomad"))
    address = await agent.start()
    stack.push_async_callback(agent.stop)
    nomad = NomadClient(address)
    stack.push_async_callback(nomad.close)
    return NomadVarsStore(nomad, kinds=KINDS.values())


@pytest.fixture(params=["memory", "nomad-vars"])
async def api(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Api]:
    async with AsyncExitStack() as stack:
        store = await open_store(request.param, tmp_path, stack)
        await store.start()
        stack.push_async_callback(store.close)
        await ensure_default_namespace(store)
        app = build_api(store, log_root=tmp_path / "logs")
        server = await start_api(app, shutdown_timeout=2.0)
        stack.push_async_callback(server.stop)
        session = await stack.enter_async_context(aiohttp.ClientSession())
        yield Api(server.address, store, session)
