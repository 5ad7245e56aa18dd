"""Status.with_condition and ready_condition: the Ready bookkeeping the reconcilers share."""

from __future__ import annotations

from datetime import UTC, datetime

from nomad_pipeline.resources.meta import Condition, Status, ready_condition

EARLIER = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
LATER = datetime(2026, 1, 1, 13, 0, tzinfo=UTC)


def test_ready_condition_records_the_observation() -> None:
    condition = ready_condition("False", "FetchFailed", "no route", LATER, 4)
    assert condition == Condition(
        type="Ready",
        status="False",
        reason="FetchFailed",
        message="no route",
        last_transition_time=LATER,
        observed_generation=4,
    )


def test_with_condition_adds_a_missing_condition_last() -> None:
    other = Condition(type="Stalled", status="False")
    status = Status(conditions=[other])
    added = ready_condition("True", "Applied", "ok", LATER, 1)
    assert status.with_condition(added) == [other, added]


def test_with_condition_keeps_the_transition_time_while_the_status_holds() -> None:
    other = Condition(type="Stalled", status="False")
    status = Status(conditions=[ready_condition("True", "Applied", "old", EARLIER, 1), other])
    [kept_other, ready] = status.with_condition(ready_condition("True", "Polling", "new", LATER, 2))
    assert kept_other == other
    assert (ready.reason, ready.message, ready.observed_generation) == ("Polling", "new", 2)
    assert ready.last_transition_time == EARLIER


def test_with_condition_takes_the_new_time_when_the_status_flips() -> None:
    status = Status(conditions=[ready_condition("True", "Applied", "ok", EARLIER, 1)])
    [ready] = status.with_condition(ready_condition("False", "ApplyFailed", "bad", LATER, 1))
    assert (ready.status, ready.last_transition_time) == ("False", LATER)


def test_with_condition_leaves_the_status_itself_unchanged() -> None:
    original = ready_condition("True", "Applied", "ok", EARLIER, 1)
    status = Status(conditions=[original])
    status.with_condition(ready_condition("False", "ApplyFailed", "bad", LATER, 1))
    assert status.conditions == [original]
