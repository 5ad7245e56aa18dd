"""Trigger figures: cron firing accuracy with 500 cron triggers, webhook-to-run latency.

Starts a real ``ControllerApp`` (state backend ``dev``: the memory store) on an ephemeral port
with the trigger controllers (``git_controllers_factory``) and every API route, in this process.
The run controller is left out: its work (registering Nomad jobs) is not what is measured here,
and without a Nomad agent it would only retry in the background.

- Cron: ``--cron-triggers`` (500) triggers on ``* * * * *`` on the real clock; after all are
  scheduled, waits for the next minute boundary and measures, per trigger, the delay between the
  scheduled second and its run's creation timestamp in the store. Target: p99 < 1 s.
- Webhooks: ``--deliveries`` (200) signed GitHub push deliveries over HTTP, one at a time; the
  run exists when the answer arrives (it is created, not awaited), so the answer's latency is
  webhook-to-run-created. Target: p99 < 100 ms.

    .venv/bin/python bench/triggers.py [--cron-triggers 500] [--deliveries 200] [--skip-cron]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from nomad_pipeline.app import ControllerApp, ControllerConfig, git_controllers_factory
from nomad_pipeline.resources.kinds import Flow, Run, Trigger
from nomad_pipeline.store.interface import Store

SECRET_ENV = "NP_BENCH_WEBHOOK_SECRET"
SECRET = "bench-secret"
TRIGGER_LABEL = "nomad-pipeline.io/trigger"
# A boundary closer than this after scheduling is skipped: every trigger must be waiting for it.
BOUNDARY_MARGIN = timedelta(seconds=3)
FIRING_DEADLINE = 30.0

FLOW: dict[str, Any] = {
    "kind": "Flow",
    "metadata": {"name": "build", "namespace": "default"},
    "spec": {"inline": {"steps": [{"name": "a", "run": "echo ${trigger.git_sha}"}]}},
}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def figures(name: str, seconds: list[float], target_p99_ms: float) -> str:
    p50 = percentile(seconds, 0.50) * 1000
    p99 = percentile(seconds, 0.99) * 1000
    verdict = "ok" if p99 < target_p99_ms else "MISSED"
    return (
        f"{name}: n={len(seconds)} p50={p50:.1f} ms p99={p99:.1f} ms "
        f"max={max(seconds) * 1000:.1f} ms mean={statistics.mean(seconds) * 1000:.1f} ms "
        f"(target p99 < {target_p99_ms:.0f} ms: {verdict})"
    )


async def wait_for(what: str, check: Any, deadline: float) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while not await check():
        if loop.time() > end:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def bench_cron(store: Store, count: int) -> str:
    for index in range(count):
        await store.create(
            Trigger.model_validate(
                {
                    "kind": "Trigger",
                    "metadata": {"name": f"cron-{index:04d}", "namespace": "default"},
                    "spec": {"flow": "build", "source": {"cron": {"schedules": ["* * * * *"]}}},
                }
            )
        )

    async def all_scheduled() -> bool:
        triggers = (await store.list(Trigger, "default")).items
        cron = [t for t in triggers if t.spec.source.cron is not None]
        return sum(t.status.next_fire_time is not None for t in cron) == count

    await wait_for("every cron trigger to be scheduled", all_scheduled, 60.0)
    now = datetime.now(UTC)
    target = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    if target - now < BOUNDARY_MARGIN:
        target += timedelta(minutes=1)
    print(
        f"cron: {count} triggers scheduled; waiting {(target - now).total_seconds():.1f} s "
        f"for {target.isoformat()}",
        flush=True,
    )

    async def runs_of_target() -> list[Run]:
        runs = (await store.list(Run, "default")).items
        return [
            r
            for r in runs
            if r.spec.trigger.type == "cron" and r.spec.trigger.schedule_time == target
        ]

    await asyncio.sleep(max((target - datetime.now(UTC)).total_seconds(), 0.0))

    async def all_fired() -> bool:
        return len(await runs_of_target()) >= count

    await wait_for("every trigger to fire", all_fired, FIRING_DEADLINE)
    runs = await runs_of_target()
    per_trigger = {run.metadata.labels[TRIGGER_LABEL] for run in runs}
    delays = []
    for run in runs:
        assert run.metadata.creation_timestamp is not None
        delays.append((run.metadata.creation_timestamp - target).total_seconds())
    duplicates = len(runs) - len(per_trigger)
    return figures("cron firing delay after the scheduled second", delays, 1000) + (
        f"; runs={len(runs)} duplicates={duplicates}"
    )


async def bench_webhooks(address: str, store: Store, deliveries: int) -> str:
    await store.create(
        Trigger.model_validate(
            {
                "kind": "Trigger",
                "metadata": {"name": "on-push", "namespace": "default"},
                "spec": {
                    "flow": "build",
                    "source": {
                        "webhook": {"provider": "github", "secret": {"from_env": SECRET_ENV}}
                    },
                },
            }
        )
    )
    payload = {
        "ref": "refs/heads/main",
        "before": "1" * 40,
        "after": "2" * 40,
        "repository": {"name": "app", "full_name": "acme/app", "owner": {"login": "acme"}},
        "pusher": {"name": "dev"},
        "head_commit": {"id": "2" * 40, "message": "change", "author": {"name": "Dev"}},
        "commits": [],
    }
    body = json.dumps(payload).encode()
    signature = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    took: list[float] = []
    async with aiohttp.ClientSession() as http:
        for index in range(deliveries + 5):
            headers = {
                "Content-Type": "application/json",
                "X-GitHub-Event": "push",
                "X-GitHub-Delivery": str(uuid.uuid4()),
                "X-Hub-Signature-256": signature,
            }
            started = time.perf_counter()
            async with http.post(
                f"{address}/v1/triggers/on-push/webhooks", data=body, headers=headers
            ) as response:
                answer = await response.json()
                if response.status != 201:
                    raise SystemExit(f"webhook answered {response.status}: {answer}")
            if index >= 5:  # the first few warm up the connection and the code paths
                took.append(time.perf_counter() - started)
    created = await store.list(Run, "default", selector={TRIGGER_LABEL: "on-push"})
    return figures("webhook to run created", took, 100) + f"; runs={len(created.items)}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cron-triggers", type=int, default=500)
    parser.add_argument("--deliveries", type=int, default=200)
    parser.add_argument("--skip-cron", action="store_true", help="only the webhook figures")
    args = parser.parse_args()
    os.environ[SECRET_ENV] = SECRET
    with tempfile.TemporaryDirectory(prefix="np-bench-triggers-") as data_dir:
        app = ControllerApp(
            ControllerConfig(
                data_dir=Path(data_dir),
                http_addr="127.0.0.1:0",
                # Nothing in this bench talks to Nomad; the address only has to parse.
                nomad_addr="http://127.0.0.1:1",
                nomad_token="",
                state_backend="dev",
            ),
            reconciler_factories=[git_controllers_factory],
        )
        address = await app.start()
        try:
            await app.store.create(Flow.model_validate(FLOW))
            results = [await bench_webhooks(address, app.store, args.deliveries)]
            if not args.skip_cron:
                results.append(await bench_cron(app.store, args.cron_triggers))
        finally:
            await app.stop()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    for line in results:
        print(line)


if __name__ == "__main__":
    asyncio.run(main())
