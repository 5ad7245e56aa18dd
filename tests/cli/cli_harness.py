"""Test harness: the real API server (MemoryStore, port 0) and the CLI run against it.

The CLI runs in a worker thread (its own ``asyncio.run``) while the server keeps serving on the
test's loop, exactly as two processes would talk over HTTP.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nomad_pipeline.cli.main import main
from nomad_pipeline.controller.api.app import build_api, start_api
from nomad_pipeline.store.memory import MemoryStore

REPO_ROOT = Path(__file__).resolve().parents[2]
CLI_BINARY = REPO_ROOT / ".venv" / "bin" / "nomad-pipeline"

# The namespace most tests apply first, ahead of their own documents ("---" joins them).
DEFAULT_NAMESPACE_MANIFEST = """\
apiVersion: nomad-pipeline.io/v1
kind: Namespace
metadata: {name: default}
spec: {}
"""


@dataclass
class CliResult:
    code: int
    out: str
    err: str


async def run_cli(addr: str, *argv: str, stdin: str = "") -> CliResult:
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(
        main, [*argv, "--addr", addr], stdin=io.StringIO(stdin), stdout=out, stderr=err
    )
    return CliResult(code, out.getvalue(), err.getvalue())


@dataclass
class Controller:
    addr: str
    store: MemoryStore
    log_root: Path

    async def cli(self, *argv: str, stdin: str = "") -> CliResult:
        return await run_cli(self.addr, *argv, stdin=stdin)

    async def start_cli(self, *argv: str) -> asyncio.subprocess.Process:
        """The CLI as a real process (for commands that keep printing: ``-f``, ``-w``), with
        stdout and stderr piped; the caller ends it."""
        return await asyncio.create_subprocess_exec(
            str(CLI_BINARY),
            *argv,
            "--addr",
            self.addr,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )


RouteSetups = Sequence[Callable[..., None]]


async def start_controller(
    tmp_path: Path, extra_routes: RouteSetups = (), *, store: MemoryStore | None = None
) -> AsyncIterator[Controller]:
    store = store or MemoryStore()
    await store.start()
    log_root = tmp_path / "logs"
    server = await start_api(build_api(store, log_root=log_root, extra_routes=extra_routes))
    try:
        yield Controller(server.address, store, log_root)
    finally:
        await server.stop()
        await store.close()
