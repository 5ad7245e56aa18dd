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
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import croniter

# Wall time and real time differ by at most this much across any DST change in the tz database.
_MAX_DST_SHIFT = timedelta(hours=2)
_MINUTE = timedelta(minutes=1)
# Spans shorter than this hold at most one DST change in every zone of the tz database, so
# an equal UTC offset at both ends means none.
_FIXED_OFFSET_SPAN = timedelta(days=1)


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
    # One croniter per expression for the fast paths, moved to each start: building one
    # re-parses the expression, the largest cost of a reconcile of an every-minute schedule.
    # Used without awaiting in between, so concurrent reconciles never interleave on one.
    _cursors: dict[str, croniter] = field(default_factory=dict, compare=False, repr=False)

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

    def _fixed_offset(self, start: datetime, end: datetime) -> bool:
        """True when no DST change can lie between the instants ``start`` and ``end``: the span
        is short and the zone's UTC offset is the same at both ends."""
        if end - start > _FIXED_OFFSET_SPAN:
            return False
        return (
            start.astimezone(self.timezone).utcoffset() == end.astimezone(self.timezone).utcoffset()
        )

    def _cursor(self, expression: str, start: datetime) -> croniter:
        cursor = self._cursors.get(expression)
        if cursor is None:
            cursor = self._cursors[expression] = croniter(expression, start)
        else:
            cursor.set_current(start, force=True)
        return cursor

    def _instant(self, wall: datetime) -> datetime:
        return wall.replace(tzinfo=self.timezone).astimezone(UTC)

    def next_after(self, after: datetime) -> datetime:
        """The first fire time strictly after the instant ``after``."""
        return min(self._next_after(expression, after) for expression in self.expressions)

    def _next_after(self, expression: str, after: datetime) -> datetime:
        after_wall = _wall(after, self.timezone)
        # Fast path: with one UTC offset around the answer, wall time maps to real time 1:1.
        candidate = self._instant(self._cursor(expression, after_wall).get_next(datetime))
        if self._fixed_offset(after - _MAX_DST_SHIFT, candidate + _MAX_DST_SHIFT):
            return candidate
        # Around a fall-back change, wall-time order is not real-time order, so every wall time
        # within the DST shift of the first match is considered before choosing the earliest.
        best: datetime | None = None
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
        due = [
            found
            for expression in self.expressions
            if (found := self._latest_due(expression, after, now)) is not None
        ]
        return max(due, default=None)

    def _latest_due(self, expression: str, after: datetime, now: datetime) -> datetime | None:
        now_wall = _wall(now, self.timezone)
        # Fast path: the latest match at or before now (croniter's get_prev is strictly before
        # its start, so start one minute past now's minute), valid with one UTC offset around.
        start = now_wall.replace(second=0, microsecond=0) + _MINUTE
        candidate = self._instant(self._cursor(expression, start).get_prev(datetime))
        if self._fixed_offset(min(candidate, after) - _MAX_DST_SHIFT, now + _MAX_DST_SHIFT):
            return candidate if after < candidate <= now else None
        latest: datetime | None = None
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
