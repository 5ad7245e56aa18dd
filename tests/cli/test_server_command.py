"""``nomad-pipeline server`` as a real process: serves the API the client commands use."""

from __future__ import annotations

import asyncio
import io
import signal
import socket
from pathlib import Path

from cli_harness import CLI_BINARY, run_cli

from nomad_pipeline.cli.main import main

START_DEADLINE = 30.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def wait_until_serving(addr: str, server: asyncio.subprocess.Process) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_DEADLINE
    while True:
        probe = await run_cli(addr, "get", "namespaces", "-o", "name")
        if probe.code == 0:
            return
        assert server.returncode is None, "the server exited before serving"
        assert loop.time() < deadline, f"the server did not serve in time: {probe.err}"
        await asyncio.sleep(0.1)


async def test_server_run_serves_the_api_and_stops_on_sigterm(tmp_path: Path) -> None:
    addr = f"http://127.0.0.1:{free_port()}"
    server = await asyncio.create_subprocess_exec(
        str(CLI_BINARY),
        "server",
        "run",
        "--http-addr",
        addr,
        "--data-dir",
        str(tmp_path / "data"),
        "--state-backend",
        "dev",
        "--log-format",
        "json",
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_until_serving(addr, server)
        # The controller creates the default namespace at start.
        listed = await run_cli(addr, "get", "ns", "-o", "name")
        assert listed.out == "namespace.nomad-pipeline.io/default\n"
        flow = (
            "apiVersion: nomad-pipeline.io/v1\nkind: Flow\nmetadata: {name: hello}\n"
            'spec: {inline: {steps: [{name: greet, run: "echo hi"}]}}\n'
        )
        applied = await run_cli(addr, "apply", "-f", "-", stdin=flow)
        assert applied.out == "flow.nomad-pipeline.io/hello created\n"
    finally:
        server.send_signal(signal.SIGTERM)
        await asyncio.wait_for(server.wait(), START_DEADLINE)
    assert server.returncode == 0
    assert (tmp_path / "data" / "logs").is_dir()


def test_server_rejects_a_bad_address_in_one_line() -> None:
    err = io.StringIO()
    code = main(["server", "--http-addr", "nonsense"], stderr=err)
    assert code == 1
    assert err.getvalue().startswith("error: Invalid: http address 'nonsense' must look like")
    assert len(err.getvalue().splitlines()) == 1
