"""Prometheus text exposition read back with Prometheus' own parser, for asserting on metrics.

Importable from every test folder, like ``ports.py``.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

# (sample name, its labels) -> value; a sample name carries its suffix (_total, _count, _sum).
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_samples(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, metric: str, /, **labels: str) -> float | None:
    """The sample with exactly these labels, or None when it is not exposed."""
    return samples.get((metric, frozenset(labels.items())))
