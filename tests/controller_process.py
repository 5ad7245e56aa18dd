"""``nomad-pipeline server`` as a real subprocess on the nomad-vars backend, for tests that must
kill the controller abruptly (SIGKILL) or restart it on the same port and data dir.

Importable from every test folder, like ``ports.py``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from ports import free_port

CLI = str(Path(sys.executable).parent / "nomad-pipeline")


@dataclass
class ControllerProcess:
    """The controller subprocess; ``start``/``kill`` keep the same port and data dir."""

    nomad_address: str
    data_dir: Path
    port: int = field(default_factory=free_port)
    process: asyncio.subprocess.Process | None = None
    starts: int = 0

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(
        self, http: aiohttp.ClientSession, *server_args: str, deadline: float = 30.0
    ) -> None:
        """Start the server (``server_args`` added to its command line), wait until it is ready."""
        self.starts += 1
        # One log per start, next to the data dir: a restart does not overwrite the killed one's.
        log = (self.data_dir.parent / f"controller-{self.starts}.log").open("wb")
        self.process = await asyncio.create_subprocess_exec(
            CLI,
            "server",
            "--http-addr",
            f"127.0.0.1:{self.port}",
            "--data-dir",
            str(self.data_dir),
            "--nomad-addr",
            self.nomad_address,
            "--state-backend",
            "nomad-vars",
            *server_args,
            stdout=log,
            stderr=log,
            env={**os.environ, "NOMAD_TOKEN": ""},
        )
        log.close()
        await self.wait_ready(http, deadline)

    async def wait_ready(self, http: aiohttp.ClientSession, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        while True:
            assert self.process is not None
            if self.process.returncode is not None:
                raise AssertionError(f"controller exited with {self.process.returncode}")
            try:
                async with http.get(f"{self.address}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if loop.time() > end:
                raise AssertionError("controller not ready in time")
            await asyncio.sleep(0.05)

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
            await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(15):
                    await self.process.wait()
            except TimeoutError:
                await self.kill()
