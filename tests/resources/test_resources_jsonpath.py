"""JSONPath-like expressions for generic webhooks."""

from __future__ import annotations

from typing import Any

import pytest

from nomad_pipeline.errors import Invalid
from nomad_pipeline.resources.jsonpath import extract, parse_json_path

BODY = {
    "ref": "refs/heads/main",
    "head_commit": {"id": "abc", "message": "fix: $(touch /tmp/pwned)"},
    "commits": [{"message": "first"}, {"message": "last"}],
    "key.with.dots": 1,
    "repository": {"full_name": "org/repo", "owner": {"login": "org"}},
}

CASES: list[tuple[str, Any]] = [
    ("$.ref", "refs/heads/main"),
    ("ref", "refs/heads/main"),
    ("$.head_commit.id", "abc"),
    ("head_commit.message", "fix: $(touch /tmp/pwned)"),
    ("commits[0].message", "first"),
    ("$.commits[-1].message", "last"),
    ('$["key.with.dots"]', 1),
    ("repository.owner.login", "org"),
    ("$.missing.deeper", None),
    ("commits[5].message", None),
    ("ref[0]", None),
    ("$.repository", {"full_name": "org/repo", "owner": {"login": "org"}}),
]


@pytest.mark.parametrize(("expression", "expected"), CASES)
def test_extract(expression: str, expected: Any) -> None:
    assert extract(BODY, expression) == expected


@pytest.mark.parametrize(
    ("expression", "position"),
    [("$..x", 2), ("$x", 2), ("a[0]b", 5), ("a[x]", 2), ("a.*", 2), ("a b", 2)],
)
def test_bad_expressions(expression: str, position: int) -> None:
    with pytest.raises(Invalid, match=f"at position {position}:"):
        parse_json_path(expression)


@pytest.mark.parametrize("expression", ["", "$"])
def test_empty_expressions(expression: str) -> None:
    with pytest.raises(Invalid, match="names no value"):
        parse_json_path(expression)


def test_segments() -> None:
    assert parse_json_path('$.a[2]["b c"].d') == ("a", 2, "b c", "d")
