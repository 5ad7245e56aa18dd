"""Fixtures of the dev-agent HTTP tests: a running agent and an HTTP client for it.

A module that needs a differently configured agent (say, faster event heartbeats) defines its own
``agent`` fixture; ``api`` then talks to that one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from devagent_http_support import Api, api_client, running_agent

from nomad_pipeline.devagent.server import DevAgent


@pytest.fixture
async def agent() -> AsyncIterator[DevAgent]:
    async with running_agent() as started:
        yield started


@pytest.fixture
async def api(agent: DevAgent) -> AsyncIterator[Api]:
    async with api_client(agent) as client:
        yield client
