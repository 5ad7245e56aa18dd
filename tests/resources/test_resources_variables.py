"""Checking a run's variables against the flow: defaults, coercion, missing and wrong types."""

from __future__ import annotations

from typing import Any

import pytest

from nomad_pipeline.errors import Invalid
from nomad_pipeline.resources.kinds import FlowSpec
from nomad_pipeline.resources.variables import check_run_variables

SPEC = FlowSpec.model_validate(
    {
        "variables": [
            {"name": "env", "type": "string", "default": "dev"},
            {"name": "count", "type": "number", "default": 1},
            {"name": "debug", "type": "bool"},
            {"name": "tags", "type": "list"},
            {"name": "limits", "type": "map"},
            {"name": "config", "type": "object"},
            {"name": "trigger.git_sha", "type": "string", "required": True},
        ],
        "inline": {"steps": [{"name": "a", "run": "true"}]},
    }
)

BASE = {"trigger.git_sha": "abc"}

GOOD: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({}, {"env": "dev", "count": 1, "debug": None, "tags": None, "limits": None, "config": None}),
    ({"count": "2.5"}, {"count": 2.5}),
    ({"count": "7"}, {"count": 7}),
    ({"count": 7}, {"count": 7}),
    ({"debug": "TRUE"}, {"debug": True}),
    ({"debug": "false"}, {"debug": False}),
    ({"debug": True}, {"debug": True}),
    ({"tags": '["a", "b"]'}, {"tags": ["a", "b"]}),
    ({"limits": '{"cpu": 2}'}, {"limits": {"cpu": 2}}),
    ({"config": {"a": [1]}}, {"config": {"a": [1]}}),
    ({"env": "123"}, {"env": "123"}),
    ({"trigger.git_ref": "refs/heads/main"}, {"trigger.git_ref": "refs/heads/main"}),
]


@pytest.mark.parametrize(("given", "expected"), GOOD)
def test_accepted(given: dict[str, Any], expected: dict[str, Any]) -> None:
    result = check_run_variables(SPEC, {**BASE, **given})
    for name, value in expected.items():
        assert result[name] == value
        assert type(result[name]) is type(value)
    assert result["trigger.git_sha"] == "abc"


BAD: list[tuple[dict[str, Any], str, str]] = [
    ({}, "variables.trigger.git_sha", "missing required variable 'trigger.git_sha'"),
    ({**BASE, "count": "many"}, "variables.count", "expected a number (as JSON), got 'many'"),
    ({**BASE, "count": True}, "variables.count", "expected a number, got bool true"),
    ({**BASE, "count": '"7"'}, "variables.count", "expected a number, got string '7'"),
    ({**BASE, "debug": "yes"}, "variables.debug", "expected a bool (true or false)"),
    ({**BASE, "tags": '{"a": 1}'}, "variables.tags", "expected a list, got a map"),
    ({**BASE, "limits": "[1]"}, "variables.limits", "expected a map, got a list"),
    ({**BASE, "env": 5}, "variables.env", "expected a string, got number 5"),
    ({**BASE, "colour": "red"}, "variables.colour", "unknown variable 'colour'"),
]


@pytest.mark.parametrize(("given", "field", "message"), BAD)
def test_refused_with_the_variable_named(given: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(Invalid) as caught:
        check_run_variables(SPEC, given)
    assert caught.value.field == field
    assert message in caught.value.message


@pytest.mark.parametrize(
    "value", ["a\x00b", ["ok", "x\x00"], {"k": "v\x00"}], ids=["string", "list", "map"]
)
def test_nul_characters_are_refused_naming_the_variable(value: object) -> None:
    spec = FlowSpec.model_validate(
        {
            "variables": [{"name": "v", "type": "string"}],
            "inline": {"steps": [{"name": "a", "run": "true"}]},
        }
    )
    given = {"v": value} if isinstance(value, str) else {"trigger.v": value}
    field = "variables.v" if isinstance(value, str) else "variables.trigger.v"
    with pytest.raises(Invalid) as raised:
        check_run_variables(spec, given)
    assert raised.value.field == field
    assert "NUL" in raised.value.message
