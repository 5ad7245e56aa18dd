"""The condition language: parsing, names, evaluation and the sandbox."""

from __future__ import annotations

from typing import Any

import pytest

from nomad_pipeline.errors import Invalid
from nomad_pipeline.resources.expressions import evaluation_context, lookup, parse_expression

CONTEXT = evaluation_context(
    variables={
        "env": "prod",
        "count": 3,
        "debug": False,
        "trigger.git_sha": "abc123",
        "tags": ["a", "b"],
        "limits": {"cpu": 2},
    },
    steps={
        "build": {"status": "failed", "exit_code": 2},
        "step4-conditional": {"status": "success"},
        "test": {"status": "success", "exit_code": 0},
    },
    run={"id": "01j0000000000000000000000a", "namespace": "default", "flow": "f"},
    trigger={"type": "webhook", "name": "on-push"},
)

EVALUATIONS: list[tuple[str, Any]] = [
    ('steps.build.status == "failed"', True),
    ("steps.build.status == 'failed'", True),
    ('inline.steps.build.status == "failed"', True),
    ('specifications.build.status != "failed"', False),
    ('specifications.step4-conditional.status == "success"', True),
    ("steps.build.exit_code == 2", True),
    ("steps.build.exit_code > 1 && steps.test.exit_code <= 0", True),
    ("steps.build.exit_code >= 3 || steps.test.exit_code < 1", True),
    ("steps.build.exit_code > 1 and not (steps.test.exit_code == 0)", False),
    ('!(var.env == "prod")', False),
    ("not var.debug", True),
    ("var.debug", False),
    ("var.count", 3),
    ("var.count == 3.0", True),
    ("var.trigger.git_sha", "abc123"),
    ('trigger.git_sha == "abc123"', True),
    ('trigger.type == "webhook"', True),
    ("nomad_pipeline.run_id == run.id", True),
    ('var.env in ["prod", "staging"]', True),
    ('var.env not in ["prod", "staging"]', False),
    ('"a" in var.tags', True),
    ('"cpu" in var.limits', True),
    ('"ro" in var.env', True),
    ("var.limits.cpu == 2", True),
    ("var.missing == null", True),
    ("steps.nope.status == null", True),
    ("true == 1", False),
    ("false != 0", True),
    ('"a\\"b" == "a\\"b"', True),
    ("-1 < 0", True),
    ("null", None),
    ("[]", []),
    ("x.y || var.env", True),
]


@pytest.mark.parametrize(("source", "expected"), EVALUATIONS)
def test_evaluation(source: str, expected: Any) -> None:
    assert parse_expression(source).evaluate(CONTEXT) == expected


def test_chained_comparison_is_a_parse_error() -> None:
    with pytest.raises(Invalid, match="expected an operator or the end, found '==' at position 8"):
        parse_expression("1 == 1 == true")


PARSE_ERRORS: list[tuple[str, str]] = [
    ("", "empty expression at position 1"),
    (
        "steps.a.status ==",
        "expected a value, a name or '(', found end of expression at position 18",
    ),
    ("(a == b", "expected ')', found end of expression at position 8"),
    ("a == b)", "expected an operator or the end, found ')' at position 7"),
    ("a = b", "unexpected character '=' at position 3"),
    ("a == 'x", 'unexpected character "\'" at position 6'),
    ("a.b == 1; import os", "unexpected character ';' at position 9"),
    ("a + 1", "unexpected character '+' at position 3"),
    ("f(x)", "expected an operator or the end, found '(' at position 2"),
    ("a[0]", "expected an operator or the end, found '[' at position 2"),
    ('"\\q"', "unknown escape"),
    ("&& a", "expected a value"),
]


@pytest.mark.parametrize(("source", "message"), PARSE_ERRORS)
def test_parse_errors_name_the_position(source: str, message: str) -> None:
    with pytest.raises(Invalid) as caught:
        parse_expression(source)
    assert message in caught.value.message
    assert repr(source) in caught.value.message


def test_names_are_every_dotted_name_read() -> None:
    expression = parse_expression(
        'specifications.step1.status == "failed" || steps.b.exit_code != 0 '
        "&& var.x in [var.y, 1] && !trigger.git_sha"
    )
    assert expression.names() == {
        "specifications.step1.status",
        "steps.b.exit_code",
        "var.x",
        "var.y",
        "trigger.git_sha",
    }


class _Secret:
    password = "hunter2"


@pytest.mark.parametrize("source", ["obj.password", "var.env.upper", "var.tags.append", "obj"])
def test_no_python_attribute_is_reachable(source: str) -> None:
    # Only mappings are looked into: an object's attributes and a value's methods are absent.
    context = {**CONTEXT, "obj": _Secret()}
    value = parse_expression(source).evaluate(context)
    assert value is None or isinstance(value, _Secret)
    assert not callable(value)


@pytest.mark.parametrize(
    "source",
    [
        "var.__class__",
        "var.__class__.__mro__",
        "run.__dict__",
        "__builtins__.open",
        "var.tags.__len__ == 1",
    ],
)
def test_dunder_names_are_refused(source: str) -> None:
    with pytest.raises(Invalid, match="has a part starting with '__'"):
        parse_expression(source)


SAFE_ERRORS = [
    ("var.env < 3", "cannot compare a string with a number using '<'"),
    ("var.missing > 1", "cannot compare null with a number"),
    ("var.debug >= false", "cannot compare a bool with a bool"),
    ('"x" in 3', "'in' needs a list, a map or a string on its right, not a number"),
]


@pytest.mark.parametrize(("source", "message"), SAFE_ERRORS)
def test_type_errors_are_invalid(source: str, message: str) -> None:
    with pytest.raises(Invalid, match=message):
        parse_expression(source).evaluate(CONTEXT)


def test_is_true_uses_truthiness() -> None:
    assert parse_expression("var.tags").is_true(CONTEXT)
    assert not parse_expression("var.missing").is_true(CONTEXT)
    assert not parse_expression('""').is_true(CONTEXT)
    assert parse_expression("var.count").is_true(CONTEXT)


def test_lookup_prefers_dotted_keys_then_nesting() -> None:
    context = {"var": {"a.b": 1, "a": {"b": 2, "c": 3}}}
    assert lookup(context, "var.a.b") == 1
    assert lookup(context, "var.a.c") == 3
    assert lookup(context, "var.a.d") is None
