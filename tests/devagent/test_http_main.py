"""``python -m nomad_pipeline.devagent`` as a real process: prints its address, stops on signals."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
from devagent_http_support import api_client, batch_job, eventually, running_agent

from nomad_pipeline.devagent.server import build_parser, config_from_args


async def start_process(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nomad_pipeline.devagent",
        "--port",
        "0",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    async with asyncio.timeout(30):
        address = (await process.stdout.readline()).decode().strip()
    assert address.startswith("http://127.0.0.1:"), address
    return process, address


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
async def test_runs_until_a_signal_and_kills_its_tasks(
    tmp_path: Path, stop_signal: signal.Signals
) -> None:
    marker = tmp_path / "pid"
    process, address = await start_process("--data-dir", str(tmp_path / "data"))
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(address + "/v1/status/leader") as response:
                assert json.loads(await response.text()) == "127.0.0.1:4647"
            job = batch_job("sleeper", f'echo $$ > "{marker}"; exec sleep 60')
            async with session.put(address + "/v1/jobs", json={"Job": job}) as response:
                assert response.status == 200

        async def task_pid() -> int | None:
            text = marker.read_text().strip() if marker.exists() else ""
            return int(text) if text else None

        pid = await eventually(task_pid)
        process.send_signal(stop_signal)
        async with asyncio.timeout(30):
            assert await process.wait() == 0

        async def task_gone() -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        await eventually(task_gone, timeout=10)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_cli_arguments() -> None:
    parser = build_parser()
    config = config_from_args(
        parser.parse_args(
            ["--bind", "0.0.0.0", "--port", "0", "--node-name", "n1", "--acl-token", "t"]
        )
    )
    assert (config.bind, config.port, config.node_name, config.acl_token) == (
        "0.0.0.0",
        0,
        "n1",
        "t",
    )
    assert config.data_dir is None
    config = config_from_args(parser.parse_args(["--data-dir", "/tmp/x"]))
    assert config.data_dir == Path("/tmp/x")
    with pytest.raises(SystemExit):
        parser.parse_args(["--data-dir", "/tmp/x", "--in-memory"])


async def test_in_memory_mode_removes_its_directory_on_stop() -> None:
    async with running_agent() as agent, api_client(agent) as api:
        data_dir = Path((await api.ok("GET", "/v1/agent/self"))["config"]["DataDir"])
        assert data_dir.is_dir()
    assert not data_dir.exists()
