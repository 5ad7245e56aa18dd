"""ULIDs (sortable, unique, valid names) and durations."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from nomad_pipeline.errors import Invalid
from nomad_pipeline.resources.durations import duration_seconds, parse_duration
from nomad_pipeline.resources.meta import NAME_PATTERN
from nomad_pipeline.resources.ulid import ULID_LENGTH, is_ulid, new_ulid, ulid_for, ulid_time


def test_ulids_are_unique_sorted_and_valid_names() -> None:
    made = [new_ulid() for _ in range(20_000)]
    assert len(set(made)) == len(made)
    assert made == sorted(made)
    for value in made[:100]:
        assert len(value) == ULID_LENGTH
        assert value == value.lower()
        assert NAME_PATTERN.match(value)
        assert is_ulid(value)


def test_ulids_from_threads_stay_unique() -> None:
    results: list[list[str]] = [[] for _ in range(4)]

    def make(out: list[str]) -> None:
        out.extend(new_ulid() for _ in range(2_000))

    threads = [threading.Thread(target=make, args=(out,)) for out in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [value for out in results for value in out]
    assert len(set(everything)) == len(everything)
    for out in results:
        assert out == sorted(out)


def test_ulid_time_is_the_creation_time() -> None:
    before = datetime.now(UTC) - timedelta(milliseconds=1)
    created = ulid_time(new_ulid())
    after = datetime.now(UTC) + timedelta(milliseconds=1)
    assert before <= created <= after


@pytest.mark.parametrize("value", ["", "01J", "01J0000000000000000000000I", "8" + "0" * 25])
def test_not_ulids(value: str) -> None:
    assert not is_ulid(value)
    with pytest.raises(Invalid, match="not a ULID"):
        ulid_time(value)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("5m", 300),
        ("1h30m", 5400),
        ("1.5h", 5400),
        ("250ms", 0.25),
        ("7d", 604800),
        ("1h0m5s", 3605),
        ("90s", 90),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)
    assert duration_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "5 m", "m5", "-5s", "5sec", "1h 30m", "0s", "0m0s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(Invalid, match="invalid duration"):
        parse_duration(text)


def test_ulid_for_is_deterministic_and_time_ordered() -> None:
    moment = datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
    first = ulid_for(moment, "default/nightly@2026-03-29T01:00")
    assert first == ulid_for(moment, "default/nightly@2026-03-29T01:00")
    assert first != ulid_for(moment, "default/other@2026-03-29T01:00")
    assert is_ulid(first)
    assert ulid_time(first) == moment
    assert ulid_for(moment + timedelta(minutes=1), "x") > ulid_for(moment, "x")
