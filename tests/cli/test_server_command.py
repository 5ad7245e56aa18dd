"""``nomad-pipeline server`` as a real process: serves the API the client commands use."""

from __future__ import annotations

import asyncio
import io
import signal
from pathlib import Path

import aiohttp
from cli_harness import CLI_BINARY, run_cli
from ports import free_port

from nomad_pipeline.cli.main import main

START_DEADLINE = 30.0


async def spawn(*argv: str, log: Path, stdout: int | None = None) -> asyncio.subprocess.Process:
    """The CLI as a process; its stderr (the server's log) goes to ``log``, never to a pipe
    nobody reads, which would block a chatty server once full."""
    with log.open("wb") as stderr:
        return await asyncio.create_subprocess_exec(
            str(CLI_BINARY), *argv, stdout=stdout, stderr=stderr
        )


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
    server = await spawn(
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
        # The seed's flag is accepted, so its command lines keep working.
        "--state-nomad-vars-cache-enabled=true",
        log=tmp_path / "server.log",
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


async def test_dev_nomad_prints_its_address_and_answers_nomad_api(tmp_path: Path) -> None:
    agent = await spawn(
        "dev-nomad",
        "--port",
        "0",
        "--in-memory",
        stdout=asyncio.subprocess.PIPE,
        log=tmp_path / "agent.log",
    )
    assert agent.stdout is not None
    try:
        line = await asyncio.wait_for(agent.stdout.readline(), START_DEADLINE)
        address = line.decode().strip()
        assert address.startswith("http://127.0.0.1:")
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{address}/v1/status/leader") as response,
        ):
            assert response.status == 200
            assert (await response.json()).endswith(":4647")
    finally:
        agent.send_signal(signal.SIGTERM)
        await asyncio.wait_for(agent.wait(), START_DEADLINE)
    assert agent.returncode == 0


async def test_dev_runs_agent_and_controller_together(tmp_path: Path) -> None:
    port, nomad_port = free_port(), free_port()
    addr = f"http://127.0.0.1:{port}"
    stack = await spawn(
        "dev",
        "--data-dir",
        str(tmp_path / "data"),
        "--port",
        str(port),
        "--nomad-port",
        str(nomad_port),
        log=tmp_path / "dev.log",
    )
    try:
        await wait_until_serving(addr, stack)
        namespace = "apiVersion: nomad-pipeline.io/v1\nkind: Namespace\nmetadata: {name: dev}\n"
        applied = await run_cli(addr, "apply", "-f", "-", stdin=namespace)
        assert (applied.code, applied.err) == (0, "")
        # The controller keeps its objects as Nomad variables in the dev agent.
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{nomad_port}/v1/vars") as response,
        ):
            paths = [variable["Path"] for variable in await response.json()]
        assert any(path.endswith("/dev") for path in paths), paths
    finally:
        stack.send_signal(signal.SIGTERM)
        await asyncio.wait_for(stack.wait(), START_DEADLINE)
    assert stack.returncode == 0
