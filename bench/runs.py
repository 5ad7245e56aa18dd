"""Benchmark of the run controller: N concurrent runs of a 5-step raw_exec specification flow.

The dev agent runs as its own process (``nomad-pipeline dev-nomad``); the controller (nomad-vars
store, run controller) runs in this process so its CPU time and counters can be read. Prints:

- controller overhead per step transition: from Nomad reporting a step's allocation terminal
  (the allocation's ``ModifyTime``) to the next step's job registered (its ``SubmitTime``),
  p50/p99, both on the dev agent's clock;
- wall time from the first run created to the last run finished;
- controller CPU seconds per step (this process's CPU time over the runs);
- log line latency: a step prints timestamps, followers of the log store (what ``logs -f``
  streams from) note when each line arrives;
- store writes per step (run status writes) and Nomad requests per step (every HTTP request the
  run controller sent to Nomad: registers, reads, log streams; the store's own requests are not
  counted, they are the store writes);
- what the controller waited on: mean latency of a status write (a Nomad variable PUT) and of a
  job register, the dev agent's own CPU per step (its process, and the steps' tasks it ran),
  and the machine's load average, since the agent, the controller and whatever else runs on the
  machine share its cores.

A run of S steps makes S + 1 status writes: the run's start carries step 1's job ID, each of the
S - 1 transitions ends one step and records the next one's job ID (exactly-once registration:
the ID is stored before the job is registered), the run's end carries the last step's end.

Two kinds of steps, because the overhead per transition means two different things with them:

- ``/bin/true`` steps (``--step-seconds 0 0``, the first scenario by default): every run's step
  ends within the same few milliseconds as the 99 others, so each round of transitions arrives
  as one burst and the figure is mostly queueing: the last transition of a burst waits for the
  CPU of all those before it (a throughput test; the "burst floor" line prints that bound);
- steps sleeping a random 1-5 s each (``--step-seconds 1 5``, the second scenario by default),
  drawn per run and step from a fixed seed: 100 runs are still all running at once, but their
  transitions arrive spread out, as steps of real pipelines do (the latency a step waits).
  Controller CPU per step is higher here, and grows with the steps' duration: a running step's
  logs are followed (two ``client/fs/logs`` streams, each a connection of its own that Nomad
  heartbeats every second), which ``/bin/true`` steps mostly skip (they end before the copier
  starts, and one ``fs/ls`` shows they printed nothing).

Usage: ``.venv/bin/python bench/runs.py [--runs 1 10 100] [--steps 5] [--step-seconds MIN MAX]``
(each count in turn, each with a fresh dev agent).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from nomad_pipeline.app import tune_garbage_collector
from nomad_pipeline.controller.admission import ensure_default_namespace
from nomad_pipeline.controller.logstore import LogStore
from nomad_pipeline.controller.manager import Manager
from nomad_pipeline.controller.metrics import ControllerMetrics
from nomad_pipeline.nomad.client import NomadClient
from nomad_pipeline.reconcilers.run import RunSettings
from nomad_pipeline.reconcilers.runsetup import build_run_controller
from nomad_pipeline.resources.kinds import TERMINAL_PHASES, Flow, Run, RunSpec
from nomad_pipeline.resources.meta import ObjectMeta
from nomad_pipeline.resources.ulid import new_ulid
from nomad_pipeline.store.interface import Store
from nomad_pipeline.store.memory import MemoryStore
from nomad_pipeline.store.nomadvars import NomadVarsStore

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def step_job(command: str = "/bin/true", args: list[str] | None = None) -> dict[str, Any]:
    return {
        "ID": "step",
        "Type": "batch",
        "TaskGroups": [
            {
                "Name": "step",
                "Tasks": [
                    {
                        "Name": "main",
                        "Driver": "raw_exec",
                        "Config": {"command": command, "args": args or []},
                        "Resources": {"CPU": 10, "MemoryMB": 16},
                    }
                ],
            }
        ],
    }


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


async def wait_ready(address: str, deadline: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    async with aiohttp.ClientSession() as http:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{address}/v1/status/leader") as response:
                    if response.status == 200:
                        return
            if loop.time() > end:
                raise RuntimeError(f"dev agent at {address} did not start")
            await asyncio.sleep(0.05)


@dataclass(frozen=True)
class Scenario:
    runs: int
    steps: int
    backend: str
    # Each step sleeps a duration drawn from [min, max] seconds; (0, 0): ``/bin/true``.
    step_seconds: tuple[float, float]

    @property
    def sleeps(self) -> bool:
        return self.step_seconds[1] > 0

    def describe(self) -> str:
        low, high = self.step_seconds
        kind = f"sleeping {low:g}-{high:g} s" if self.sleeps else "/bin/true"
        return (
            f"runs: {self.runs} x {self.steps} steps ({self.runs * self.steps} steps, {kind}), "
            f"store: {self.backend}"
        )


async def bench(scenario: Scenario) -> None:
    port = free_port()
    nomad_address = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="np-bench-") as scratch:
        agent = await asyncio.create_subprocess_exec(
            str(BIN / "nomad-pipeline"),
            "dev-nomad",
            "--port",
            str(port),
            "--data-dir",
            str(Path(scratch) / "nomad"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            await wait_ready(nomad_address)
            await measure(nomad_address, Path(scratch), scenario, agent.pid)
        finally:
            agent.send_signal(signal.SIGTERM)
            await agent.wait()


def process_cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds of a process itself and of its children it has waited for (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    # After the ")" ending the command name: state is field 0, utime/stime 11/12,
    # cutime/cstime 13/14.
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


class CountingConnector(aiohttp.TCPConnector):
    """Counts every request sent through it: each request takes a connection from its
    connector once. A trace config would count the same, but it makes aiohttp build and send
    a trace event at every stage of every request, CPU the controller itself never spends and
    which this process's CPU time would charge to it."""

    def __init__(self, counter: list[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._counter = counter

    async def connect(self, *args: Any, **kwargs: Any) -> Any:
        self._counter[0] += 1
        return await super().connect(*args, **kwargs)


def bench_flow(scenario: Scenario) -> Flow:
    """The benchmarked flow: each step ``/bin/true``, or sleeping its run's ``d<step>`` seconds
    (a variable, so every run sleeps its own durations)."""
    if not scenario.sleeps:
        jobs = [step_job() for _ in range(scenario.steps)]
        variables: list[dict[str, Any]] = []
    else:
        jobs = [
            step_job("/bin/sh", ["-c", f'exec sleep "$NP_VAR_D{index}"'])
            for index in range(scenario.steps)
        ]
        variables = [{"name": f"d{index}", "required": True} for index in range(scenario.steps)]
    return Flow(
        metadata=ObjectMeta(name="bench"),
        spec={
            "variables": variables,
            "specification": {
                "steps": [
                    {"name": f"s{index}", "job": {"json": job}} for index, job in enumerate(jobs)
                ]
            },
        },
    )


def run_variables(scenario: Scenario, durations: random.Random) -> dict[str, Any]:
    if not scenario.sleeps:
        return {}
    return {
        f"d{index}": f"{durations.uniform(*scenario.step_seconds):.3f}"
        for index in range(scenario.steps)
    }


async def measure(nomad_address: str, scratch: Path, scenario: Scenario, agent_pid: int) -> None:
    runs, steps, backend = scenario.runs, scenario.steps, scenario.backend
    # One counter for both sessions (the reconciler's and the log copier's).
    counted = [0]
    async with (
        # Without cookie jars, as the controller's own sessions (``new_session``).
        aiohttp.ClientSession(
            connector=CountingConnector(counted), cookie_jar=aiohttp.DummyCookieJar()
        ) as counted_session,
        aiohttp.ClientSession(
            connector=CountingConnector(counted, limit=0),
            cookie_jar=aiohttp.DummyCookieJar(),
        ) as counted_logs,
        NomadClient(nomad_address) as store_nomad,
        NomadClient(nomad_address, session=counted_session) as nomad,
    ):
        metrics = ControllerMetrics(CollectorRegistry())
        store: Store = NomadVarsStore(store_nomad) if backend == "nomad-vars" else MemoryStore()
        await store.start()
        await ensure_default_namespace(store)
        built = build_run_controller(
            store,
            nomad,
            log_root=scratch / "logs",
            settings=RunSettings(controller_address=lambda: None, runner_secret=os.urandom(32)),
            log_session=counted_logs,
            # Counted as the server counts them (its /metrics), so their cost is measured too.
            metrics=metrics,
        )
        # As the app instruments every controller it runs.
        built.controller.instrument(metrics)
        manager = Manager(built.runnables)
        running = asyncio.create_task(manager.run(), name="bench-manager")
        flow = bench_flow(scenario)
        await store.create(flow)
        durations = random.Random(20261128)
        requests_before = counted[0]
        stats = built.reconciler.stats
        writes_before = stats.status_writes
        write_seconds_before = stats.status_write_seconds
        registers_before, register_seconds_before = stats.registrations, stats.register_seconds
        load_before = os.getloadavg()
        agent_before, tasks_before = process_cpu_seconds(agent_pid)
        cpu_before = time.process_time()
        wall_before = time.perf_counter()
        names = [new_ulid() for _ in range(runs)]
        await asyncio.gather(
            *(
                store.create(
                    Run(
                        metadata=ObjectMeta(name=name),
                        spec=RunSpec(
                            flow="bench",
                            flow_spec=flow.spec,
                            variables=run_variables(scenario, durations),
                        ),
                    )
                )
                for name in names
            )
        )
        finished = await wait_finished(store, names)
        wall = time.perf_counter() - wall_before
        cpu = time.process_time() - cpu_before
        agent_after, tasks_after = process_cpu_seconds(agent_pid)
        load_after = os.getloadavg()
        total_steps = runs * steps
        writes = stats.status_writes - writes_before
        write_seconds = stats.status_write_seconds - write_seconds_before
        registers = stats.registrations - registers_before
        register_seconds = stats.register_seconds - register_seconds_before
        nomad_requests = counted[0] - requests_before
        overheads = await transition_overheads(nomad, finished)
        log_latencies = await measure_log_latency(store, built.logs, min(runs, 20))
        manager.stop()
        await running
        await store.close()
    failed = [run.metadata.name for run in finished if run.status.phase != "success"]
    print(f"{scenario.describe()}, failed runs: {len(failed)}")
    print(f"wall time: {wall:.2f} s")
    print(
        "controller overhead per step transition: "
        f"p50 {percentile(overheads, 0.5) * 1000:.1f} ms, "
        f"p99 {percentile(overheads, 0.99) * 1000:.1f} ms, "
        f"max {max(overheads, default=float('nan')) * 1000:.1f} ms "
        f"({len(overheads)} transitions)"
    )
    print(
        f"controller CPU per step: {cpu / total_steps * 1000:.2f} ms ({cpu:.2f} s total, "
        f"{cpu / wall * 100:.0f}% of one core over the wall time)"
    )
    agent_cpu, tasks_cpu = agent_after - agent_before, tasks_after - tasks_before
    print(
        f"dev agent CPU per step: {agent_cpu / total_steps * 1000:.2f} ms "
        f"(+ {tasks_cpu / total_steps * 1000:.2f} ms in the steps' tasks), same cores"
    )
    print(
        f"load average (1 min) before/after: {load_before[0]:.2f}/{load_after[0]:.2f} "
        f"on {os.cpu_count()} cores"
    )
    print(
        f"waited on per status write: {write_seconds / max(writes, 1) * 1000:.1f} ms, "
        f"per job register: {register_seconds / max(registers, 1) * 1000:.1f} ms (means)"
    )
    if runs > 1 and not scenario.sleeps:
        # Runs started together finish their steps together: one event loop (one core) works
        # through the burst of transitions one after the other.
        print(
            f"burst floor: {runs} simultaneous transitions x {cpu / total_steps * 1000:.2f} ms "
            f"of controller CPU = {runs * cpu / total_steps * 1000:.0f} ms for the last of them"
        )
    print(
        "log line latency (printed by a step -> handed to a follower of the log store): "
        f"p50 {percentile(log_latencies, 0.5) * 1000:.1f} ms, "
        f"p99 {percentile(log_latencies, 0.99) * 1000:.1f} ms ({len(log_latencies)} lines)"
    )
    print(
        f"store writes per step: {writes / total_steps:.2f} ({writes} total; per run "
        f"{writes / runs:.2f} = start + {steps - 1} transitions + end)"
    )
    print(f"Nomad requests per step: {nomad_requests / total_steps:.2f} ({nomad_requests} total)")
    print(
        f"reconciles: {stats.reconciles}, failed reconciles (retried): "
        f"{built.controller.errors}, registrations: {stats.registrations}"
    )


LOG_LINES = 5
# Each line is the wall-clock time it was printed at.
TIMESTAMP_SCRIPT = f"for i in $(seq {LOG_LINES}); do date +%s.%N; sleep 0.2; done"


async def measure_log_latency(store: Store, logs: LogStore, runs: int) -> list[float]:
    """Runs a step printing timestamps while followers of its log measure arrival times."""
    job = step_job()
    job["TaskGroups"][0]["Tasks"][0]["Config"] = {
        "command": "/bin/sh",
        "args": ["-c", TIMESTAMP_SCRIPT],
    }
    flow = Flow(
        metadata=ObjectMeta(name="bench-logs"),
        spec={"specification": {"steps": [{"name": "talk", "job": {"json": job}}]}},
    )
    await store.create(flow)
    names = [new_ulid() for _ in range(runs)]

    async def follow(name: str) -> list[float]:
        latencies: list[float] = []
        buffer = b""
        async for chunk in logs.follow("default", name, "talk", "stdout", until=lambda: False):
            arrived = time.time()
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            latencies.extend(arrived - float(line) for line in lines if line.strip())
            if len(latencies) >= LOG_LINES:
                break
        return latencies

    followers = [asyncio.create_task(follow(name), name=f"bench-follow-{name}") for name in names]
    for name in names:
        await store.create(
            Run(
                metadata=ObjectMeta(name=name), spec=RunSpec(flow="bench-logs", flow_spec=flow.spec)
            )
        )
    async with asyncio.timeout(60):
        results = await asyncio.gather(*followers)
    await wait_finished(store, names)
    return [latency for result in results for latency in result]


async def wait_finished(store: Store, names: list[str]) -> list[Run]:
    remaining = set(names)
    done: dict[str, Run] = {}
    listed = await store.list(Run, "default")
    for run in listed.items:
        if run.metadata.name in remaining and run.status.phase in TERMINAL_PHASES:
            done[run.metadata.name] = run
            remaining.discard(run.metadata.name)
    if remaining:
        async for event in store.watch(Run, "default", since=listed.resource_version):
            changed = event.object
            assert isinstance(changed, Run)
            if changed.metadata.name in remaining and changed.status.phase in TERMINAL_PHASES:
                done[changed.metadata.name] = changed
                remaining.discard(changed.metadata.name)
                if not remaining:
                    break
    return [done[name] for name in names]


async def transition_overheads(nomad: NomadClient, runs: list[Run]) -> list[float]:
    """Seconds from a step's allocation ending to the next step's job being registered."""
    overheads: list[float] = []
    for run in runs:
        previous_end: int | None = None
        for step in run.status.steps:
            if step.nomad_job_id is None:
                break
            job, _ = await nomad.get_job(step.nomad_job_id)
            if previous_end is not None:
                overheads.append((int(job["SubmitTime"]) - previous_end) / 1e9)
            allocations, _ = await nomad.job_allocations(step.nomad_job_id)
            ended = [
                int(a["ModifyTime"])
                for a in allocations
                if a.get("ClientStatus") in ("complete", "failed")
            ]
            previous_end = max(ended) if ended else None
    return overheads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", type=int, nargs="+", default=[100], help="concurrent runs (several: each in turn)"
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--step-seconds",
        type=float,
        nargs=2,
        metavar=("MIN", "MAX"),
        help="each step sleeps a random duration in [MIN, MAX] s (0 0: /bin/true); "
        "default: both scenarios in turn, /bin/true then 1-5 s",
    )
    parser.add_argument(
        "--store",
        choices=["nomad-vars", "memory"],
        default="nomad-vars",
        help="where runs are stored (nomad-vars: on the dev agent, as `nomad-pipeline dev`)",
    )
    args = parser.parse_args()
    step_seconds = [tuple(args.step_seconds)] if args.step_seconds else [(0.0, 0.0), (1.0, 5.0)]
    # The controller's process settings, as `nomad-pipeline server` has them.
    tune_garbage_collector()
    for low, high in step_seconds:
        if not 0 <= low <= high:
            parser.error(f"--step-seconds {low:g} {high:g}: need 0 <= MIN <= MAX")
        for runs in args.runs:
            asyncio.run(bench(Scenario(runs, args.steps, args.store, (low, high))))
            print()


if __name__ == "__main__":
    main()
