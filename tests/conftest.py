"""Shared fixtures: paths of the reference material (tests that need it skip without it)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"


@pytest.fixture
def shared_reference() -> Path:
    """``../shared/reference``; skipped, with a message, where ``../shared`` is absent."""
    reference = SHARED / "reference"
    if not reference.is_dir():
        pytest.skip(f"reference material not found at {reference} (../shared is absent)")
    return reference
