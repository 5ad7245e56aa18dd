"""HCL2 jobspecs to Nomad's JSON job (``POST /v1/jobs/parse``), on python-hcl2.

Covers the jobspec blocks a batch pipeline uses: job, group, task, config, env, meta,
resources, restart, reschedule, ephemeral_disk, template, artifact, lifecycle, logs,
dispatch_payload, parameterized, periodic and constraint; HCL2 ``variable`` blocks with values
from the var-file text sent as ``Variables``. Expressions are limited to ``var.<name>``
references (whole values or ``${var.<name>}`` inside strings); every other ``${...}`` is
Nomad's runtime interpolation and is kept as written. Unknown arguments and blocks are errors,
as in Nomad's HCL2 decoder.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import hcl2

from nomad_pipeline.devagent.http import parse_go_duration
from nomad_pipeline.devagent.state import Obj


class JobspecError(Exception):
    """The jobspec could not be turned into a job; the text says what and where."""


_OPTIONS = hcl2.SerializationOptions(
    with_comments=False,
    preserve_heredocs=True,
    strip_string_quotes=True,
    explicit_blocks=True,
)
_VAR_REFERENCE = re.compile(r"\$\{\s*var\.([A-Za-z_][\w-]*)\s*\}")
_WHOLE_VAR = re.compile(r"^\$\{\s*var\.([A-Za-z_][\w-]*)\s*\}$")
_HEREDOC = re.compile(r"^<<(-?)([A-Za-z_]\w*)\n(.*?)\n?[ \t]*\2$", re.DOTALL)

Converter = Callable[[Any, str], Any]


# -- values ---------------------------------------------------------------------------------


def _heredoc(value: str) -> str:
    match = _HEREDOC.match(value)
    if match is None:
        return value
    body = match.group(3)
    if match.group(1) == "-":
        lines = body.split("\n")
        indents = [len(line) - len(line.lstrip()) for line in lines if line.strip()]
        strip = min(indents, default=0)
        body = "\n".join(line[strip:] for line in lines)
    return body + "\n"


class _Evaluator:
    def __init__(self, variables: dict[str, Any]) -> None:
        self.variables = variables

    def value(self, raw: Any, where: str) -> Any:
        if isinstance(raw, str):
            return self.string(raw, where)
        if isinstance(raw, list):
            return [self.value(item, f"{where}[{i}]") for i, item in enumerate(raw)]
        if isinstance(raw, dict):
            return {
                key: self.value(item, f"{where}.{key}")
                for key, item in raw.items()
                if key != "__is_block__"
            }
        return raw

    def string(self, raw: str, where: str) -> Any:
        text = _heredoc(raw)
        whole = _WHOLE_VAR.match(text)
        if whole is not None:
            return self.lookup(whole.group(1), where)

        def substitute(match: re.Match[str]) -> str:
            found = self.lookup(match.group(1), where)
            if isinstance(found, bool):
                return "true" if found else "false"
            return str(found)

        # "$${" is HCL's escape for a literal "${" (Nomad's runtime interpolation).
        parts = text.split("$${")
        return "${".join(_VAR_REFERENCE.sub(substitute, part) for part in parts)

    def lookup(self, name: str, where: str) -> Any:
        if name not in self.variables:
            raise JobspecError(
                f"{where}: Reference to undeclared input variable; An input variable with the "
                f'name "{name}" has not been declared.'
            )
        return self.variables[name]


def _convert_type(value: Any, type_name: Any, name: str) -> Any:
    kind = str(type_name or "any")
    try:
        if kind == "number" and isinstance(value, str):
            return float(value) if "." in value else int(value)
        if kind == "bool" and isinstance(value, str):
            if value not in ("true", "false"):
                raise ValueError(value)
            return value == "true"
        if kind == "string" and isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    except ValueError:
        raise JobspecError(
            f'Invalid value for input variable "{name}": a {kind} is required'
        ) from None
    return value


def _variables(document: Obj, var_file: str) -> dict[str, Any]:
    given: Obj = {}
    if var_file.strip():
        try:
            given = hcl2.loads(var_file, serialization_options=_OPTIONS)
        except Exception as exc:
            raise JobspecError(f"variables: {_first_line(exc)}") from None
    declared: dict[str, Obj] = {}
    for block in document.get("variable") or []:
        for name, body in block.items():
            declared[name] = body
    values: dict[str, Any] = {}
    plain = _Evaluator({})
    for name, body in declared.items():
        if name in given:
            values[name] = _convert_type(plain.value(given[name], name), body.get("type"), name)
        elif "default" in body:
            values[name] = plain.value(body["default"], f"variable.{name}.default")
        else:
            raise JobspecError(
                f'Unset variable "{name}"; A used variable must be set or have a default value'
            )
    for name in given:
        if name not in declared:
            raise JobspecError(
                f'Undefined variable; A "{name}" variable was passed in but was not found in '
                "known variables. To declare variable, add a variable block."
            )
    return values


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# -- converters ---------------------------------------------------------------------------


def _duration(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return round(parse_go_duration(value) * 1e9)
        except ValueError as exc:
            raise JobspecError(f"{where}: {exc}") from None
    raise JobspecError(f"{where}: a duration string is required")


def _string_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list):
        raise JobspecError(f"{where}: a list of strings is required")
    return [str(item) for item in value]


def _string_map(value: Any, where: str) -> dict[str, str]:
    merged = _merge_blocks(value)
    if not isinstance(merged, dict):
        raise JobspecError(f"{where}: a map of strings is required")
    return {
        key: ("true" if v is True else "false" if v is False else str(v))
        for key, v in merged.items()
    }


def _raw(value: Any, where: str) -> Any:
    return _strip_markers(_merge_blocks(value))


def _same(value: Any, where: str) -> Any:
    return value


def _merge_blocks(value: Any) -> Any:
    """A block written once (``env { ... }``) arrives as a one-element list: unwrap it."""
    if isinstance(value, list) and value and all(_is_block(v) for v in value):
        merged: Obj = {}
        for block in value:
            merged.update(block)
        merged.pop("__is_block__", None)
        return merged
    return value


def _is_block(value: Any) -> bool:
    return isinstance(value, dict) and value.get("__is_block__") is True


def _strip_markers(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_markers(v) for k, v in value.items() if k != "__is_block__"}
    if isinstance(value, list):
        return [_strip_markers(v) for v in value]
    return value


def _block(fields: dict[str, tuple[str, Converter]]) -> Converter:
    """A converter for a block with a fixed set of arguments (``restart { attempts = 0 }``)."""

    def convert(value: Any, where: str) -> Obj:
        merged = _merge_blocks(value)
        if not isinstance(merged, dict):
            raise JobspecError(f"{where}: a block is required")
        return _fields(merged, fields, where)

    return convert


def _block_list(fields: dict[str, tuple[str, Converter]]) -> Converter:
    """A converter for a repeatable block (``template { ... }`` written several times)."""
    single = _block(fields)

    def convert(value: Any, where: str) -> list[Obj]:
        blocks = value if isinstance(value, list) else [value]
        return [single(block, f"{where}[{i}]") for i, block in enumerate(blocks)]

    return convert


def _fields(body: Obj, fields: dict[str, tuple[str, Converter]], where: str) -> Obj:
    result: Obj = {}
    for key, value in body.items():
        if key == "__is_block__":
            continue
        if key not in fields:
            raise JobspecError(
                f'{where}: Unsupported argument; An argument named "{key}" is not expected here.'
            )
        name, convert = fields[key]
        result[name] = convert(value, f"{where}.{key}")
    return result


def _labelled(fields: dict[str, tuple[str, Converter]], what: str) -> Converter:
    """Labelled blocks (``group "name" { ... }``) into a list of objects with a ``Name``."""

    def convert(value: Any, where: str) -> list[Obj]:
        result: list[Obj] = []
        for block in value if isinstance(value, list) else [value]:
            for label, body in block.items():
                if label == "__is_block__":
                    continue
                if not isinstance(body, dict):
                    raise JobspecError(f"{where}: a {what} block requires one label (its name)")
                converted = {"Name": label}
                converted.update(_fields(body, fields, f'{what} "{label}"'))
                result.append(converted)
        return result

    return convert


def _constraint(value: Any, where: str) -> list[Obj]:
    blocks = value if isinstance(value, list) else [value]
    result: list[Obj] = []
    for i, block in enumerate(blocks):
        body = _fields(
            block,
            {
                "attribute": ("LTarget", _same),
                "value": ("RTarget", _same),
                "operator": ("Operand", _same),
            },
            f"{where}[{i}]",
        )
        result.append(
            {
                "LTarget": body.get("LTarget", ""),
                "RTarget": str(body.get("RTarget", "")),
                "Operand": body.get("Operand", "="),
            }
        )
    return result


def _periodic(value: Any, where: str) -> Obj:
    body: Obj = _block(
        {
            "cron": ("Spec", _same),
            "crons": ("Specs", _string_list),
            "prohibit_overlap": ("ProhibitOverlap", _same),
            "time_zone": ("TimeZone", _same),
            "enabled": ("Enabled", _same),
        }
    )(value, where)
    body.setdefault("Enabled", True)
    body["SpecType"] = "cron"
    return body


_RESTART = _block(
    {
        "attempts": ("Attempts", _same),
        "interval": ("Interval", _duration),
        "delay": ("Delay", _duration),
        "mode": ("Mode", _same),
        "render_templates": ("RenderTemplates", _same),
    }
)
_RESCHEDULE = _block(
    {
        "attempts": ("Attempts", _same),
        "interval": ("Interval", _duration),
        "delay": ("Delay", _duration),
        "delay_function": ("DelayFunction", _same),
        "max_delay": ("MaxDelay", _duration),
        "unlimited": ("Unlimited", _same),
    }
)
_TASK_FIELDS: dict[str, tuple[str, Converter]] = {
    "driver": ("Driver", _same),
    "user": ("User", _same),
    "config": ("Config", _raw),
    "env": ("Env", _string_map),
    "meta": ("Meta", _string_map),
    "kill_timeout": ("KillTimeout", _duration),
    "kill_signal": ("KillSignal", _same),
    "leader": ("Leader", _same),
    "shutdown_delay": ("ShutdownDelay", _duration),
    "constraint": ("Constraints", _constraint),
    "restart": ("RestartPolicy", _RESTART),
    "resources": (
        "Resources",
        _block(
            {
                "cpu": ("CPU", _same),
                "cores": ("Cores", _same),
                "memory": ("MemoryMB", _same),
                "memory_max": ("MemoryMaxMB", _same),
                "disk": ("DiskMB", _same),
            }
        ),
    ),
    "lifecycle": (
        "Lifecycle",
        _block({"hook": ("Hook", _same), "sidecar": ("Sidecar", _same)}),
    ),
    "logs": (
        "LogConfig",
        _block(
            {
                "max_files": ("MaxFiles", _same),
                "max_file_size": ("MaxFileSizeMB", _same),
                "disabled": ("Disabled", _same),
                "enabled": ("Enabled", _same),
            }
        ),
    ),
    "dispatch_payload": ("DispatchPayload", _block({"file": ("File", _same)})),
    "template": (
        "Templates",
        _block_list(
            {
                "data": ("EmbeddedTmpl", _same),
                "source": ("SourcePath", _same),
                "destination": ("DestPath", _same),
                "change_mode": ("ChangeMode", _same),
                "change_signal": ("ChangeSignal", _same),
                "splay": ("Splay", _duration),
                "perms": ("Perms", _same),
                "uid": ("Uid", _same),
                "gid": ("Gid", _same),
                "left_delimiter": ("LeftDelim", _same),
                "right_delimiter": ("RightDelim", _same),
                "env": ("Envvars", _same),
                "once": ("Once", _same),
                "error_on_missing_key": ("ErrMissingKey", _same),
            }
        ),
    ),
    "artifact": (
        "Artifacts",
        _block_list(
            {
                "source": ("GetterSource", _same),
                "destination": ("RelativeDest", _same),
                "mode": ("GetterMode", _same),
                "options": ("GetterOptions", _string_map),
                "headers": ("GetterHeaders", _string_map),
                "chown": ("Chown", _same),
            }
        ),
    ),
}
_GROUP_FIELDS: dict[str, tuple[str, Converter]] = {
    "count": ("Count", _same),
    "meta": ("Meta", _string_map),
    "constraint": ("Constraints", _constraint),
    "restart": ("RestartPolicy", _RESTART),
    "reschedule": ("ReschedulePolicy", _RESCHEDULE),
    "shutdown_delay": ("ShutdownDelay", _duration),
    "max_run_duration": ("MaxRunDuration", _duration),
    "ephemeral_disk": (
        "EphemeralDisk",
        _block(
            {
                "size": ("SizeMB", _same),
                "sticky": ("Sticky", _same),
                "migrate": ("Migrate", _same),
            }
        ),
    ),
    "task": ("Tasks", _labelled(_TASK_FIELDS, "task")),
}
_JOB_FIELDS: dict[str, tuple[str, Converter]] = {
    "name": ("Name", _same),
    "namespace": ("Namespace", _same),
    "region": ("Region", _same),
    "type": ("Type", _same),
    "priority": ("Priority", _same),
    "datacenters": ("Datacenters", _string_list),
    "node_pool": ("NodePool", _same),
    "all_at_once": ("AllAtOnce", _same),
    "meta": ("Meta", _string_map),
    "constraint": ("Constraints", _constraint),
    "reschedule": ("Reschedule", _RESCHEDULE),
    "periodic": ("Periodic", _periodic),
    "parameterized": (
        "ParameterizedJob",
        _block(
            {
                "payload": ("Payload", _same),
                "meta_required": ("MetaRequired", _string_list),
                "meta_optional": ("MetaOptional", _string_list),
            }
        ),
    ),
    "group": ("TaskGroups", _labelled(_GROUP_FIELDS, "group")),
}


def parse_jobspec(text: str, var_file: str = "") -> Obj:
    """The job in ``text`` (one ``job`` block) as Nomad's API JSON, without defaults."""
    try:
        document = hcl2.loads(text, serialization_options=_OPTIONS)
    except Exception as exc:
        raise JobspecError(_first_line(exc)) from None
    unexpected = sorted(set(document) - {"job", "variable", "variables", "locals"})
    if unexpected:
        raise JobspecError(
            f'Unsupported block type; Blocks of type "{unexpected[0]}" are not expected here.'
        )
    variables = _variables(document, var_file)
    jobs = document.get("job") or []
    if len(jobs) != 1 or len([k for k in jobs[0] if k != "__is_block__"]) != 1:
        raise JobspecError("exactly one job block is required")
    (job_id, body), *_ = ((k, v) for k, v in jobs[0].items() if k != "__is_block__")
    # Leaves are resolved in place: the converters still need the block markers.
    resolved = _resolve_in_place(body, _Evaluator(variables), f'job "{job_id}"')
    job: Obj = {"ID": job_id}
    job.update(_fields(resolved, _JOB_FIELDS, f'job "{job_id}"'))
    job.setdefault("Name", job_id)
    return job


def _resolve_in_place(value: Any, evaluator: _Evaluator, where: str) -> Any:
    """Substitute variable references in every leaf, keeping the block structure."""
    if isinstance(value, dict):
        return {k: _resolve_in_place(v, evaluator, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_in_place(v, evaluator, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):
        return evaluator.string(value, where)
    return value
