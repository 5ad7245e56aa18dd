"""Typed flow variables: checking declared defaults and the values a run is started with.

Pure functions. ``check_run_variables`` is what ``nomad-pipeline run --var k=v`` and
``POST /v1/flows/{id}/run`` go through: strings from the command line are converted to the
declared type (numbers, booleans, and JSON for lists and maps), defaults are applied, and every
problem is an ``Invalid`` whose field is ``variables.<name>``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from nomad_pipeline.errors import Invalid

if TYPE_CHECKING:
    from nomad_pipeline.resources.kinds import FlowSpec

VariableType = Literal["string", "number", "bool", "list", "map", "object"]

# Variables filled by triggers (webhook payloads, git polling) need no declaration.
TRIGGER_PREFIX = "trigger."


def value_matches(variable_type: VariableType, value: Any) -> bool:
    if variable_type == "string":
        return isinstance(value, str)
    if variable_type == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if variable_type == "bool":
        return isinstance(value, bool)
    if variable_type == "list":
        return isinstance(value, list)
    return isinstance(value, dict)


def check_value(variable_type: VariableType, value: Any) -> Any:
    """``value`` if it has ``variable_type``; ValueError with the expected type otherwise."""
    if not value_matches(variable_type, value):
        raise ValueError(f"expected a {variable_type}, got {_describe(value)}")
    return value


def coerce_value(variable_type: VariableType, value: Any) -> Any:
    """Like check_value, but a string is first read as the declared type (``--var k=v``)."""
    if isinstance(value, str) and variable_type != "string":
        value = _from_text(variable_type, value)
    return check_value(variable_type, value)


def _from_text(variable_type: VariableType, text: str) -> Any:
    if variable_type == "bool":
        lowered = text.strip().lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        raise ValueError(f"expected a bool (true or false), got {text!r}")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"expected a {variable_type} (as JSON), got {text!r}") from None


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"bool {json.dumps(value)}"
    if isinstance(value, int | float):
        return f"number {value}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a map"
    return type(value).__name__


def check_run_variables(flow_spec: FlowSpec, given: Mapping[str, Any]) -> dict[str, Any]:
    """The run's variables: ``given`` converted to the declared types, defaults applied.

    Optional variables without a default and not given are present as null. Names starting
    with ``trigger.`` are accepted undeclared (triggers fill them). Raises ``Invalid`` with
    ``field="variables.<name>"`` for an unknown name, a missing required one or a wrong type.
    """
    declared = {variable.name: variable for variable in flow_spec.variables}
    for name in given:
        if name not in declared and not name.startswith(TRIGGER_PREFIX):
            known = ", ".join(sorted(declared)) or "none"
            raise Invalid(
                f"unknown variable {name!r} (the flow declares: {known})",
                field=f"variables.{name}",
            )
    result: dict[str, Any] = {}
    for name, variable in declared.items():
        if name in given and given[name] is not None:
            try:
                result[name] = coerce_value(variable.type, given[name])
            except ValueError as error:
                raise Invalid(f"variable {name!r}: {error}", field=f"variables.{name}") from None
        elif variable.default is not None:
            result[name] = variable.default
        elif variable.required:
            raise Invalid(f"missing required variable {name!r}", field=f"variables.{name}")
        else:
            result[name] = None
    for name, value in given.items():
        if name not in declared:
            result[name] = value
    for name, value in result.items():
        if _holds_nul(value):
            # Values reach steps as environment variables, which cannot carry a NUL byte.
            raise Invalid(f"variable {name!r} contains a NUL character", field=f"variables.{name}")
    return result


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_nul(item) for item in value)
    return False
