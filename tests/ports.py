"""Ephemeral ports for tests that must name a port before anything listens on it.

Importable from every test folder: ``tests/`` is on ``sys.path`` because its ``conftest.py`` sits
in a folder without ``__init__.py`` (pytest's default ``prepend`` import mode).
"""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on once this returns (the kernel picked it; the probe is closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
