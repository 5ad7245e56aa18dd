"""Fixtures of the CLI tests: a running controller API (see cli_harness)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cli_harness import Controller, start_controller


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    async for running in start_controller(tmp_path):
        yield running
