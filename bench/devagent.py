"""Benchmark the dev agent over real HTTP; prints latency figures and sustained concurrency.

Runs ``python -m nomad_pipeline.devagent --port 0`` as a subprocess (so the agent has its own
event loop, as in use) and measures, from this client process:

- register -> allocation running: from the register request to the allocation's "running"
  event on the event stream;
- event-stream delivery: from a variable write's ModifyTime (the commit) to the event's
  arrival on the stream;
- blocking-query wake-up: from a variable write's ModifyTime to the answer of a blocking
  ``GET /v1/var/:path?index=N`` waiting on it;
- concurrency: one batch job with ``Count`` short ``raw_exec`` allocations, reporting the
  peak number running at once and the time until all completed.

Usage: ``.venv/bin/python bench/devagent.py [--samples N] [--concurrent N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[position]


def report(name: str, values_ms: list[float], target: str = "") -> None:
    p50 = percentile(values_ms, 0.50)
    p99 = percentile(values_ms, 0.99)
    suffix = f"  (target {target})" if target else ""
    print(
        f"{name:<38} n={len(values_ms):<4} p50={p50:8.2f} ms  p99={p99:8.2f} ms  "
        f"mean={statistics.fmean(values_ms):8.2f} ms{suffix}"
    )


@contextlib.asynccontextmanager
async def agent_process() -> AsyncIterator[str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nomad_pipeline.devagent",
        "--port",
        "0",
        "--node-name",
        "bench",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(30):
            address = (await process.stdout.readline()).decode().strip()
        if not address.startswith("http"):
            raise RuntimeError(f"the dev agent did not print its address (got {address!r})")
        yield address
    finally:
        if process.returncode is None:
            process.terminate()
            async with asyncio.timeout(30):
                await process.wait()


class EventStream:
    """Reads the event stream in the background, timestamping each event on arrival."""

    def __init__(self, session: aiohttp.ClientSession, address: str, topics: list[str]) -> None:
        self.session = session
        self.url = f"{address}/v1/event/stream"
        self.params = [("topic", t) for t in topics] + [("index", "0")]
        self.queue: asyncio.Queue[tuple[int, dict[str, Any]]] = asyncio.Queue()
        self.connected = asyncio.Event()

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with self.session.get(self.url, params=self.params, timeout=timeout) as response:
            async for raw in response.content:
                arrived = time.time_ns()
                line = json.loads(raw)
                if line == {}:
                    self.connected.set()
                    continue
                for event in line["Events"]:
                    self.queue.put_nowait((arrived, event))

    @contextlib.asynccontextmanager
    async def reading(self, name: str) -> AsyncIterator[None]:
        """Reads in a task named ``name`` while the block runs, from once the stream is open."""
        async with asyncio.TaskGroup() as group:
            reader = group.create_task(self.run(), name=name)
            await self.connected.wait()
            yield
            reader.cancel()

    async def next_matching(
        self, wanted: Callable[[dict[str, Any]], bool]
    ) -> tuple[int, dict[str, Any]]:
        """The next event ``wanted`` accepts, with its arrival time; the ones before are dropped."""
        while True:
            arrived, event = await self.queue.get()
            if wanted(event):
                return arrived, event


def job(job_id: str, script: str, count: int = 1) -> dict[str, Any]:
    return {
        "ID": job_id,
        "Type": "batch",
        "TaskGroups": [
            {
                "Name": "g",
                "Count": count,
                "RestartPolicy": {"Attempts": 0, "Mode": "fail"},
                "ReschedulePolicy": {"Attempts": 0, "Unlimited": False},
                "Tasks": [
                    {
                        "Name": "t",
                        "Driver": "raw_exec",
                        "Config": {"command": "/bin/sh", "args": ["-c", script]},
                        "Resources": {"CPU": 10, "MemoryMB": 10},
                        "LogConfig": {"MaxFiles": 1, "MaxFileSizeMB": 1},
                    }
                ],
            }
        ],
    }


def _allocation_running(job_id: str) -> Callable[[dict[str, Any]], bool]:
    def wanted(event: dict[str, Any]) -> bool:
        allocation = event["Payload"]["Allocation"]
        return bool(allocation["JobID"] == job_id and allocation["ClientStatus"] == "running")

    return wanted


def _variable_written(path: str) -> Callable[[dict[str, Any]], bool]:
    def wanted(event: dict[str, Any]) -> bool:
        return bool(event["Key"] == path)

    return wanted


async def bench_register_to_running(
    session: aiohttp.ClientSession, address: str, samples: int
) -> list[float]:
    stream = EventStream(session, address, ["Allocation"])
    latencies: list[float] = []
    async with stream.reading("bench-register-events"):
        for n in range(samples):
            job_id = f"latency-{n}"
            started = time.time_ns()
            async with session.put(f"{address}/v1/jobs", json={"Job": job(job_id, "sleep 0.2")}):
                pass
            arrived, _ = await stream.next_matching(_allocation_running(job_id))
            latencies.append((arrived - started) / 1e6)
    return latencies


async def bench_event_delivery(
    session: aiohttp.ClientSession, address: str, samples: int
) -> list[float]:
    stream = EventStream(session, address, ["Variable"])
    latencies: list[float] = []
    async with stream.reading("bench-variable-events"):
        for n in range(samples):
            path = f"bench/event/{n}"
            async with session.put(f"{address}/v1/var/{path}", json={"Items": {"n": str(n)}}):
                pass
            arrived, event = await stream.next_matching(_variable_written(path))
            committed = event["Payload"]["Variable"]["ModifyTime"]
            latencies.append((arrived - committed) / 1e6)
    return latencies


async def bench_blocking_wakeup(
    session: aiohttp.ClientSession, address: str, samples: int
) -> list[float]:
    url = f"{address}/v1/var/bench/blocking"
    async with session.put(url, json={"Items": {"n": "0"}}) as response:
        index = int(response.headers["X-Nomad-Index"])
    latencies: list[float] = []
    for n in range(1, samples + 1):

        async def wait_for_change(since: int) -> tuple[int, int]:
            async with session.get(url, params={"index": str(since), "wait": "30s"}) as answer:
                arrived = time.time_ns()
                body = await answer.json()
                return arrived, int(body["ModifyTime"])

        waiter = asyncio.create_task(wait_for_change(index), name="bench-blocking-query")
        # Give the query time to reach the agent and park on the index (a benchmark, not a test).
        await asyncio.sleep(0.02)
        async with session.put(url, json={"Items": {"n": str(n)}}) as response:
            index = int(response.headers["X-Nomad-Index"])
        arrived, committed = await waiter
        latencies.append((arrived - committed) / 1e6)
    return latencies


async def bench_concurrency(
    session: aiohttp.ClientSession, address: str, count: int
) -> tuple[int, float, dict[str, int]]:
    stream = EventStream(session, address, ["Allocation:concurrent"])
    running: set[str] = set()
    finished: dict[str, str] = {}
    peak = 0
    async with stream.reading("bench-concurrency-events"):
        started = time.monotonic()
        async with session.put(
            f"{address}/v1/jobs", json={"Job": job("concurrent", "sleep 3", count)}
        ):
            pass
        while len(finished) < count:
            async with asyncio.timeout(120):
                _, event = await stream.queue.get()
            allocation = event["Payload"]["Allocation"]
            status = allocation["ClientStatus"]
            if status == "running":
                running.add(allocation["ID"])
            elif status in ("complete", "failed", "lost"):
                running.discard(allocation["ID"])
                finished[allocation["ID"]] = status
            peak = max(peak, len(running))
        elapsed = time.monotonic() - started
    outcomes: dict[str, int] = {}
    for status in finished.values():
        outcomes[status] = outcomes.get(status, 0) + 1
    return peak, elapsed, outcomes


async def main_async(samples: int, concurrent: int) -> None:
    async with agent_process() as address, aiohttp.ClientSession() as session:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(
            f"dev agent at {address}; {samples} samples per latency figure; "
            f"{os.cpu_count()} CPUs, load average {load}"
        )
        report(
            "register -> allocation running",
            await bench_register_to_running(session, address, samples),
        )
        report(
            "event-stream delivery",
            await bench_event_delivery(session, address, samples),
            "p99 < 10 ms",
        )
        report(
            "blocking-query wake-up",
            await bench_blocking_wakeup(session, address, samples),
            "p99 < 10 ms",
        )
        peak, elapsed, outcomes = await bench_concurrency(session, address, concurrent)
        print(
            f"{'concurrent raw_exec allocations':<38} requested={concurrent} peak running={peak} "
            f"all finished in {elapsed:.1f} s, outcomes={outcomes}  (target 200)"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100, help="samples per latency figure")
    parser.add_argument("--concurrent", type=int, default=200, help="allocations at once")
    args = parser.parse_args()
    asyncio.run(main_async(args.samples, args.concurrent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
