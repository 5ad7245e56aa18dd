"""Per-run tokens that authenticate a runner's reports to the controller.

A token is HMAC-SHA256 of ``<namespace>/<run>`` under a controller secret, so no token is
stored in the Run, a token only opens its own run, and a restarted controller still accepts the
tokens of runners already started. The secret lives in the data directory (the dev backend), or,
with the nomad-vars backend, in a Nomad variable beside the store's objects: every controller
sharing that Nomad (leader election: whichever leads, and any instance a runner calls back
through a load-balanced ``--advertise-addr``) accepts the same tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from nomad_pipeline.errors import NotFound, TerminalError
from nomad_pipeline.nomad.client import NomadClient, VariableConflict

SECRET_FILE_NAME = "runner-token.key"
# A sibling of the nomad-vars store's prefix (which holds only objects).
SECRET_VARIABLE_PATH = "nomad-pipeline-runner-secret"
_SECRET_ITEM = "secret"
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


async def load_or_create_shared_secret(nomad: NomadClient, namespace: str) -> bytes:
    """The secret in the Nomad variable ``nomad-pipeline-runner-secret``, created if absent.

    Created with check-and-set 0, so controllers starting together agree on whichever secret
    landed first."""
    try:
        return _decode_shared(await nomad.get_variable(SECRET_VARIABLE_PATH, namespace=namespace))
    except NotFound:
        pass
    candidate = {_SECRET_ITEM: secrets.token_hex(_SECRET_BYTES)}
    try:
        created = await nomad.put_variable(
            SECRET_VARIABLE_PATH, candidate, namespace=namespace, cas=0
        )
    except VariableConflict:
        created = await nomad.get_variable(SECRET_VARIABLE_PATH, namespace=namespace)
    return _decode_shared(created)


def _decode_shared(variable: dict[str, object]) -> bytes:
    items = variable.get("Items")
    text = items.get(_SECRET_ITEM) if isinstance(items, dict) else None
    try:
        secret = bytes.fromhex(text) if isinstance(text, str) else b""
    except ValueError:
        secret = b""
    if len(secret) < _SECRET_BYTES:
        raise TerminalError(
            f"Nomad variable {SECRET_VARIABLE_PATH!r} does not hold a runner secret (item "
            f"{_SECRET_ITEM!r}: {_SECRET_BYTES} random bytes as hex); delete it to have one made"
        )
    return secret
