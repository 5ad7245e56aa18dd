"""Pure formatting of API objects for the terminal: tables, ages, names, YAML/JSON, diffs.

Everything here works on the wire dicts the API returns (``apiVersion``, ``kind``, ``metadata``,
``spec``, ``status``), not on the pydantic models, so the CLI prints whatever the server stores
(including fields a newer server adds) and these functions stay free of I/O and clocks: the
current time is always passed in.
"""

from __future__ import annotations

import difflib
import functools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from nomad_pipeline.errors import NomadPipelineError
from nomad_pipeline.resources.names import API_GROUP, API_VERSION, TERMINAL_PHASES

if TYPE_CHECKING:
    import yaml

OutputFormat = Literal["table", "wide", "yaml", "json", "name"]
OUTPUT_FORMATS: tuple[OutputFormat, ...] = ("table", "wide", "yaml", "json", "name")


NONE = "<none>"
COLUMN_GAP = "   "


def error_line(exc: NomadPipelineError) -> str:
    """``error: <reason>: <message>`` on one line, however many lines the message had."""
    message = "; ".join(line.strip() for line in exc.message.splitlines() if line.strip())
    return f"error: {exc.reason}: {message}"


def dig(obj: object, *path: str) -> Any:
    """``obj[a][b]...`` or None when any level is missing or not a mapping."""
    current: Any = obj
    for key in path:
        if not isinstance(current, Mapping):
            return None
        current = current.get(key)
    return current


def parse_timestamp(value: object) -> datetime | None:
    """An RFC 3339 timestamp from the wire as an aware datetime (naive ones are UTC)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def format_duration(seconds: float) -> str:
    """kubectl's short human durations: 5s, 3m, 2h, 4d (negative clock skew shows as 0s)."""
    whole = max(0, int(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m"
    if whole < 86400:
        return f"{whole // 3600}h"
    return f"{whole // 86400}d"


def format_age(timestamp: object, now: datetime) -> str:
    moment = parse_timestamp(timestamp)
    if moment is None:
        return "<unknown>"
    return format_duration((now - moment).total_seconds())


def format_relative(timestamp: object, now: datetime) -> str:
    """``in 42s`` for a future time, ``3m ago`` for a past one, ``<none>`` when unset."""
    moment = parse_timestamp(timestamp)
    if moment is None:
        return NONE
    delta = (moment - now).total_seconds()
    if delta > 0:
        return f"in {format_duration(delta)}"
    return f"{format_duration(-delta)} ago"


def object_name(obj: Mapping[str, Any]) -> str:
    """``flow.nomad-pipeline.io/build-test``: the kubectl ``-o name`` form."""
    kind = str(obj.get("kind", "")).lower()
    return f"{kind}.{API_GROUP}/{dig(obj, 'metadata', 'name')}"


def kind_name(kind: str, name: str) -> str:
    return f"{kind.lower()}.{API_GROUP}/{name}"


def status_summary(obj: Mapping[str, Any]) -> str:
    """One word for the STATUS column: Deleting while finalizers hold a deleted object, else
    the phase, else the Ready condition, else Active."""
    if dig(obj, "metadata", "deletion_timestamp"):
        return "Deleting"
    phase = dig(obj, "status", "phase")
    if isinstance(phase, str) and phase:
        return phase
    ready = find_condition(obj, "Ready")
    if ready is None:
        return "Active"
    if ready.get("status") == "True":
        return "Ready"
    return str(ready.get("reason") or "NotReady")


def find_condition(obj: Mapping[str, Any], condition_type: str) -> Mapping[str, Any] | None:
    conditions = dig(obj, "status", "conditions")
    if not isinstance(conditions, list):
        return None
    for condition in conditions:
        if isinstance(condition, Mapping) and condition.get("type") == condition_type:
            return condition
    return None


def format_labels(labels: object) -> str:
    if not isinstance(labels, Mapping) or not labels:
        return NONE
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def _text(value: object) -> str:
    if value is None or value == "":
        return NONE
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# --- per-kind columns -----------------------------------------------------------------------


Cell = Callable[[Mapping[str, Any], datetime], str]


@dataclass(frozen=True, slots=True)
class Column:
    header: str
    cell: Cell
    wide_only: bool = False


def _text_at(*path: str) -> Cell:
    """A cell showing the value at ``path`` in the object as text ("" where it is absent)."""

    def cell(obj: Mapping[str, Any], _now: datetime) -> str:
        return _text(dig(obj, *path))

    return cell


def _relative_at(*path: str) -> Cell:
    """A cell showing the timestamp at ``path`` relative to now ("in 5m", "3m ago")."""

    def cell(obj: Mapping[str, Any], now: datetime) -> str:
        return format_relative(dig(obj, *path), now)

    return cell


_name = _text_at("metadata", "name")
_namespace = _text_at("metadata", "namespace")


def _age(obj: Mapping[str, Any], now: datetime) -> str:
    return format_age(dig(obj, "metadata", "creation_timestamp"), now)


def _status(obj: Mapping[str, Any], _now: datetime) -> str:
    return status_summary(obj)


def _labels(obj: Mapping[str, Any], _now: datetime) -> str:
    return format_labels(dig(obj, "metadata", "labels"))


def _flow_type(obj: Mapping[str, Any], _now: datetime) -> str:
    if dig(obj, "spec", "inline") is not None:
        return "inline"
    if dig(obj, "spec", "specification") is not None:
        return "specification"
    return NONE


def flow_steps(flow_spec: object) -> list[Mapping[str, Any]]:
    """The steps of a flow spec, whichever of ``inline``/``specification`` it uses."""
    if not isinstance(flow_spec, Mapping):
        return []
    for body in (flow_spec.get("inline"), flow_spec.get("specification")):
        steps = dig(body, "steps") if isinstance(body, Mapping) else None
        if isinstance(steps, list):
            return [step for step in steps if isinstance(step, Mapping)]
    return []


def _flow_step_count(obj: Mapping[str, Any], _now: datetime) -> str:
    return str(len(flow_steps(obj.get("spec"))))


def _flow_variables(obj: Mapping[str, Any], _now: datetime) -> str:
    variables = dig(obj, "spec", "variables")
    if not isinstance(variables, list) or not variables:
        return NONE
    return ",".join(str(dig(variable, "name")) for variable in variables)


def run_steps(obj: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    steps = dig(obj, "status", "steps")
    if isinstance(steps, list):
        return [step for step in steps if isinstance(step, Mapping)]
    return []


_run_flow = _text_at("spec", "flow")


def _run_phase(obj: Mapping[str, Any], _now: datetime) -> str:
    # A run being deleted is on its way out whatever its phase (its jobs are being stopped).
    if dig(obj, "metadata", "deletion_timestamp"):
        return "deleting"
    return _text(dig(obj, "status", "phase") or "pending")


def _run_step_progress(obj: Mapping[str, Any], _now: datetime) -> str:
    steps = run_steps(obj)
    total = len(steps) or len(flow_steps(dig(obj, "spec", "flow_spec")))
    done = sum(1 for step in steps if step.get("phase") in TERMINAL_PHASES)
    return f"{done}/{total}"


def _run_duration(obj: Mapping[str, Any], now: datetime) -> str:
    started = parse_timestamp(dig(obj, "status", "start_time"))
    if started is None:
        return NONE
    ended = parse_timestamp(dig(obj, "status", "end_time")) or now
    return format_duration((ended - started).total_seconds())


def _run_trigger(obj: Mapping[str, Any], _now: datetime) -> str:
    trigger = dig(obj, "spec", "trigger")
    if not isinstance(trigger, Mapping):
        return "manual"
    trigger_type = str(trigger.get("type") or "manual")
    name = trigger.get("name")
    return f"{trigger_type}/{name}" if name else trigger_type


def _message(obj: Mapping[str, Any], _now: datetime) -> str:
    message = dig(obj, "status", "message")
    if not message:
        ready = find_condition(obj, "Ready")
        message = ready.get("message") if ready is not None else None
    return _text(message)


def _trigger_source(obj: Mapping[str, Any], _now: datetime) -> str:
    source = dig(obj, "spec", "source")
    if not isinstance(source, Mapping):
        return NONE
    kinds = [key for key, value in source.items() if value is not None]
    return ",".join(kinds) or NONE


def _trigger_detail(obj: Mapping[str, Any], _now: datetime) -> str:
    source = dig(obj, "spec", "source")
    if not isinstance(source, Mapping):
        return NONE
    cron = source.get("cron")
    if isinstance(cron, Mapping):
        schedules = cron.get("schedules") or []
        timezone = cron.get("timezone")
        text = " | ".join(str(schedule) for schedule in schedules)
        return f"{text} ({timezone})" if timezone else _text(text)
    webhook = source.get("webhook")
    if isinstance(webhook, Mapping):
        return f"{webhook.get('provider')}:{webhook.get('repository') or '*'}"
    git = source.get("git")
    if isinstance(git, Mapping):
        return f"{git.get('url')}@{git.get('branch') or 'HEAD'}"
    return NONE


def _trigger_suspend(obj: Mapping[str, Any], _now: datetime) -> str:
    return _text(bool(dig(obj, "spec", "suspend")))


_trigger_next_fire = _relative_at("status", "next_fire_time")
_trigger_last_fire = _relative_at("status", "last_fire_time")
_namespace_description = _text_at("spec", "description")
_repo_url = _text_at("spec", "url")


def _repo_ready(obj: Mapping[str, Any], _now: datetime) -> str:
    ready = find_condition(obj, "Ready")
    return _text(ready.get("status")) if ready is not None else "Unknown"


def _repo_revision(obj: Mapping[str, Any], _now: datetime) -> str:
    return _text(
        dig(obj, "status", "last_applied_revision") or dig(obj, "status", "last_fetched_revision")
    )


def _repo_ref(obj: Mapping[str, Any], _now: datetime) -> str:
    ref = dig(obj, "spec", "ref")
    if not isinstance(ref, Mapping):
        return NONE
    return ",".join(f"{key}={value}" for key, value in ref.items() if value) or NONE


_repo_path = _text_at("spec", "path")


def _repo_suspend(obj: Mapping[str, Any], _now: datetime) -> str:
    return _text(bool(dig(obj, "spec", "suspend")))


KIND_COLUMNS: dict[str, tuple[Column, ...]] = {
    "Namespace": (
        Column("NAME", _name),
        Column("STATUS", _status),
        Column("DESCRIPTION", _namespace_description),
        Column("AGE", _age),
        Column("LABELS", _labels, wide_only=True),
    ),
    "Flow": (
        Column("NAME", _name),
        Column("TYPE", _flow_type),
        Column("STEPS", _flow_step_count),
        Column("STATUS", _status),
        Column("AGE", _age),
        Column("VARIABLES", _flow_variables, wide_only=True),
        Column("LABELS", _labels, wide_only=True),
    ),
    "Run": (
        Column("NAME", _name),
        Column("FLOW", _run_flow),
        Column("PHASE", _run_phase),
        Column("STEPS", _run_step_progress),
        Column("AGE", _age),
        Column("DURATION", _run_duration),
        Column("TRIGGER", _run_trigger, wide_only=True),
        Column("MESSAGE", _message, wide_only=True),
    ),
    "Trigger": (
        Column("NAME", _name),
        Column("FLOW", _run_flow),
        Column("SOURCE", _trigger_source),
        Column("SUSPEND", _trigger_suspend),
        Column("NEXT-FIRE", _trigger_next_fire),
        Column("LAST-FIRE", _trigger_last_fire),
        Column("STATUS", _status),
        Column("AGE", _age),
        Column("DETAIL", _trigger_detail, wide_only=True),
    ),
    "GitRepository": (
        Column("NAME", _name),
        Column("URL", _repo_url),
        Column("READY", _repo_ready),
        Column("REVISION", _repo_revision),
        Column("AGE", _age),
        Column("REF", _repo_ref, wide_only=True),
        Column("PATH", _repo_path, wide_only=True),
        Column("SUSPEND", _repo_suspend, wide_only=True),
        Column("MESSAGE", _message, wide_only=True),
    ),
}
GENERIC_COLUMNS = (Column("NAME", _name), Column("STATUS", _status), Column("AGE", _age))


def columns_for(kind: str, *, wide: bool, with_namespace: bool) -> list[Column]:
    chosen = [
        column for column in KIND_COLUMNS.get(kind, GENERIC_COLUMNS) if wide or not column.wide_only
    ]
    if with_namespace:
        chosen.insert(0, Column("NAMESPACE", _namespace))
    return chosen


class Table:
    """kubectl-style columns; widths only grow so rows printed later by ``-w`` stay aligned."""

    def __init__(self, columns: Sequence[Column]) -> None:
        self.columns = list(columns)
        self.widths = [len(column.header) for column in self.columns]

    def cells(self, obj: Mapping[str, Any], now: datetime) -> list[str]:
        return [column.cell(obj, now) for column in self.columns]

    def render(self, rows: Sequence[Sequence[str]], *, header: bool) -> list[str]:
        all_rows = [[column.header for column in self.columns], *rows] if header else list(rows)
        for row in all_rows:
            self.widths = [
                max(width, len(cell)) for width, cell in zip(self.widths, row, strict=True)
            ]
        return [self._line(row) for row in all_rows]

    def _line(self, row: Sequence[str]) -> str:
        padded = [cell.ljust(width) for cell, width in zip(row, self.widths, strict=True)]
        return COLUMN_GAP.join(padded).rstrip()


def render_table(
    objects: Sequence[Mapping[str, Any]],
    kind: str,
    now: datetime,
    *,
    wide: bool = False,
    with_namespace: bool = False,
) -> str:
    table = Table(columns_for(kind, wide=wide, with_namespace=with_namespace))
    rows = [table.cells(obj, now) for obj in objects]
    return "\n".join(table.render(rows, header=True))


# --- whole-object formats -------------------------------------------------------------------


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


@functools.cache
def _block_style_dumper() -> type[yaml.SafeDumper]:
    """A dumper printing multi-line strings (scripts, jobspecs) as ``|`` blocks, as people
    write them; made on first use so that commands printing no YAML never load PyYAML."""
    import yaml

    class BlockStyleDumper(yaml.SafeDumper):
        pass

    BlockStyleDumper.add_representer(str, _represent_str)
    return BlockStyleDumper


def to_yaml(data: object) -> str:
    # PyYAML is loaded by the commands that print YAML only (it adds ~20 ms to start-up).
    import yaml

    return yaml.dump(data, Dumper=_block_style_dumper(), sort_keys=False, allow_unicode=True)


def to_json(data: object) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False)


def list_document(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "List", "items": list(items)}


def render_objects(
    objects: Sequence[Mapping[str, Any]],
    output: OutputFormat,
    *,
    single: bool,
    kind: str,
    now: datetime,
    with_namespace: bool = False,
) -> str:
    """The text ``get`` prints. ``single`` prints a lone object rather than a List."""
    if output == "json":
        return to_json(objects[0] if single else list_document(objects))
    if output == "yaml":
        return to_yaml(objects[0] if single else list_document(objects)).rstrip("\n")
    if output == "name":
        return "\n".join(object_name(obj) for obj in objects)
    return render_table(objects, kind, now, wide=output == "wide", with_namespace=with_namespace)


def comparable(obj: Mapping[str, Any] | None) -> dict[str, Any]:
    """What ``diff`` compares: identity, labels, annotations and spec (never server fields)."""
    if obj is None:
        return {}
    metadata = obj.get("metadata") or {}
    kept_metadata = {"name": metadata.get("name")}
    if metadata.get("namespace"):
        kept_metadata["namespace"] = metadata["namespace"]
    for key in ("labels", "annotations"):
        if metadata.get(key):
            kept_metadata[key] = metadata[key]
    return {
        "apiVersion": obj.get("apiVersion", API_VERSION),
        "kind": obj.get("kind"),
        "metadata": kept_metadata,
        "spec": obj.get("spec"),
    }


def unified_diff(stored: Mapping[str, Any] | None, local: Mapping[str, Any], *, label: str) -> str:
    """A unified diff of the stored object against the local one, empty when they match."""
    before = to_yaml(comparable(stored)).splitlines(keepends=True) if stored is not None else []
    after = to_yaml(comparable(local)).splitlines(keepends=True)
    return "".join(
        difflib.unified_diff(before, after, fromfile=f"stored/{label}", tofile=f"local/{label}")
    )
