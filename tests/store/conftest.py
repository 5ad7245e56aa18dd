"""Store fixtures: one factory per backend, so the contract suite runs over both.

The nomad-vars backend runs against the real dev agent (no fake Nomad).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from nomad_pipeline.devagent.server import DevAgent, DevAgentConfig
from nomad_pipeline.nomad.client import NomadClient
from nomad_pipeline.store.core import CachingStore
from nomad_pipeline.store.memory import MemoryStore
from nomad_pipeline.store.nomadvars import NomadVarsStore

StoreFactory = Callable[..., Awaitable[CachingStore]]


@pytest.fixture(params=["memory", "nomad-vars"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def nomad_address(backend: str, tmp_path: Path) -> AsyncIterator[str | None]:
    """A dev agent on an ephemeral port (persisting to ``tmp_path/agent``) for nomad-vars."""
    if backend != "nomad-vars":
        yield None
        return
    agent = DevAgent(DevAgentConfig(port=0, data_dir=tmp_path / "agent"))
    address = await agent.start()
    try:
        yield address
    finally:
        await agent.stop()


@pytest.fixture
async def make_store(nomad_address: str | None) -> AsyncIterator[StoreFactory]:
    """``await make_store(**options)`` → a started store of the parametrized backend.

    Memory stores share nothing; nomad-vars stores made in one test share the dev agent.
    """
    created: list[CachingStore] = []
    clients: list[NomadClient] = []

    async def make(**options: Any) -> CachingStore:
        store: CachingStore
        if nomad_address is None:
            store = MemoryStore(**options)
        else:
            client = NomadClient(nomad_address)
            clients.append(client)
            store = NomadVarsStore(client, poll_wait="10s", **options)
        await store.start()
        created.append(store)
        return store

    try:
        yield make
    finally:
        for store in created:
            await store.close()
        for client in clients:
            await client.close()


@pytest.fixture
async def store(make_store: StoreFactory) -> CachingStore:
    return await make_store()
