"""Turning a step's templates into a script and an environment, without injection.

Values never enter the script's text. Every ``${name}`` in a script becomes a read of an
environment variable (``${var.go_version}`` → ``${NP_VAR_GO_VERSION}``) whose value is the
rendered value, so the shell expands it as data: a value such as ``$(touch /tmp/pwned)`` or
``'; rm -rf ~; '`` is printed, never run. One consequence: inside single quotes a reference is
not expanded (the shell does not expand variables there), so write ``"${var.x}"``.

Step ``env`` values are templates too; they are rendered to plain text (an environment value
cannot be code). Every step also sees the run's variables as ``NP_VAR_<NAME>`` (upper case,
anything but letters and digits as ``_``), trigger values as ``NP_TRIGGER_<NAME>``, and
``NP_RUN_ID``, ``NP_RUN_NAME``, ``NP_RUN_NAMESPACE``, ``NP_RUN_FLOW``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from nomad_pipeline.resources.templates import render, render_value, substitute

_NOT_ENV_CHARACTER = re.compile(r"[^A-Z0-9]+")
# Template names whose canonical variable is not derived from the name itself.
_ALIASES = {"nomad_pipeline.run_id": "NP_RUN_ID"}


def environment_name(reference: str) -> str:
    """``var.trigger.git_sha`` → ``NP_VAR_TRIGGER_GIT_SHA``; ``run.id`` → ``NP_RUN_ID``."""
    alias = _ALIASES.get(reference)
    if alias is not None:
        return alias
    return "NP_" + _NOT_ENV_CHARACTER.sub("_", reference.upper()).strip("_")


def run_environment(
    variables: Mapping[str, Any], run: Mapping[str, Any], trigger: Mapping[str, Any]
) -> dict[str, str]:
    """What every step of the run sees besides the runner's own environment."""
    env: dict[str, str] = {}
    for name, value in variables.items():
        env[environment_name(f"var.{name}")] = render_value(value)
    trigger_values = dict(trigger)
    # Webhook values arrive as run variables named trigger.<name> (as in the seed).
    for name, value in variables.items():
        if name.startswith("trigger."):
            trigger_values.setdefault(name.removeprefix("trigger."), value)
    for name, value in trigger_values.items():
        env[environment_name(f"trigger.{name}")] = render_value(value)
    for name, value in run.items():
        env[environment_name(f"run.{name}")] = render_value(value)
    return env


def render_step(
    script: str, env_templates: Mapping[str, str], context: Mapping[str, Any]
) -> tuple[str, dict[str, str]]:
    """The script with references turned into variable reads, and the variables they read.

    Raises Invalid (from the template module) for malformed templates or unknown names.
    """
    env = {name: render(template, context) for name, template in env_templates.items()}
    bound: dict[str, str] = {}

    def bind(reference: str) -> str:
        value = render("${" + reference + "}", context)
        name = environment_name(reference)
        if bound.get(name, value) != value:
            # Two references that spell the same variable name (var.a_b and var.a.b) but hold
            # different values: give the later one a name of its own.
            name = f"{name}_{len(bound)}"
        bound[name] = value
        return "${" + name + "}"

    return substitute(script, bind), {**env, **bound}
