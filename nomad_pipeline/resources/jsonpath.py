"""The JSONPath-like expressions generic webhooks use to pick variables out of a JSON body.

Accepted: an optional ``$`` root, then keys and list indexes: ``$.head_commit.id``,
``repository.full_name``, ``commits[0].message``, ``$["key.with.dots"]``, ``items[-1]``.
No wildcards, filters or recursion: one expression names one value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from nomad_pipeline.errors import Invalid

Segment = str | int

_SEGMENT = re.compile(
    r"""
    \.?(?P<key>[A-Za-z0-9_-]+)
  | \[(?P<index>-?\d+)\]
  | \[(?P<quoted>"(?:[^"\\]|\\.)*")\]
    """,
    re.VERBOSE,
)


def parse_json_path(expression: str) -> tuple[Segment, ...]:
    """The keys and indexes of ``expression``; ``Invalid`` names the position of a mistake."""
    text = expression.strip()
    position = 1 if text.startswith("$") else 0
    segments: list[Segment] = []
    while position < len(text):
        match = _SEGMENT.match(text, position)
        if match is None or (match.group("key") and position > 0 and text[position] != "."):
            raise Invalid(
                f"invalid JSONPath-like expression {expression!r} at position {position + 1}: "
                'expected .key, [index] or ["key"] (such as $.head_commit.id)'
            )
        if match.group("key") is not None:
            segments.append(match.group("key"))
        elif match.group("index") is not None:
            segments.append(int(match.group("index")))
        else:
            segments.append(json.loads(match.group("quoted")))
        position = match.end()
    if not segments:
        raise Invalid(f"invalid JSONPath-like expression {expression!r}: names no value")
    return tuple(segments)


def extract(document: Any, expression: str) -> Any:
    """The value at ``expression`` in ``document``, or None where the path does not exist."""
    value = document
    for segment in parse_json_path(expression):
        if isinstance(segment, int):
            if not isinstance(value, list) or not -len(value) <= segment < len(value):
                return None
            value = value[segment]
        elif isinstance(value, Mapping) and segment in value:
            value = value[segment]
        else:
            return None
    return value
