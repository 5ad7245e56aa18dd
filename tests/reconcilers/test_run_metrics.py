"""/metrics of the real controller app on the dev agent: finished runs and steps counted once
each (also across a restart that re-reads them), reconciles and work queues."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aiohttp
from metric_samples import Samples, parse_samples, value
from run_harness import DEADLINE_SECONDS, spec_step, wait_run_in_store

from nomad_pipeline.app import ControllerApp, ControllerConfig
from nomad_pipeline.devagent.server import DevAgent, DevAgentConfig
from nomad_pipeline.resources.kinds import Flow
from nomad_pipeline.resources.meta import ObjectMeta


async def scrape(http: aiohttp.ClientSession, address: str) -> Samples:
    async with http.get(f"{address}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return parse_samples(text)


def named(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: found for (sample, labels), found in samples.items() if sample == name}


async def scrape_until(
    http: aiohttp.ClientSession, address: str, check: Callable[[Samples], bool]
) -> Samples:
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE_SECONDS
    while True:
        samples = await scrape(http, address)
        if check(samples):
            return samples
        if loop.time() > end:
            raise AssertionError(f"metrics never got there: {samples}")
        await asyncio.sleep(0.05)


def controller(nomad_address: str, data_dir: Path) -> ControllerApp:
    # The nomad-vars backend keeps the runs in the dev agent across the controller's restart.
    return ControllerApp(
        ControllerConfig(
            data_dir=data_dir,
            http_addr="127.0.0.1:0",
            nomad_addr=nomad_address,
            nomad_token="",
            state_backend="nomad-vars",
        )
    )


async def start_run(app: ControllerApp, http: aiohttp.ClientSession, flow: str) -> str:
    async with http.post(f"{app.address}/v1/flows/{flow}/run", json={"variables": {}}) as answer:
        body = await answer.json()
        assert answer.status == 201, body
        run_id: str = body["run_id"]
        return run_id


async def test_finished_runs_and_steps_are_counted_once(tmp_path: Path) -> None:
    agent = DevAgent(DevAgentConfig(port=0, data_dir=tmp_path / "nomad"))
    nomad_address = await agent.start()
    app = controller(nomad_address, tmp_path / "controller")
    try:
        async with aiohttp.ClientSession() as http:
            await app.start()
            specification = {"steps": [spec_step("build", "true"), spec_step("test", "true")]}
            await app.store.create(
                Flow(metadata=ObjectMeta(name="good"), spec={"specification": specification})
            )
            failing = {"steps": [spec_step("broken", "exit 3")]}
            await app.store.create(
                Flow(metadata=ObjectMeta(name="bad"), spec={"specification": failing})
            )
            good = await wait_run_in_store(app.store, await start_run(app, http, "good"))
            bad = await wait_run_in_store(app.store, await start_run(app, http, "bad"))
            assert (good.status.phase, bad.status.phase) == ("success", "failed")
            assert app.address is not None

            samples = await scrape(http, app.address)
            assert named(samples, "nomad_pipeline_runs_finished_total") == {
                frozenset({("namespace", "default"), ("flow", "good"), ("phase", "success")}): 1,
                frozenset({("namespace", "default"), ("flow", "bad"), ("phase", "failed")}): 1,
            }
            assert named(samples, "nomad_pipeline_steps_finished_total") == {
                frozenset({("namespace", "default"), ("flow", "good"), ("phase", "success")}): 2,
                frozenset({("namespace", "default"), ("flow", "bad"), ("phase", "failed")}): 1,
            }
            durations = value(
                samples,
                "nomad_pipeline_run_duration_seconds_count",
                namespace="default",
                flow="good",
            )
            assert durations == 1
            success = value(
                samples, "nomad_pipeline_reconcile_total", controller="runs", result="success"
            )
            assert success is not None and success > 0
            assert value(samples, "nomad_pipeline_reconcile_errors_total", controller="runs") == 0
            reconciles = value(
                samples, "nomad_pipeline_reconcile_duration_seconds_count", controller="runs"
            )
            assert reconciles is not None and reconciles >= success
            adds = value(samples, "nomad_pipeline_workqueue_adds_total", name="runs")
            assert adds is not None and adds > 0
            waits = value(
                samples, "nomad_pipeline_workqueue_queue_duration_seconds_count", name="runs"
            )
            assert waits is not None and 0 < waits <= adds
            assert value(samples, "nomad_pipeline_workqueue_depth", name="runs") is not None
            assert value(samples, "nomad_pipeline_workqueue_retries_total", name="runs") == 0
            # Every controller is counted, whichever factory built it.
            assert (
                value(samples, "nomad_pipeline_workqueue_adds_total", name="triggers") is not None
            )
            assert value(samples, "nomad_pipeline_nomad_event_stream_fallback") == 0
            assert value(samples, "nomad_pipeline_nomad_event_stream_reconnects_total") is not None
            assert value(samples, "nomad_pipeline_log_copies_active") is not None

            await app.stop()
            app = controller(nomad_address, tmp_path / "controller")
            address = await app.start()
            # The new process reconciles both finished runs again, and counts neither.
            restarted = await scrape_until(
                http,
                address,
                lambda found: (
                    (
                        value(
                            found,
                            "nomad_pipeline_reconcile_total",
                            controller="runs",
                            result="success",
                        )
                        or 0
                    )
                    >= 2
                ),
            )
            assert named(restarted, "nomad_pipeline_runs_finished_total") == {}
            assert named(restarted, "nomad_pipeline_steps_finished_total") == {}
    finally:
        await app.stop()
        await agent.stop()
