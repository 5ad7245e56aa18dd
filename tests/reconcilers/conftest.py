"""A real stack in process: the dev agent on an ephemeral port and the controller on it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from run_harness import Stack, start_stack


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async for running in start_stack(tmp_path):
        yield running
