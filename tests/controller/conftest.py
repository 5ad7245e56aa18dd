"""An API server on an ephemeral port over a memory store, and an HTTP client for it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from controller_api_helpers import Api

from nomad_pipeline.controller.admission import ensure_default_namespace
from nomad_pipeline.controller.api.app import build_api, start_api
from nomad_pipeline.store.memory import MemoryStore


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    store = MemoryStore()
    await store.start()
    await ensure_default_namespace(store)
    server = await start_api(build_api(store, log_root=tmp_path / "logs"), shutdown_timeout=2.0)
    async with aiohttp.ClientSession() as session:
        yield Api(server.address, store, session)
    await server.stop()
    await store.close()
