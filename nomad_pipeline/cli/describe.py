"""``describe``: a readable page about one object (pure: the wire dict and the time in, text out).

Layout follows kubectl: aligned ``Key:  value`` lines for metadata, a spec summary (per kind where
a summary reads better than the raw spec), the status fields, then tables of conditions, for
runs of steps, and the object's recent events. Events are not a stored kind: they are read from
the times the object records (creation, condition transitions, a run's and its steps' start and
end, a trigger's last firing, a repository's last fetch), newest last.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from nomad_pipeline.cli.output import (
    NONE,
    Column,
    Table,
    flow_steps,
    format_age,
    format_duration,
    format_labels,
    parse_timestamp,
    run_steps,
    to_yaml,
)

INDENT = "  "


def _fields(pairs: Sequence[tuple[str, str]], indent: str = "") -> list[str]:
    width = max((len(key) for key, _ in pairs), default=0) + 2
    return [f"{indent}{(key + ':').ljust(width)}{value}".rstrip() for key, value in pairs]


def _value(value: object) -> str:
    if value is None or value in ("", [], {}):
        return NONE
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _timestamp(value: object, now: datetime) -> str:
    if parse_timestamp(value) is None:
        return NONE
    return f"{value} ({format_age(value, now)} ago)"


def _yaml_block(data: object, indent: str) -> list[str]:
    return [indent + line for line in to_yaml(data).rstrip("\n").splitlines()]


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str) -> list[str]:
    columns = [Column(header, lambda _obj, _now: "") for header in headers]
    return [indent + line for line in Table(columns).render(rows, header=True)]


def _first_line(text: object) -> str:
    lines = str(text or "").strip().splitlines()
    if not lines:
        return NONE
    return lines[0] + (" ..." if len(lines) > 1 else "")


def _flow_summary(spec: Mapping[str, Any], _now: datetime) -> list[str]:
    inline = spec.get("inline")
    flow_type = "inline" if inline is not None else "specification"
    pairs = [("Type", flow_type)]
    if isinstance(inline, Mapping) and isinstance(inline.get("runner"), Mapping):
        runner = inline["runner"]
        pairs.append(("Runner", f"{_value(runner.get('driver'))} {runner.get('image') or ''}"))
    for key in ("timeout", "concurrency", "run_retention"):
        if spec.get(key) is not None:
            value = spec[key]
            text = (
                ", ".join(f"{k}={v}" for k, v in value.items() if v is not None)
                if isinstance(value, Mapping)
                else str(value)
            )
            pairs.append((key.replace("_", " ").title(), text))
    lines = _fields(pairs, INDENT)
    variables = spec.get("variables") or []
    if variables:
        lines.append(f"{INDENT}Variables:")
        rows = [
            [
                _value(var.get("name")),
                _value(var.get("type")),
                _value(bool(var.get("required"))),
                _value(var.get("default")),
            ]
            for var in variables
            if isinstance(var, Mapping)
        ]
        lines += _table(("NAME", "TYPE", "REQUIRED", "DEFAULT"), rows, INDENT * 2)
    steps = flow_steps(spec)
    lines.append(f"{INDENT}Steps:")
    rows = [
        [
            _value(step.get("name")),
            ",".join(step.get("needs") or []) or NONE,
            _value(step.get("condition")),
            _step_body(step),
        ]
        for step in steps
    ]
    lines += _table(("NAME", "NEEDS", "CONDITION", "RUNS"), rows, INDENT * 2)
    return lines


def _step_body(step: Mapping[str, Any]) -> str:
    job = step.get("job")
    if isinstance(job, Mapping):
        if job.get("path"):
            return f"job {job['path']}"
        return "job (inline hcl)" if job.get("hcl") else "job (inline json)"
    return _first_line(step.get("run"))


def _run_summary(spec: Mapping[str, Any], _now: datetime) -> list[str]:
    trigger = spec.get("trigger")
    trigger_text = NONE
    if isinstance(trigger, Mapping):
        trigger_text = ", ".join(f"{k}={v}" for k, v in trigger.items() if v not in (None, ""))
    pairs = [
        ("Flow", _value(spec.get("flow"))),
        ("Trigger", trigger_text or NONE),
        ("Steps", str(len(flow_steps(spec.get("flow_spec"))))),
    ]
    lines = _fields(pairs, INDENT)
    variables = spec.get("variables") or {}
    lines.append(f"{INDENT}Variables:{'' if variables else ' ' + NONE}")
    if isinstance(variables, Mapping) and variables:
        lines += _fields([(str(k), _value(v)) for k, v in variables.items()], INDENT * 2)
    return lines


def _generic_summary(spec: Mapping[str, Any], _now: datetime) -> list[str]:
    return _yaml_block(dict(spec), INDENT)


SPEC_SUMMARIES: dict[str, Callable[[Mapping[str, Any], datetime], list[str]]] = {
    "Flow": _flow_summary,
    "Run": _run_summary,
}


def _status_lines(status: Mapping[str, Any], now: datetime) -> list[str]:
    scalars: list[tuple[str, str]] = []
    nested: dict[str, Any] = {}
    for key, value in status.items():
        if key in ("conditions", "steps"):
            continue
        label = key.replace("_", " ").title()
        if isinstance(value, Mapping | list):
            if value:
                nested[key] = value
        elif key.endswith(("_time", "_timestamp")):
            scalars.append((label, _timestamp(value, now)))
        else:
            scalars.append((label, _value(value)))
    lines = _fields(scalars, INDENT)
    if nested:
        lines += _yaml_block(nested, INDENT)
    return lines


def _conditions(status: Mapping[str, Any], now: datetime) -> list[str]:
    conditions = [c for c in status.get("conditions") or [] if isinstance(c, Mapping)]
    if not conditions:
        return [f"Conditions: {NONE}"]
    rows = [
        [
            _value(c.get("type")),
            _value(c.get("status")),
            _value(c.get("reason")),
            format_age(c.get("last_transition_time"), now),
            _value(c.get("message")),
        ]
        for c in conditions
    ]
    return ["Conditions:", *_table(("TYPE", "STATUS", "REASON", "AGE", "MESSAGE"), rows, INDENT)]


def _step_duration(step: Mapping[str, Any], now: datetime) -> str:
    started = parse_timestamp(step.get("start_time"))
    if started is None:
        return NONE
    ended = parse_timestamp(step.get("end_time")) or now
    return format_duration((ended - started).total_seconds())


def _steps(obj: Mapping[str, Any], now: datetime) -> list[str]:
    steps = run_steps(obj)
    if not steps:
        return [f"Steps: {NONE}"]
    rows = [
        [
            _value(step.get("name")),
            _value(step.get("phase")),
            _value(step.get("exit_code")),
            _value(step.get("attempts")),
            _step_duration(step, now),
            _value(step.get("nomad_job_id")),
            _value(step.get("alloc_id")),
            _value(step.get("message")),
        ]
        for step in steps
    ]
    headers = ("NAME", "PHASE", "EXIT", "ATTEMPTS", "DURATION", "NOMAD-JOB", "ALLOC", "MESSAGE")
    return ["Steps:", *_table(headers, rows, INDENT)]


# How many of the most recent events ``describe`` shows.
RECENT_EVENTS = 10


def _recorded_events(obj: Mapping[str, Any]) -> list[tuple[datetime, str, str]]:
    """(time, reason, message) for each moment the object records."""
    metadata = obj.get("metadata") or {}
    status = obj.get("status") if isinstance(obj.get("status"), Mapping) else {}
    assert isinstance(status, Mapping)
    moments: list[tuple[object, str, str]] = [
        (metadata.get("creation_timestamp"), "Created", f"{obj.get('kind', 'object')} created"),
        (metadata.get("deletion_timestamp"), "Deleting", "deletion requested"),
    ]
    if obj.get("kind") == "Run":
        moments.append((status.get("start_time"), "Started", "run started"))
        for step in run_steps(obj):
            name = step.get("name")
            job = step.get("nomad_job_id")
            started = f"step {name} started" + (f" (Nomad job {job})" if job else "")
            moments.append((step.get("start_time"), "StepStarted", started))
            ended = f"step {name} {step.get('phase')}"
            if step.get("exit_code") is not None:
                ended += f" (exit code {step.get('exit_code')})"
            if step.get("message"):
                ended += f": {_first_line(step.get('message'))}"
            moments.append((step.get("end_time"), "StepEnded", ended))
        ended = f"run {status.get('phase')}" + (
            f": {_first_line(status.get('message'))}" if status.get("message") else ""
        )
        moments.append((status.get("end_time"), "Ended", ended))
    if status.get("last_fire_time"):
        fired = "fired" + (f", run {status['last_run']}" if status.get("last_run") else "")
        moments.append((status.get("last_fire_time"), "Fired", fired))
    if status.get("last_fetch_time"):
        fetched = f"fetched revision {_value(status.get('last_fetched_revision'))}"
        moments.append((status.get("last_fetch_time"), "Fetched", fetched))
    # Conditions last: at equal times they summarise what the events above did.
    for condition in status.get("conditions") or []:
        if isinstance(condition, Mapping):
            reason = _value(condition.get("reason"))
            message = f"{condition.get('type')}={condition.get('status')}: " + _value(
                condition.get("message")
            )
            moments.append((condition.get("last_transition_time"), reason, message))
    events = [
        (when, reason, message)
        for raw, reason, message in moments
        if (when := parse_timestamp(raw)) is not None
    ]
    return sorted(events, key=lambda event: event[0])


def _events(obj: Mapping[str, Any], now: datetime) -> list[str]:
    events = _recorded_events(obj)[-RECENT_EVENTS:]
    if not events:
        return [f"Events: {NONE}"]
    rows = [
        [format_age(when.isoformat(), now), reason, message] for when, reason, message in events
    ]
    return ["Events:", *_table(("AGE", "REASON", "MESSAGE"), rows, INDENT)]


def describe_object(obj: Mapping[str, Any], now: datetime) -> str:
    metadata = obj.get("metadata") or {}
    kind = str(obj.get("kind", ""))
    pairs = [("Name", _value(metadata.get("name")))]
    if metadata.get("namespace"):
        pairs.append(("Namespace", str(metadata["namespace"])))
    pairs += [
        ("Kind", kind),
        ("Labels", format_labels(metadata.get("labels"))),
        ("Annotations", format_labels(metadata.get("annotations"))),
        ("UID", _value(metadata.get("uid"))),
        ("Generation", _value(metadata.get("generation"))),
        ("Resource Version", _value(metadata.get("resource_version"))),
        ("Created", _timestamp(metadata.get("creation_timestamp"), now)),
        ("Finalizers", ", ".join(str(f) for f in metadata.get("finalizers") or []) or NONE),
    ]
    if metadata.get("deletion_timestamp"):
        waiting = ", ".join(str(f) for f in metadata.get("finalizers") or []) or NONE
        pairs.append(
            (
                "Deletion requested",
                f"{_timestamp(metadata['deletion_timestamp'], now)}, waiting for: {waiting}",
            )
        )
    lines = _fields(pairs)
    spec = obj.get("spec")
    lines.append("Spec:")
    if isinstance(spec, Mapping):
        lines += SPEC_SUMMARIES.get(kind, _generic_summary)(spec, now)
    status = obj.get("status")
    status = status if isinstance(status, Mapping) else {}
    lines.append("Status:")
    lines += _status_lines(status, now) or [f"{INDENT}{NONE}"]
    lines += _conditions(status, now)
    if kind == "Run":
        lines += _steps(obj, now)
    lines += _events(obj, now)
    return "\n".join(lines)
