"""Cron schedules across minute boundaries and daylight-saving changes (pure, no clock)."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from nomad_pipeline.reconcilers.cronschedule import CronSchedule


def local(tz: str, *args: int, fold: int = 0) -> datetime:
    return datetime(*args, tzinfo=ZoneInfo(tz), fold=fold).astimezone(UTC)  # type: ignore[misc]


def test_every_minute_fires_on_minute_boundaries() -> None:
    schedule = CronSchedule.parse(["* * * * *"])
    after = datetime(2026, 1, 1, 12, 0, 30, tzinfo=UTC)
    assert schedule.next_after(after) == datetime(2026, 1, 1, 12, 1, tzinfo=UTC)
    assert schedule.next_after(datetime(2026, 1, 1, 12, 1, tzinfo=UTC)) == datetime(
        2026, 1, 1, 12, 2, tzinfo=UTC
    )


def test_several_expressions_merge_in_time_order() -> None:
    schedule = CronSchedule.parse(["0 * * * *", "30 * * * *"])
    times = schedule.fire_times(
        datetime(2026, 1, 1, 0, 0, tzinfo=UTC), datetime(2026, 1, 1, 2, 0, tzinfo=UTC)
    )
    assert [t.strftime("%H:%M") for t in times] == ["00:30", "01:00", "01:30", "02:00"]


def test_macros_are_accepted() -> None:
    schedule = CronSchedule.parse(["@hourly"])
    assert schedule.next_after(datetime(2026, 1, 1, 5, 10, tzinfo=UTC)) == datetime(
        2026, 1, 1, 6, 0, tzinfo=UTC
    )


@pytest.mark.parametrize(
    ("expressions", "timezone", "message"),
    [
        (["61 * * * *"], "UTC", "invalid cron expression '61 * * * *'"),
        (["* * *"], "UTC", "invalid cron expression '* * *'"),
        ([], "UTC", "at least one cron expression"),
    ],
)
def test_bad_schedules_are_refused_by_name(
    expressions: list[str], timezone: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        CronSchedule.parse(expressions, timezone)


@pytest.mark.parametrize(
    ("tz", "day", "gap_end_hour"),
    [("Europe/Berlin", (2026, 3, 29), 3), ("America/New_York", (2026, 3, 8), 3)],
)
def test_spring_forward_fires_once_when_the_gap_ends(
    tz: str, day: tuple[int, int, int], gap_end_hour: int
) -> None:
    schedule = CronSchedule.parse(["30 2 * * *"], tz)
    before = local(tz, *day, 0, 0)
    fired = schedule.next_after(before)
    assert fired == local(tz, *day, gap_end_hour, 0)
    # The next firing is the normal 02:30 of the following day: no double firing.
    assert schedule.next_after(fired) == local(tz, day[0], day[1], day[2] + 1, 2, 30)


def test_spring_forward_collapses_several_skipped_times_into_one() -> None:
    tz = "Europe/Berlin"
    schedule = CronSchedule.parse(["*/20 2 * * *"], tz)
    times = schedule.fire_times(local(tz, 2026, 3, 29, 0, 0), local(tz, 2026, 3, 29, 4, 0))
    assert times == [local(tz, 2026, 3, 29, 3, 0)]


@pytest.mark.parametrize(
    ("tz", "day"), [("Europe/Berlin", (2026, 10, 25)), ("America/New_York", (2026, 11, 1))]
)
def test_fall_back_fixed_time_fires_at_first_occurrence_only(
    tz: str, day: tuple[int, int, int]
) -> None:
    hour = 2 if tz == "Europe/Berlin" else 1
    schedule = CronSchedule.parse([f"30 {hour} * * *"], tz)
    times = schedule.fire_times(local(tz, *day, 0, 0), local(tz, *day, 6, 0))
    assert times == [local(tz, *day, hour, 30, fold=0)]


def test_fall_back_hourly_schedule_follows_real_time() -> None:
    tz = "Europe/Berlin"
    schedule = CronSchedule.parse(["*/30 * * * *"], tz)
    start = local(tz, 2026, 10, 25, 1, 45)
    times = schedule.fire_times(start, local(tz, 2026, 10, 25, 3, 0))
    # 02:00 and 02:30 happen twice (CEST, then CET): four real half-hours, then 03:00.
    assert [(t - start).total_seconds() / 60 for t in times] == [15, 45, 75, 105, 135]


def test_latest_due_after_downtime_is_one_firing_not_a_burst() -> None:
    schedule = CronSchedule.parse(["*/5 * * * *"])
    last = datetime(2026, 1, 1, 10, 0, tzinfo=UTC)
    now = datetime(2026, 1, 1, 13, 7, tzinfo=UTC)
    assert schedule.latest_due(last, now) == datetime(2026, 1, 1, 13, 5, tzinfo=UTC)
    assert schedule.latest_due(now, now) is None


def test_latest_due_across_fall_back_sees_the_first_occurrence() -> None:
    tz = "Europe/Berlin"
    schedule = CronSchedule.parse(["30 2 * * *"], tz)
    # Now is 02:10 of the second (CET) occurrence; 02:30 CEST happened 40 minutes earlier.
    now = local(tz, 2026, 10, 25, 2, 10, fold=1)
    due = schedule.latest_due(local(tz, 2026, 10, 24, 12, 0), now)
    assert due == local(tz, 2026, 10, 25, 2, 30, fold=0)
