"""Prometheus metrics of the API server and the controllers, in a registry owned by one
application.

A per-app ``CollectorRegistry`` (never the global one) keeps two servers in one process, as in
the tests, from colliding on metric names.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

# Latency buckets sized for an API whose reads are served from memory (sub-millisecond) and
# whose writes may wait on Nomad (tens to hundreds of milliseconds).
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


@dataclass
class ApiMetrics:
    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True)
    )

    def __post_init__(self) -> None:
        self.requests = Counter(
            "nomad_pipeline_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "nomad_pipeline_http_request_duration_seconds",
            "Time to answer an HTTP request (a watch counts until its stream ends).",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.objects = Gauge(
            "nomad_pipeline_store_objects",
            "Objects held by the store, by kind (sampled when /metrics is scraped).",
            ["kind"],
            registry=self.registry,
        )
        self.leader = Gauge(
            "nomad_pipeline_leader",
            "1 while this instance runs the reconcilers: it holds the leader lock, or leader "
            "election is off; 0 on a follower (which still serves the API).",
            registry=self.registry,
        )

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        labels = (route, method, str(status))
        self.requests.labels(*labels).inc()
        self.latency.labels(*labels).observe(seconds)


# Run durations span a trivial step (seconds) to a long deployment pipeline (hours).
RUN_DURATION_BUCKETS = (
    1.0,
    5.0,
    15.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
    21600.0,
)


class BucketCounts:
    """A histogram's state as plain numbers: observing is a bisect and two additions, with no
    lock (prometheus_client's children take one per call), cheap enough for every reconcile and
    every queue hand-off. Exposed at scrape time by :class:`ControllerMetrics`."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        # One count per bound plus the +Inf overflow, not cumulative (made so when exposed).
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        # Prometheus buckets are upper-inclusive: the first bound >= value takes it.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == math.inf else str(bound), running))
        return buckets


class ReconcileCounters:
    """One controller's reconcile outcomes (controller-runtime's ``controller_runtime_reconcile_*``
    set). ``Controller`` updates the fields directly on its hot path."""

    __slots__ = ("duration", "errors", "requeue", "requeue_after", "success")

    def __init__(self) -> None:
        self.success = 0
        self.errors = 0
        self.requeue = 0
        self.requeue_after = 0
        self.duration = BucketCounts(LATENCY_BUCKETS)


class QueueCounters:
    """One work queue's adds, retries and waits (client-go's ``workqueue_*`` set); its depth is
    read from the queue when scraped."""

    __slots__ = ("adds", "depth", "queue_duration", "retries")

    def __init__(self) -> None:
        self.adds = 0
        self.retries = 0
        self.queue_duration = BucketCounts(LATENCY_BUCKETS)
        self.depth: Callable[[], int] = lambda: 0


class _EventStream(Protocol):
    """What is sampled of ``reconcilers.nomadwatch.NomadEventSource`` (structurally: the
    controller layer does not import reconcilers)."""

    @property
    def reconnects(self) -> int: ...

    @property
    def fallback(self) -> object | None: ...


class RunMetrics:
    """Runs and steps that finished, counted by the run reconciler on the status write that made
    a run terminal (so once per run, whatever the reconciles or restarts around it). Labels are
    namespaces, flows and phases only: run and step names would be unbounded."""

    def __init__(self) -> None:
        self.runs_finished: dict[tuple[str, str, str], int] = {}
        self.steps_finished: dict[tuple[str, str, str], int] = {}
        self.run_durations: dict[tuple[str, str], BucketCounts] = {}

    def run_finished(self, namespace: str, flow: str, phase: str, seconds: float | None) -> None:
        """``seconds`` is None for a run that never started (skipped or cancelled while
        pending): it has no duration to observe."""
        key = (namespace, flow, phase)
        self.runs_finished[key] = self.runs_finished.get(key, 0) + 1
        if seconds is None:
            return
        durations = self.run_durations.get((namespace, flow))
        if durations is None:
            durations = self.run_durations[(namespace, flow)] = BucketCounts(RUN_DURATION_BUCKETS)
        durations.observe(seconds)

    def step_finished(self, namespace: str, flow: str, phase: str) -> None:
        key = (namespace, flow, phase)
        self.steps_finished[key] = self.steps_finished.get(key, 0) + 1


class ControllerMetrics:
    """The controllers' metrics in the API's per-app registry, exposed by its ``/metrics``.

    Hot paths update plain counters (:class:`ReconcileCounters`, :class:`QueueCounters`,
    :class:`RunMetrics`); this collector turns them into Prometheus families when scraped, and
    samples the event stream and the log copier then. Counters are kept per controller name, so
    controllers rebuilt when leadership is regained keep counting where the previous ones
    stopped.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._reconciles: dict[str, ReconcileCounters] = {}
        self._queues: dict[str, QueueCounters] = {}
        self.runs = RunMetrics()
        self._event_stream: _EventStream | None = None
        # Reconnects of event streams replaced since (a counter must never go down).
        self._earlier_reconnects = 0
        self._log_copies: Callable[[], int] = lambda: 0
        registry.register(self)

    def reconciles(self, controller: str) -> ReconcileCounters:
        """The counters of the controller named ``controller`` (created on first use)."""
        counters = self._reconciles.get(controller)
        if counters is None:
            counters = self._reconciles[controller] = ReconcileCounters()
        return counters

    def workqueue(self, name: str) -> QueueCounters:
        """The counters of the work queue named ``name`` (created on first use)."""
        counters = self._queues.get(name)
        if counters is None:
            counters = self._queues[name] = QueueCounters()
        return counters

    def watch_event_stream(self, stream: _EventStream) -> None:
        """Sample ``stream`` (a ``NomadEventSource``) from now on, replacing an earlier one."""
        if self._event_stream is not None:
            self._earlier_reconnects += self._event_stream.reconnects
        self._event_stream = stream

    def watch_log_copies(self, active: Callable[[], int]) -> None:
        """``active()`` answers how many step logs are being copied (the ``LogCopier``'s len)."""
        self._log_copies = active

    def collect(self) -> Iterator[Metric]:
        yield from self._reconcile_families()
        yield from self._queue_families()
        yield from self._run_families()
        stream = self._event_stream
        reconnects = CounterMetricFamily(
            "nomad_pipeline_nomad_event_stream_reconnects",
            "Times Nomad's event stream broke and was opened again.",
        )
        reconnects.add_metric(
            [], self._earlier_reconnects + (stream.reconnects if stream is not None else 0)
        )
        yield reconnects
        yield GaugeMetricFamily(
            "nomad_pipeline_nomad_event_stream_fallback",
            "1 while blocking queries stand in for Nomad's event stream (it failed repeatedly).",
            value=1 if stream is not None and stream.fallback is not None else 0,
        )
        yield GaugeMetricFamily(
            "nomad_pipeline_log_copies_active",
            "Step logs being copied from Nomad allocations into the log store.",
            value=self._log_copies(),
        )

    def _reconcile_families(self) -> Iterator[Metric]:
        total = CounterMetricFamily(
            "nomad_pipeline_reconcile",
            "Reconciles by controller and result (success, error, requeue, requeue_after).",
            labels=["controller", "result"],
        )
        errors = CounterMetricFamily(
            "nomad_pipeline_reconcile_errors",
            "Reconciles that raised (transient or terminal), by controller.",
            labels=["controller"],
        )
        duration = HistogramMetricFamily(
            "nomad_pipeline_reconcile_duration_seconds",
            "Time one reconcile took, by controller.",
            labels=["controller"],
        )
        for name, counters in self._reconciles.items():
            total.add_metric([name, "success"], counters.success)
            total.add_metric([name, "error"], counters.errors)
            total.add_metric([name, "requeue"], counters.requeue)
            total.add_metric([name, "requeue_after"], counters.requeue_after)
            errors.add_metric([name], counters.errors)
            duration.add_metric([name], counters.duration.cumulative(), counters.duration.total)
        yield from (total, errors, duration)

    def _queue_families(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "nomad_pipeline_workqueue_depth",
            "Keys waiting in a work queue for a worker (not delayed, not in flight).",
            labels=["name"],
        )
        adds = CounterMetricFamily(
            "nomad_pipeline_workqueue_adds",
            "Keys added to a work queue (an add of a key already waiting is not counted).",
            labels=["name"],
        )
        retries = CounterMetricFamily(
            "nomad_pipeline_workqueue_retries",
            "Keys re-added with backoff after a failed reconcile.",
            labels=["name"],
        )
        waited = HistogramMetricFamily(
            "nomad_pipeline_workqueue_queue_duration_seconds",
            "Time a key waited in a work queue before a worker took it.",
            labels=["name"],
        )
        for name, counters in self._queues.items():
            depth.add_metric([name], counters.depth())
            adds.add_metric([name], counters.adds)
            retries.add_metric([name], counters.retries)
            waited.add_metric(
                [name], counters.queue_duration.cumulative(), counters.queue_duration.total
            )
        yield from (depth, adds, retries, waited)

    def _run_families(self) -> Iterator[Metric]:
        yield _finished_counter(
            "nomad_pipeline_runs_finished",
            "Runs that ended, by namespace, flow and phase (success, failed, cancelled, skipped).",
            self.runs.runs_finished,
        )
        yield _finished_counter(
            "nomad_pipeline_steps_finished",
            "Steps of ended runs, by namespace, flow and final phase (counted when the run ends).",
            self.runs.steps_finished,
        )
        durations = HistogramMetricFamily(
            "nomad_pipeline_run_duration_seconds",
            "Time from a run's start to its end, by namespace and flow.",
            labels=["namespace", "flow"],
        )
        for (namespace, flow), buckets in self.runs.run_durations.items():
            durations.add_metric([namespace, flow], buckets.cumulative(), buckets.total)
        yield durations


def _finished_counter(
    name: str, documentation: str, counts: dict[tuple[str, str, str], int]
) -> CounterMetricFamily:
    """A counter family of ``RunMetrics``' ended runs or steps, keyed (namespace, flow, phase)."""
    family = CounterMetricFamily(name, documentation, labels=["namespace", "flow", "phase"])
    for labels, count in counts.items():
        family.add_metric(list(labels), count)
    return family
