"""A real dev agent on an ephemeral port and a client for it (no fake Nomad)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nomad_pipeline.devagent.server import DevAgent, DevAgentConfig
from nomad_pipeline.nomad.client import NomadClient


@pytest.fixture
async def nomad(tmp_path: Path) -> AsyncIterator[NomadClient]:
    agent = DevAgent(DevAgentConfig(port=0, data_dir=tmp_path / "agent"))
    address = await agent.start()
    try:
        async with NomadClient(address) as client:
            yield client
    finally:
        await agent.stop()
