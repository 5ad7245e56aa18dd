"""API latency and controller memory with 10,000 runs stored.

Starts a controller (``ControllerApp``: store + API, memory backend) as a subprocess, loads
10,000 runs through the apply API, then prints p50/p99 latency of get, list (all 10,000 runs)
and apply, the server's CPU per request, and its resident memory. The subprocess runs no
reconcilers: with no Nomad to talk to, the run reconciler would retry 10,000 runs in the
background and the figures would measure that instead of the API. With ``--nomad-vars`` it also
starts a dev agent, fills it with the same runs through a nomad-vars server, and times a second
server's start-up (cache fill from Nomad).

Targets: get p99 < 5 ms, list of 10,000 < 150 ms, RSS < 300 MB, nomad-vars start-up < 20 s.

    .venv/bin/python bench/api.py [--runs 10000] [--nomad-vars]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

API = "/apis/nomad-pipeline.io/v1"
SERVER = [sys.executable, __file__, "--serve"]
BATCH = 500


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_object(index: int) -> dict[str, Any]:
    return {
        "apiVersion": "nomad-pipeline.io/v1",
        "kind": "Run",
        "metadata": {"name": f"01jbench{index:018d}", "namespace": "default"},
        "spec": {
            "flow": "build",
            "flow_spec": {
                "variables": [{"name": "env", "type": "string", "default": "dev"}],
                "inline": {
                    "steps": [
                        {"name": "compile", "run": "make build ENV=${var.env}"},
                        {"name": "test", "run": "make test"},
                        {"name": "package", "run": "make package"},
                    ]
                },
            },
            "variables": {"env": "ci"},
        },
    }


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def report(name: str, samples: list[float], server_cpu: float) -> None:
    milliseconds = [sample * 1000 for sample in samples]
    print(
        f"{name:<24} n={len(samples):<5} p50={percentile(milliseconds, 0.5):8.2f} ms  "
        f"p99={percentile(milliseconds, 0.99):8.2f} ms  "
        f"mean={statistics.mean(milliseconds):8.2f} ms  "
        f"server CPU/request={server_cpu * 1000 / len(samples):7.2f} ms"
    )


async def measure(name: str, pid: int, count: int, call: Callable[[], Awaitable[None]]) -> None:
    cpu_before = cpu_seconds(pid)
    samples = await timed(count, call)
    report(name, samples, cpu_seconds(pid) - cpu_before)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (independent of other load on the machine)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def rss_megabytes(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def timed(count: int, call: Callable[[], Awaitable[None]]) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return samples


async def wait_ready(session: aiohttp.ClientSession, address: str, limit: float) -> float:
    started = time.perf_counter()
    async with asyncio.timeout(limit):
        while True:
            try:
                async with session.get(address + "/readyz") as response:
                    if response.status == 200:
                        return time.perf_counter() - started
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)


async def start_server(data_dir: Path, *extra: str) -> tuple[asyncio.subprocess.Process, str]:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *SERVER,
        "--http-addr",
        f"127.0.0.1:{port}",
        "--data-dir",
        str(data_dir),
        *extra,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return process, f"http://127.0.0.1:{port}"


async def stop_server(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        await process.wait()


async def load_runs(session: aiohttp.ClientSession, address: str, count: int) -> float:
    started = time.perf_counter()
    for first in range(0, count, BATCH):
        items = [run_object(index) for index in range(first, min(count, first + BATCH))]
        async with session.put(f"{address}{API}/apply", json={"items": items}) as response:
            if response.status != 200:
                raise RuntimeError(f"apply failed: {response.status} {await response.text()}")
    return time.perf_counter() - started


async def bench_memory(runs: int, workdir: Path) -> None:
    process, address = await start_server(workdir / "memory")
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, address, 30)
            load_seconds = await load_runs(session, address, runs)
            print(f"loaded {runs} runs through apply in {load_seconds:.1f} s")

            async def get_one() -> None:
                url = f"{address}{API}/namespaces/default/runs/01jbench{runs // 2:018d}"
                async with session.get(url) as response:
                    await response.read()
                    assert response.status == 200

            async def list_all() -> None:
                async with session.get(f"{address}{API}/namespaces/default/runs") as response:
                    body = await response.read()
                    assert response.status == 200 and len(body) > runs * 100

            flow_counter = iter(range(10**9))

            async def apply_one() -> None:
                item = run_object(runs + next(flow_counter))
                async with session.put(f"{address}{API}/apply", json={"items": [item]}) as response:
                    await response.read()
                    assert response.status == 200

            await timed(20, get_one)  # warm-up
            await measure("get run", process.pid, 1000, get_one)
            # The first list serialises every object; later ones reuse each unchanged object's
            # JSON, so both are shown.
            await measure(f"list {runs} runs, first", process.pid, 1, list_all)
            await measure(f"list {runs} runs", process.pid, 20, list_all)
            await measure("apply 1 run (create)", process.pid, 300, apply_one)
            print(
                f"controller RSS with {runs + 300} runs cached: {rss_megabytes(process.pid):.0f} MB"
            )
    finally:
        await stop_server(process)


async def bench_nomad_vars(runs: int, workdir: Path) -> None:
    from nomad_pipeline.devagent.server import DevAgent, DevAgentConfig

    agent = DevAgent(DevAgentConfig(port=0, data_dir=workdir / "nomad"))
    nomad_address = await agent.start()
    backend = ["--state-backend", "nomad-vars", "--nomad-addr", nomad_address]
    try:
        async with aiohttp.ClientSession() as session:
            process, address = await start_server(workdir / "vars", *backend)
            try:
                await wait_ready(session, address, 60)
                load_seconds = await load_runs(session, address, runs)
                print(f"nomad-vars: stored {runs} runs as Nomad variables in {load_seconds:.1f} s")
            finally:
                await stop_server(process)
            process, address = await start_server(workdir / "vars", *backend)
            try:
                startup = await wait_ready(session, address, 120)
                print(f"nomad-vars: server start-up with {runs + 1} objects: {startup:.2f} s")
                async with session.get(f"{address}{API}/namespaces/default/runs") as response:
                    listed = await response.json()
                print(f"nomad-vars: runs listed after restart: {len(listed['items'])}")
                print(f"nomad-vars: controller RSS: {rss_megabytes(process.pid):.0f} MB")
            finally:
                await stop_server(process)
    finally:
        await agent.stop()


async def serve_api_only(args: argparse.Namespace) -> None:
    """The subprocess: a controller with its store and API and no reconcilers."""
    from nomad_pipeline.app import ControllerApp, ControllerConfig, wait_for_signal

    config = ControllerConfig(
        data_dir=Path(args.data_dir),
        http_addr=args.http_addr,
        nomad_addr=args.nomad_addr,
        state_backend=args.state_backend,
    )
    app = ControllerApp(config, reconciler_factories=[], api_routes=[])
    await app.start()
    try:
        await wait_for_signal()
    finally:
        await app.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument(
        "--nomad-vars", action="store_true", help="also bench the nomad-vars start-up"
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--http-addr", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--nomad-addr", help=argparse.SUPPRESS)
    parser.add_argument("--state-backend", default="dev", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        await serve_api_only(args)
        return
    with tempfile.TemporaryDirectory(prefix="np-bench-") as directory:
        workdir = Path(directory)
        print(
            f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {load_average()}"
        )
        await bench_memory(args.runs, workdir)
        if args.nomad_vars:
            await bench_nomad_vars(args.runs, workdir)


if __name__ == "__main__":
    asyncio.run(main())
