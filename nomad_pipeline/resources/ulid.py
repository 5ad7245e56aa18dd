"""ULIDs for run names: 48-bit millisecond time + 80 random bits, Crockford base32, lower-cased.

Lower case makes a ULID a valid object name; the fixed width and the alphabet's order keep
lexicographic order equal to creation order. Within one millisecond the random part is
incremented (the spec's monotonic mode), so names created by one process always sort in order.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from datetime import UTC, datetime

from nomad_pipeline.errors import Invalid

# Crockford's base32 without I, L, O, U; lower-cased for object names.
ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
ULID_LENGTH = 26
_TIME_CHARS = 10
_RANDOM_BITS = 80
_RANDOM_LIMIT = 1 << _RANDOM_BITS
_ULID_PATTERN = re.compile(rf"^[0-7][{ALPHABET}]{{25}}$")


class _MonotonicGenerator:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_random = 0

    def next(self, now_ms: int) -> str:
        with self._lock:
            if now_ms <= self._last_ms:
                # Same (or an earlier, after a clock step back) millisecond: keep increasing
                # from the last value so order is preserved; on 80-bit overflow move to the next
                # millisecond rather than fail.
                millis, random = self._last_ms, self._last_random + 1
                if random >= _RANDOM_LIMIT:
                    millis, random = millis + 1, secrets.randbits(_RANDOM_BITS - 1)
            else:
                # One bit short of the full width leaves room to increment without overflow.
                millis, random = now_ms, secrets.randbits(_RANDOM_BITS - 1)
            self._last_ms, self._last_random = millis, random
        return _encode(millis, _TIME_CHARS) + _encode(random, ULID_LENGTH - _TIME_CHARS)


def _encode(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        chars.append(ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


_GENERATOR = _MonotonicGenerator()


def new_ulid() -> str:
    """A new lower-case ULID, greater than every ULID this process made before."""
    return _GENERATOR.next(time.time_ns() // 1_000_000)


def is_ulid(value: str) -> bool:
    return bool(_ULID_PATTERN.match(value))


def ulid_time(value: str) -> datetime:
    """The creation time encoded in a ULID (millisecond precision, UTC)."""
    if not is_ulid(value):
        raise Invalid(f"{value!r} is not a ULID (26 lower-case Crockford base32 characters)")
    millis = 0
    for char in value[:_TIME_CHARS]:
        millis = millis * 32 + ALPHABET.index(char)
    return datetime.fromtimestamp(millis / 1000, tz=UTC)


def ulid_for(moment: datetime, seed: str) -> str:
    """The ULID of ``moment`` whose random part is derived from ``seed``: the same inputs always
    give the same name, so an object created twice for one event (a cron firing retried after a
    crash) collides instead of duplicating."""
    millis = int(moment.timestamp() * 1000)
    random = int.from_bytes(hashlib.sha256(seed.encode()).digest()[:10], "big")
    return _encode(millis, _TIME_CHARS) + _encode(random, ULID_LENGTH - _TIME_CHARS)
