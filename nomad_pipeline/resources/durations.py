"""Durations as users write them: ``"30s"``, ``"5m"``, ``"1h30m"``, ``"1.5h"``, ``"250ms"``.

They stay strings on the wire (what the user wrote round-trips unchanged) and are validated when
parsed; code that needs a number calls :func:`parse_duration`.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated

from pydantic import AfterValidator

from nomad_pipeline.errors import Invalid

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# "ms" is listed before "m" so the alternation never reads "5ms" as five minutes and an "s".
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_WHOLE = re.compile(r"^(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+$")


def parse_duration(text: str) -> timedelta:
    """Parse ``text`` into a positive timedelta; ``Invalid`` names the accepted form otherwise."""
    if not isinstance(text, str) or not _WHOLE.match(text):
        raise Invalid(
            f"invalid duration {text!r}: expected numbers with units ms, s, m, h or d, "
            'such as "30s", "5m" or "1h30m"'
        )
    seconds = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in _PART.findall(text))
    if seconds <= 0:
        raise Invalid(f"invalid duration {text!r}: must be greater than zero")
    return timedelta(seconds=seconds)


def duration_seconds(text: str) -> float:
    """The duration ``text`` in seconds (a float, as asyncio and the loop clock use)."""
    return parse_duration(text).total_seconds()


def _validate_duration(text: str) -> str:
    try:
        parse_duration(text)
    except Invalid as error:
        raise ValueError(error.message) from None
    return text


Duration = Annotated[str, AfterValidator(_validate_duration)]
"""A pydantic field type: a duration string, validated, kept as written."""
