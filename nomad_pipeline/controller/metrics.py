"""Prometheus metrics of the API server, in a registry owned by one application.

A per-app ``CollectorRegistry`` (never the global one) keeps two servers in one process, as in
the tests, from colliding on metric names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
