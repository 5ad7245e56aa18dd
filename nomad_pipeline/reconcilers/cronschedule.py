"""Cron schedules in a time zone, with daylight-saving changes handled one documented way.

Pure: no I/O, no clock; callers pass instants (aware datetimes). Expressions are standard 5-field
cron or the ``@hourly``-style macros, matched against the wall clock of ``timezone``.

Daylight-saving rules (the ones Vixie cron and most schedulers follow):
- **Spring forward (a wall time that does not exist)**: a schedule that names a time inside the
  skipped hour fires once, at the instant the gap ends (02:30 on the Berlin spring-forward day
  fires at 03:00 CEST). Several skipped times collapse into that one firing.
- **Fall back (a wall time that happens twice)**: a schedule whose hour field is fixed fires once,
  at the first occurrence; a schedule that runs every hour (``*/15 * * * *``, ``@hourly``) follows
  real time and fires in both occurrences.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import croniter

# Wall time and real time differ by at most this much across any DST change in the tz database.
_MAX_DST_SHIFT = timedelta(hours=2)
_MINUTE = timedelta(minutes=1)


def _wall(instant: datetime, tz: ZoneInfo) -> datetime:
    return instant.astimezone(tz).replace(tzinfo=None)


def _instants_of(wall: datetime, tz: ZoneInfo, *, every_hour: bool) -> list[datetime]:
    """The real instants (UTC) at which a matching wall-clock time fires (see module rules)."""
    first = wall.replace(tzinfo=tz, fold=0)
    second = wall.replace(tzinfo=tz, fold=1)
    first_utc, second_utc = first.astimezone(UTC), second.astimezone(UTC)
    exists = _wall(first_utc, tz) == wall or _wall(second_utc, tz) == wall
    if not exists:
        # In the gap: fire when it ends, i.e. at the first minute whose wall time is past `wall`.
        moment = min(first_utc, second_utc).replace(second=0, microsecond=0)
        while _wall(moment, tz) <= wall:
            moment += _MINUTE
        return [moment]
    if first_utc == second_utc or not every_hour:
        return [first_utc]
    return sorted({first_utc, second_utc})


@dataclass(frozen=True, slots=True)
class CronSchedule:
    expressions: tuple[str, ...]
    timezone: ZoneInfo

    @classmethod
    def parse(cls, expressions: Sequence[str], timezone: str = "UTC") -> CronSchedule:
        """Raises ValueError naming the bad expression or time zone."""
        if not expressions:
            raise ValueError("at least one cron expression is required")
        for expression in expressions:
            if not croniter.is_valid(expression):
                raise ValueError(f"invalid cron expression {expression!r}")
        return cls(tuple(expressions), ZoneInfo(timezone))

    def _every_hour(self, expression: str) -> bool:
        hours = croniter(expression).expanded[1]
        return hours == ["*"] or len(hours) == 24

    def _walk(
        self, expression: str, start: datetime, *, forward: bool
    ) -> Iterator[tuple[datetime, list[datetime]]]:
        """Matching wall times of one expression from ``start`` on (or back), with instants."""
        every_hour = self._every_hour(expression)
        wall_times = croniter(expression, start)
        while True:
            wall = wall_times.get_next(datetime) if forward else wall_times.get_prev(datetime)
            yield wall, _instants_of(wall, self.timezone, every_hour=every_hour)

    def next_after(self, after: datetime) -> datetime:
        """The first fire time strictly after the instant ``after``."""
        # Around a fall-back change, wall-time order is not real-time order, so every wall time
        # within the DST shift of the first match is considered before choosing the earliest.
        after_wall = _wall(after, self.timezone)
        best: datetime | None = None
        for expression in self.expressions:
            for wall, instants in self._walk(expression, after_wall - _MAX_DST_SHIFT, forward=True):
                later = [t for t in instants if t > after]
                if later and (best is None or min(later) < best):
                    best = min(later)
                if best is not None and wall > _wall(best, self.timezone) + _MAX_DST_SHIFT:
                    break
        assert best is not None  # a valid cron expression always fires again
        return best

    def latest_due(self, after: datetime, now: datetime) -> datetime | None:
        """The most recent fire time in ``(after, now]``, or None.

        After downtime this is the one firing to catch up with: never a burst of missed runs.
        """
        now_wall = _wall(now, self.timezone)
        latest: datetime | None = None
        for expression in self.expressions:
            for wall, instants in self._walk(expression, now_wall + _MAX_DST_SHIFT, forward=False):
                due = [t for t in instants if after < t <= now]
                if due and (latest is None or max(due) > latest):
                    latest = max(due)
                if (
                    wall < now_wall - 2 * _MAX_DST_SHIFT
                    or wall < _wall(after, self.timezone) - _MAX_DST_SHIFT
                ):
                    break
        return latest

    def fire_times(self, after: datetime, until: datetime) -> list[datetime]:
        """Every fire time in ``(after, until]``, merged across expressions (for previews/tests)."""
        times: list[datetime] = []
        moment = after
        while (moment := self.next_after(moment)) <= until:
            times.append(moment)
        return times
