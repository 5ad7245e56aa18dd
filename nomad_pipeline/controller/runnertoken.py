"""Per-run tokens that authenticate a runner's reports to the controller.

A token is HMAC-SHA256 of ``<namespace>/<run>`` under a controller secret kept in the data
directory, so no token is stored in the Run, a token only opens its own run, and a restarted
controller (same data directory) still accepts the tokens of runners already started.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from nomad_pipeline.errors import TerminalError

SECRET_FILE_NAME = "runner-token.key"
_SECRET_BYTES = 32


def runner_token(secret: bytes, namespace: str, run: str) -> str:
    """The bearer token the runner of ``namespace/run`` presents (hex, 64 characters)."""
    message = f"{namespace}/{run}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def token_matches(secret: bytes, namespace: str, run: str, presented: str) -> bool:
    """Constant-time check of a presented token against the run's expected one."""
    return hmac.compare_digest(runner_token(secret, namespace, run), presented)


def load_or_create_secret(data_dir: Path) -> bytes:
    """The controller secret at ``<data_dir>/runner-token.key``, created (mode 0600) if absent.

    Blocking file I/O: call it at start-up, before the event loop serves requests, or through
    ``asyncio.to_thread``.
    """
    path = data_dir / SECRET_FILE_NAME
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    candidate = data_dir / f".{SECRET_FILE_NAME}.{os.getpid()}.tmp"
    candidate.write_bytes(secrets.token_bytes(_SECRET_BYTES))
    candidate.chmod(0o600)
    try:
        # A hard link fails if the file exists, so two controllers starting together on one
        # data directory agree on whichever secret landed first.
        os.link(candidate, path)
    except FileExistsError:
        pass
    finally:
        candidate.unlink()
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    secret = path.read_bytes()
    if len(secret) < _SECRET_BYTES:
        raise TerminalError(
            f"runner token secret {path} holds {len(secret)} bytes, expected at least "
            f"{_SECRET_BYTES}; delete it to have a new one generated"
        )
    return secret
