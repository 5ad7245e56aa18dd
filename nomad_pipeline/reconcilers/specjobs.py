"""Rendering a specification step's Nomad job (pure, no I/O).

What the controller changes in the user's jobspec, and why:

- ``ID`` and ``Name``: the step's deterministic job ID (``name_format`` rendered, else
  ``<run-id>-<step>``), with ``-a<N>`` appended for retry attempt N >= 2. A fresh ID per attempt
  is how Nomad reruns a batch job (an unchanged batch job never runs again, nomad-api.md §2.9),
  and a deterministic one lets a restarted controller find the job instead of registering twice.
- ``Type`` is forced to ``batch``: a step must end.
- ``Meta`` gains ``nomad_pipeline_run``/``_namespace``/``_step``/``_attempt``: events and job
  listings map back to the run through them.
- Every group's (and task's) ``RestartPolicy`` and the groups' ``ReschedulePolicy`` are forced
  to zero attempts (fail fast). Nomad's batch defaults would run a failing command up to 8
  times over about two minutes; retries are the controller's business (the step's
  ``retries``, with backoff, each attempt a new job that is visible in the run's status), so
  Nomad must not retry behind its back.
- Every task's ``Env`` gains the run's variables as ``NP_VAR_<NAME>`` (and ``NP_TRIGGER_<NAME>``
  for ``trigger.*`` variables) plus ``NP_RUN_ID``, ``NP_RUN_NAMESPACE``, ``NP_FLOW``,
  ``NP_STEP``. Values are data in the environment, never spliced into a command.

HCL jobspecs are parsed by Nomad (``jobs/parse``) with the step's variables written as a var-file
by :func:`hcl_var_file`, where every value is an escaped HCL literal: a value can never become
HCL syntax or an interpolation.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nomad_pipeline.errors import Invalid

META_RUN = "nomad_pipeline_run"
META_NAMESPACE = "nomad_pipeline_namespace"
META_STEP = "nomad_pipeline_step"
META_ATTEMPT = "nomad_pipeline_attempt"

RESTART_FAIL_FAST: dict[str, Any] = {
    "Attempts": 0,
    "Mode": "fail",
    "Interval": 24 * 3600 * 10**9,
    "Delay": 15 * 10**9,
}
RESCHEDULE_NEVER: dict[str, Any] = {"Attempts": 0, "Unlimited": False}

_ENV_UNSAFE = re.compile(r"[^A-Z0-9_]")
_HCL_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def env_name(prefix: str, variable: str) -> str:
    """``NP_VAR_`` + the variable upper-cased, any character outside [A-Z0-9_] as ``_``."""
    return prefix + _ENV_UNSAFE.sub("_", variable.upper())


def env_value(value: Any) -> str:
    """Strings as they are; everything else as JSON (``true``, ``3``, ``["a"]``)."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def variables_env(variables: Mapping[str, Any]) -> dict[str, str]:
    """``NP_VAR_<NAME>`` for every variable, and ``NP_TRIGGER_<NAME>`` for ``trigger.<name>``."""
    env: dict[str, str] = {}
    for name in sorted(variables):
        value = env_value(variables[name])
        env[env_name("NP_VAR_", name)] = value
        if name.startswith("trigger."):
            env[env_name("NP_TRIGGER_", name.removeprefix("trigger."))] = value
    return env


@dataclass(frozen=True, slots=True)
class StepIdentity:
    """Which run, step and attempt a Nomad job belongs to."""

    namespace: str
    run: str
    flow: str
    step: str
    attempt: int = 1


def run_env(identity: StepIdentity, variables: Mapping[str, Any]) -> dict[str, str]:
    return {
        **variables_env(variables),
        "NP_RUN_ID": identity.run,
        "NP_RUN_NAMESPACE": identity.namespace,
        "NP_FLOW": identity.flow,
        "NP_STEP": identity.step,
    }


def spec_job_id(run: str, step: str, attempt: int, name_format: str | None = None) -> str:
    """The step's Nomad job ID: ``name_format`` (already rendered) or ``<run>-<step>``, plus
    ``-a<N>`` from the second attempt on."""
    base = name_format.strip() if name_format else f"{run}-{step}"
    if not base or any(ch.isspace() or ch == "\x00" for ch in base):
        raise Invalid(
            f"step {step!r}: job ID {base!r} must be non-empty without spaces",
            field="job.name_format",
        )
    return base if attempt <= 1 else f"{base}-a{attempt}"


def unwrap_job(document: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON jobspec may be the bare Job or ``{"Job": {...}}`` (what ``nomad job run`` takes)."""
    inner = document.get("Job")
    job = inner if isinstance(inner, Mapping) else document
    if not isinstance(job.get("TaskGroups"), list) or not job["TaskGroups"]:
        raise Invalid("jobspec has no TaskGroups", field="job")
    return dict(job)


def render_spec_job(
    job: Mapping[str, Any],
    identity: StepIdentity,
    *,
    job_id: str,
    env: Mapping[str, str],
) -> dict[str, Any]:
    """The job to register for one attempt of a step (see the module docstring)."""
    rendered = copy.deepcopy(unwrap_job(job))
    rendered["ID"] = job_id
    rendered["Name"] = job_id
    rendered["Type"] = "batch"
    rendered["Meta"] = {
        **(rendered.get("Meta") or {}),
        META_RUN: identity.run,
        META_NAMESPACE: identity.namespace,
        META_STEP: identity.step,
        META_ATTEMPT: str(identity.attempt),
    }
    # Job-level Reschedule would be overridden by the group's, but drop it to leave no doubt.
    rendered.pop("Reschedule", None)
    for group in rendered["TaskGroups"]:
        group["RestartPolicy"] = {**(group.get("RestartPolicy") or {}), **RESTART_FAIL_FAST}
        group["ReschedulePolicy"] = dict(RESCHEDULE_NEVER)
        for task in group.get("Tasks") or []:
            task["Env"] = {**(task.get("Env") or {}), **env}
            # A task's own restart block overrides its group's (parsed jobspecs carry one per
            # task once canonicalised), so it is forced to fail fast as well.
            task["RestartPolicy"] = {**(task.get("RestartPolicy") or {}), **RESTART_FAIL_FAST}
    return rendered


def is_parameterized(job: Mapping[str, Any]) -> bool:
    return bool(job.get("ParameterizedJob"))


def dispatch_token(identity: StepIdentity) -> str:
    """Idempotency token of a dispatch: one child per run, step and attempt, across restarts."""
    return f"{identity.namespace}/{identity.run}/{identity.step}/{identity.attempt}"


def hcl_literal(value: Any, where: str) -> str:
    """``value`` as an HCL2 literal that can only ever be that value (no ``${`` templates)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise Invalid(f"{where}: {value!r} is not a finite number", field=where)
        return repr(value)
    if isinstance(value, str):
        escaped = (
            value.replace("\\", "\\\\")
            .replace('"', '\\"')
            .replace("\n", "\\n")
            .replace("\r", "\\r")
            .replace("\t", "\\t")
            .replace("${", "$${")
            .replace("%{", "%%{")
        )
        return f'"{escaped}"'
    if value is None:
        return "null"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(hcl_literal(v, f"{where}[{i}]") for i, v in enumerate(value)) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(
            f"{hcl_literal(str(k), where)} = {hcl_literal(v, f'{where}.{k}')}"
            for k, v in value.items()
        )
        return "{" + items + "}"
    raise Invalid(f"{where}: values of type {type(value).__name__} cannot be passed", field=where)


def hcl_var_file(values: Mapping[str, Any]) -> str:
    """A var-file (``name = <literal>`` lines) for Nomad's ``jobs/parse`` ``Variables``."""
    lines = []
    for name in sorted(values):
        if not _HCL_IDENTIFIER.match(name):
            raise Invalid(
                f"jobspec variable name {name!r} is not a valid HCL identifier",
                field=f"job.variables.{name}",
            )
        lines.append(f"{name} = {hcl_literal(values[name], f'job.variables.{name}')}")
    return "".join(line + "\n" for line in lines)
