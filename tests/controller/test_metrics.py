"""ControllerMetrics exposed through a registry: reconcile results, work queues, event stream
sampling; read back with Prometheus' own parser."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from metric_samples import Samples, parse_samples, value
from prometheus_client import CollectorRegistry, generate_latest

from nomad_pipeline.controller.metrics import BucketCounts, ControllerMetrics
from nomad_pipeline.controller.runtime import Controller, Request, Result
from nomad_pipeline.controller.workqueue import Backoff, WorkQueue
from nomad_pipeline.errors import TerminalError


def exposed(registry: CollectorRegistry) -> Samples:
    return parse_samples(generate_latest(registry).decode())


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.002)


class ScriptedReconciler:
    """Answers each object name with its own outcome, counting calls."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    async def reconcile(self, request: Request) -> Result:
        calls = self.calls[request.name] = self.calls.get(request.name, 0) + 1
        if request.name == "flaky" and calls == 1:
            raise RuntimeError("transient")
        if request.name == "broken":
            raise TerminalError("cannot ever work")
        if request.name == "again" and calls == 1:
            return Result(requeue_after=0)
        if request.name == "later" and calls == 1:
            return Result(requeue_after=0.01)
        return Result()


async def test_reconcile_results_and_queue_are_exposed() -> None:
    registry = CollectorRegistry(auto_describe=True)
    metrics = ControllerMetrics(registry)
    reconciler = ScriptedReconciler()
    controller = Controller("things", reconciler, WorkQueue(backoff=Backoff(base=0.001)), workers=2)
    controller.instrument(metrics)
    task = asyncio.create_task(controller.run())
    try:
        for name in ("ok", "flaky", "broken", "again", "later"):
            controller.enqueue(Request("Thing", "default", name))
        await eventually(
            lambda: reconciler.calls == {"ok": 1, "flaky": 2, "broken": 1, "again": 2, "later": 2}
        )
        await eventually(lambda: controller.queue.in_flight == 0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    samples = exposed(registry)
    results = {
        result: value(samples, "nomad_pipeline_reconcile_total", controller="things", result=result)
        for result in ("success", "error", "requeue", "requeue_after")
    }
    # ok, flaky's retry, again's and later's second passes succeed; broken and flaky's first fail.
    assert results == {"success": 4, "error": 2, "requeue": 1, "requeue_after": 1}
    assert value(samples, "nomad_pipeline_reconcile_errors_total", controller="things") == 2
    assert (
        value(samples, "nomad_pipeline_reconcile_duration_seconds_count", controller="things") == 8
    )
    assert value(samples, "nomad_pipeline_workqueue_adds_total", name="things") == 8
    assert value(samples, "nomad_pipeline_workqueue_retries_total", name="things") == 1
    assert (
        value(samples, "nomad_pipeline_workqueue_queue_duration_seconds_count", name="things") == 8
    )
    assert value(samples, "nomad_pipeline_workqueue_depth", name="things") == 0


async def test_depth_counts_keys_waiting_for_a_worker() -> None:
    registry = CollectorRegistry(auto_describe=True)
    metrics = ControllerMetrics(registry)
    queue: WorkQueue[str] = WorkQueue()
    queue.instrument(metrics, "waiting")
    for key in ("a", "b", "a", "c"):
        queue.add(key)
    samples = exposed(registry)
    assert value(samples, "nomad_pipeline_workqueue_depth", name="waiting") == 3
    assert value(samples, "nomad_pipeline_workqueue_adds_total", name="waiting") == 3
    await queue.get()
    samples = exposed(registry)
    assert value(samples, "nomad_pipeline_workqueue_depth", name="waiting") == 2
    assert (
        value(samples, "nomad_pipeline_workqueue_queue_duration_seconds_count", name="waiting") == 1
    )


class EventStream:
    def __init__(self, reconnects: int, fallback: object | None) -> None:
        self.reconnects = reconnects
        self.fallback = fallback


def test_event_stream_reconnects_never_go_down_when_the_stream_is_replaced() -> None:
    registry = CollectorRegistry(auto_describe=True)
    metrics = ControllerMetrics(registry)
    samples = exposed(registry)
    assert value(samples, "nomad_pipeline_nomad_event_stream_reconnects_total") == 0
    assert value(samples, "nomad_pipeline_nomad_event_stream_fallback") == 0
    metrics.watch_event_stream(EventStream(3, fallback="blocking queries"))
    metrics.watch_log_copies(lambda: 7)
    samples = exposed(registry)
    assert value(samples, "nomad_pipeline_nomad_event_stream_reconnects_total") == 3
    assert value(samples, "nomad_pipeline_nomad_event_stream_fallback") == 1
    assert value(samples, "nomad_pipeline_log_copies_active") == 7
    # Leadership regained: a new source starts from zero, the exposed counter keeps going.
    metrics.watch_event_stream(EventStream(1, fallback=None))
    samples = exposed(registry)
    assert value(samples, "nomad_pipeline_nomad_event_stream_reconnects_total") == 4
    assert value(samples, "nomad_pipeline_nomad_event_stream_fallback") == 0


def test_run_durations_fall_in_upper_inclusive_buckets() -> None:
    registry = CollectorRegistry(auto_describe=True)
    metrics = ControllerMetrics(registry)
    metrics.runs.run_finished("ci", "build", "success", 60.0)
    metrics.runs.run_finished("ci", "build", "success", 7200.5)
    metrics.runs.run_finished("ci", "build", "skipped", None)
    samples = exposed(registry)

    def bucket(le: str) -> float | None:
        return value(
            samples,
            "nomad_pipeline_run_duration_seconds_bucket",
            namespace="ci",
            flow="build",
            le=le,
        )

    assert (bucket("30.0"), bucket("60.0"), bucket("7200.0"), bucket("14400.0")) == (0, 1, 1, 2)
    assert bucket("+Inf") == 2
    assert (
        value(samples, "nomad_pipeline_run_duration_seconds_sum", namespace="ci", flow="build")
        == 7260.5
    )
    assert (
        value(
            samples,
            "nomad_pipeline_runs_finished_total",
            namespace="ci",
            flow="build",
            phase="skipped",
        )
        == 1
    )


def test_bucket_counts_beyond_the_last_bound_go_to_inf() -> None:
    counts = BucketCounts((1.0, 2.0))
    for observed in (0.5, 1.0, 1.5, 99.0):
        counts.observe(observed)
    assert counts.cumulative() == [("1.0", 2), ("2.0", 3), ("+Inf", 4)]
