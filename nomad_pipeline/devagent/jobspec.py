"""Job specifications: Nomad's defaults (api Canonicalize), validation texts and spec equality.

Everything here is pure: dicts in, dicts out. Durations are int64 nanoseconds as in Nomad's JSON.
"""

from __future__ import annotations

import datetime
import re
from typing import Any, TypeGuard
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

Obj = dict[str, Any]

SECOND = 1_000_000_000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE

JOB_TYPES = ("service", "batch", "system", "sysbatch")
RESTART_MODES = ("fail", "delay")
DELAY_FUNCTIONS = ("constant", "exponential", "fibonacci")
LIFECYCLE_HOOKS = ("prestart", "poststart", "poststop")
PAYLOAD_MODES = ("optional", "required", "forbidden")
RESCHEDULE_MIN_DELAY = 5 * SECOND

DEFAULT_RESTART = {
    "batch": {"Attempts": 3, "Interval": 24 * HOUR, "Delay": 15 * SECOND, "Mode": "fail"},
    "service": {"Attempts": 2, "Interval": 30 * MINUTE, "Delay": 15 * SECOND, "Mode": "fail"},
}
DEFAULT_RESCHEDULE = {
    "batch": {
        "Attempts": 1,
        "Interval": 24 * HOUR,
        "Delay": 5 * SECOND,
        "DelayFunction": "constant",
        "MaxDelay": 0,
        "Unlimited": False,
    },
    "service": {
        "Attempts": 0,
        "Interval": 0,
        "Delay": 30 * SECOND,
        "DelayFunction": "exponential",
        "MaxDelay": HOUR,
        "Unlimited": True,
    },
}

# Fields the server owns: ignored on register, and skipped when deciding "spec unchanged".
SERVER_SET_FIELDS = (
    "Status",
    "StatusDescription",
    "Stable",
    "Version",
    "SubmitTime",
    "CreateIndex",
    "ModifyIndex",
    "JobModifyIndex",
)


def format_duration(ns: int) -> str:
    """Go's ``time.Duration.String()``: ``24h0m0s``, ``5s``, ``1.5s``, ``100ms``, ``0s``."""
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < SECOND:
        for unit, size in (("ms", 1_000_000), ("µs", 1_000), ("ns", 1)):
            if ns >= size:
                return sign + _trim_fraction(ns / size) + unit
    hours, rest = divmod(ns, HOUR)
    minutes, rest = divmod(rest, MINUTE)
    seconds = _trim_fraction(rest / SECOND)
    if hours:
        return f"{sign}{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{sign}{minutes}m{seconds}s"
    return f"{sign}{seconds}s"


def _trim_fraction(value: float) -> str:
    text = f"{value:.9f}".rstrip("0").rstrip(".")
    return text or "0"


def multierror_text(errors: list[str]) -> str:
    """hashicorp/go-multierror's rendering, which Nomad sends as the text body."""
    noun = "error" if len(errors) == 1 else "errors"
    lines = "".join(f"\t* {e}\n" for e in errors)
    return f"{len(errors)} {noun} occurred:\n{lines}\n"


def _merged(defaults: Obj, given: Any) -> Obj:
    merged = dict(defaults)
    if isinstance(given, dict):
        merged.update({k: v for k, v in given.items() if v is not None})
    return merged


def _job_kind(job_type: str) -> str:
    """Restart/reschedule defaults exist for batch-like and service-like jobs."""
    return "batch" if job_type in ("batch", "sysbatch") else "service"


def canonicalize(job: Obj, *, namespace: str, region: str = "global") -> Obj:
    """A deep copy of ``job`` with Nomad's defaults filled in (api ``Job.Canonicalize``).

    Keys are decoded as Go does first (case-insensitive, unknown fields dropped); decoding
    builds the copy.
    """
    job = decode(job)
    job_id = job.get("ID") or ""
    job.setdefault("ID", job_id)
    if not job.get("Name"):
        job["Name"] = job_id
    job["Namespace"] = namespace
    if not job.get("Region"):
        job["Region"] = region
    if not job.get("Type"):
        job["Type"] = "service"
    if not job.get("Priority"):
        job["Priority"] = 50
    if not job.get("Datacenters"):
        job["Datacenters"] = ["*"]
    if not job.get("NodePool"):
        job["NodePool"] = "default"
    for key, default in (
        ("AllAtOnce", False),
        ("Constraints", None),
        ("Affinities", None),
        ("Spreads", None),
        ("Meta", None),
        ("Periodic", None),
        ("ParameterizedJob", None),
        ("Reschedule", None),
        ("Multiregion", None),
        ("Dispatched", False),
        ("DispatchIdempotencyToken", ""),
        ("Payload", None),
        ("ParentID", ""),
        ("Stop", False),
        ("ConsulToken", ""),
        ("VaultToken", ""),
        ("NomadTokenID", ""),
    ):
        job.setdefault(key, default)
    periodic = job.get("Periodic")
    if isinstance(periodic, dict):
        for key, default in (
            ("Enabled", True),
            ("Spec", ""),
            ("Specs", None),
            ("SpecType", "cron"),
            ("ProhibitOverlap", False),
            ("TimeZone", "UTC"),
        ):
            if periodic.get(key) is None:
                periodic[key] = default
    parameterized = job.get("ParameterizedJob")
    if isinstance(parameterized, dict):
        parameterized.setdefault("Payload", "optional")
        if not parameterized["Payload"]:
            parameterized["Payload"] = "optional"
        parameterized.setdefault("MetaRequired", None)
        parameterized.setdefault("MetaOptional", None)
    kind = _job_kind(str(job["Type"]))
    groups = job.get("TaskGroups")
    if isinstance(groups, list):
        job["TaskGroups"] = [
            _canonical_group(g, job, kind) if isinstance(g, dict) else g for g in groups
        ]
    return job


def _canonical_group(group: Obj, job: Obj, kind: str) -> Obj:
    if group.get("Count") is None:
        group["Count"] = 1
    group["EphemeralDisk"] = _merged(
        {"Sticky": False, "SizeMB": 300, "Migrate": False}, group.get("EphemeralDisk")
    )
    group["RestartPolicy"] = _merged(
        {**DEFAULT_RESTART[kind], "RenderTemplates": False}, group.get("RestartPolicy")
    )
    reschedule = _merged(DEFAULT_RESCHEDULE[kind], job.get("Reschedule"))
    group["ReschedulePolicy"] = _merged(reschedule, group.get("ReschedulePolicy"))
    for key in (
        "Constraints",
        "Affinities",
        "Spreads",
        "Meta",
        "Networks",
        "Services",
        "Volumes",
        "ShutdownDelay",
        "MaxRunDuration",
        "Update",
        "Migrate",
        "Scaling",
    ):
        group.setdefault(key, None)
    tasks = group.get("Tasks")
    if isinstance(tasks, list):
        group["Tasks"] = [
            _canonical_task(t, group["RestartPolicy"]) if isinstance(t, dict) else t for t in tasks
        ]
    return group


def _canonical_task(task: Obj, group_restart: Obj) -> Obj:
    task["RestartPolicy"] = _merged(group_restart, task.get("RestartPolicy"))
    task["Resources"] = _merged(
        {
            "CPU": 100,
            "Cores": 0,
            "MemoryMB": 300,
            "MemoryMaxMB": 0,
            "DiskMB": 0,
            "Networks": None,
            "Devices": None,
        },
        task.get("Resources"),
    )
    task["LogConfig"] = _merged(
        {"MaxFiles": 10, "MaxFileSizeMB": 10, "Disabled": False}, task.get("LogConfig")
    )
    if task.get("KillTimeout") is None:
        task["KillTimeout"] = 5 * SECOND
    for key, default in (
        ("User", ""),
        ("Config", None),
        ("Env", None),
        ("Meta", None),
        ("Lifecycle", None),
        ("Constraints", None),
        ("Affinities", None),
        ("Services", None),
        ("DispatchPayload", None),
        ("VolumeMounts", None),
        ("Leader", False),
        ("ShutdownDelay", 0),
        ("KillSignal", ""),
        ("Kind", ""),
    ):
        task.setdefault(key, default)
    templates = task.get("Templates")
    task["Templates"] = (
        [_canonical_template(t) if isinstance(t, dict) else t for t in templates]
        if isinstance(templates, list) and templates
        else None
    )
    artifacts = task.get("Artifacts")
    task["Artifacts"] = (
        [_canonical_artifact(a) if isinstance(a, dict) else a for a in artifacts]
        if isinstance(artifacts, list) and artifacts
        else None
    )
    return task


def _canonical_template(template: Obj) -> Obj:
    return _merged(
        {
            "SourcePath": "",
            "DestPath": "",
            "EmbeddedTmpl": "",
            "ChangeMode": "restart",
            "ChangeSignal": "",
            "ChangeScript": None,
            "Splay": 5 * SECOND,
            "Perms": "0644",
            "Uid": None,
            "Gid": None,
            "LeftDelim": "{{",
            "RightDelim": "}}",
            "Envvars": False,
            "VaultGrace": 0,
            "Wait": None,
            "ErrMissingKey": False,
            "Once": False,
        },
        template,
    )


def _canonical_artifact(artifact: Obj) -> Obj:
    return _merged(
        {
            "GetterSource": "",
            "GetterOptions": None,
            "GetterHeaders": None,
            "GetterMode": "any",
            "GetterInsecure": False,
            "RelativeDest": "local/",
            "Chown": False,
        },
        artifact,
    )


# -- decoding as Go does -------------------------------------------------------------------
# Go's encoding/json matches keys case-insensitively and drops unknown ones. Each schema maps
# a struct's field names to the schema of its value: None for scalars and free-form maps
# (Meta, Env, Config: their keys are data), a dict for a nested struct, a 1-tuple for a list
# of structs.

Schema = dict[str, Any]

_RESTART: Schema = dict.fromkeys(("Interval", "Attempts", "Delay", "Mode", "RenderTemplates"))
_RESCHEDULE: Schema = dict.fromkeys(
    ("Attempts", "Interval", "Delay", "DelayFunction", "MaxDelay", "Unlimited")
)
_TEMPLATE: Schema = dict.fromkeys(
    (
        "SourcePath",
        "DestPath",
        "EmbeddedTmpl",
        "ChangeMode",
        "ChangeScript",
        "ChangeSignal",
        "Splay",
        "Perms",
        "Uid",
        "Gid",
        "LeftDelim",
        "RightDelim",
        "Envvars",
        "VaultGrace",
        "Wait",
        "ErrMissingKey",
        "Once",
    )
)
_ARTIFACT: Schema = dict.fromkeys(
    (
        "GetterSource",
        "GetterOptions",
        "GetterHeaders",
        "GetterMode",
        "GetterInsecure",
        "RelativeDest",
        "Chown",
    )
)
_RESOURCES: Schema = dict.fromkeys(
    (
        "CPU",
        "Cores",
        "MemoryMB",
        "MemoryMaxMB",
        "DiskMB",
        "IOPS",
        "SecretsMB",
        "Networks",
        "Devices",
        "NUMA",
    )
)
_TASK: Schema = {
    **dict.fromkeys(
        (
            "Name",
            "Driver",
            "User",
            "Config",
            "Constraints",
            "Affinities",
            "Env",
            "Services",
            "Meta",
            "KillTimeout",
            "Vault",
            "Consul",
            "VolumeMounts",
            "CSIPluginConfig",
            "Leader",
            "ShutdownDelay",
            "KillSignal",
            "Kind",
            "ScalingPolicies",
            "Identity",
            "Identities",
            "Actions",
            "Schedule",
        )
    ),
    "Lifecycle": dict.fromkeys(("Hook", "Sidecar")),
    "Resources": _RESOURCES,
    "RestartPolicy": _RESTART,
    "LogConfig": dict.fromkeys(("MaxFiles", "MaxFileSizeMB", "Disabled", "Enabled")),
    "Artifacts": (_ARTIFACT,),
    "Templates": (_TEMPLATE,),
    "DispatchPayload": dict.fromkeys(("File",)),
}
_GROUP: Schema = {
    **dict.fromkeys(
        (
            "Name",
            "Count",
            "Constraints",
            "Affinities",
            "Spreads",
            "Volumes",
            "Disconnect",
            "Update",
            "Migrate",
            "Networks",
            "Meta",
            "Services",
            "ShutdownDelay",
            "StopAfterClientDisconnect",
            "MaxClientDisconnect",
            "PreventRescheduleOnLost",
            "Scaling",
            "Consul",
            "MaxRunDuration",
        )
    ),
    "Tasks": (_TASK,),
    "RestartPolicy": _RESTART,
    "ReschedulePolicy": _RESCHEDULE,
    "EphemeralDisk": dict.fromkeys(("Sticky", "Migrate", "SizeMB")),
}
JOB_SCHEMA: Schema = {
    **dict.fromkeys(
        (
            "ID",
            "Name",
            "Namespace",
            "Region",
            "Type",
            "Priority",
            "AllAtOnce",
            "Datacenters",
            "NodePool",
            "Constraints",
            "Affinities",
            "Spreads",
            "Update",
            "Multiregion",
            "Dispatched",
            "DispatchIdempotencyToken",
            "Payload",
            "Migrate",
            "Meta",
            "ConsulToken",
            "ConsulNamespace",
            "VaultToken",
            "VaultNamespace",
            "NomadTokenID",
            *SERVER_SET_FIELDS,
            "ParentID",
            "Stop",
            "UI",
            "VersionTag",
        )
    ),
    "TaskGroups": (_GROUP,),
    "Periodic": dict.fromkeys(
        ("Enabled", "Spec", "Specs", "SpecType", "ProhibitOverlap", "TimeZone")
    ),
    "ParameterizedJob": dict.fromkeys(("Payload", "MetaRequired", "MetaOptional")),
    "Reschedule": _RESCHEDULE,
}


def decode(value: Any, schema: Schema = JOB_SCHEMA) -> Any:
    """A copy of ``value`` with struct keys spelled as Nomad's and unknown keys dropped, as Go
    decodes; nothing of the result is shared with ``value``.

    An exact key wins over a case-insensitive match, as in encoding/json.
    """
    if not isinstance(value, dict):
        return _copy_json(value)
    decoded: Obj = {}
    folded = [k for k in value if k not in schema]
    if folded:
        lowered = {name.lower(): name for name in schema}
        for key in folded:
            name = lowered.get(key.lower())
            if name is not None:
                decoded[name] = _decode_field(value[key], schema[name])
    for key, item in value.items():
        if key in schema:  # exact keys last, so they win
            decoded[key] = _decode_field(item, schema[key])
    return decoded


def _decode_field(value: Any, schema: Any) -> Any:
    if isinstance(schema, dict):
        return decode(value, schema)
    if isinstance(schema, tuple) and isinstance(value, list):
        return [decode(item, schema[0]) for item in value]
    return _copy_json(value)


def _copy_json(value: Any) -> Any:
    """A deep copy of decoded JSON (dicts, lists, scalars); ``copy.deepcopy`` does the same
    several times slower, with a memo for cycles and shared objects JSON cannot have."""
    if isinstance(value, dict):
        return {key: _copy_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy_json(item) for item in value]
    return value


# -- validation ----------------------------------------------------------------------------


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def validate(job: Obj) -> list[str]:
    """Nomad's ``Job.Validate`` texts for a canonicalized job (empty when valid)."""
    errors: list[str] = []
    job_id = job.get("ID")
    if not job_id:
        errors.append("Missing job ID")
    elif not isinstance(job_id, str):
        errors.append("Job ID must be a string")
    elif " " in job_id:
        errors.append("Job ID contains a space")
    elif "\x00" in job_id:
        errors.append("Job ID contains a null character")
    if not job.get("Name"):
        errors.append("Missing job name")
    elif "\x00" in str(job["Name"]):
        errors.append("Job Name contains a null character")
    job_type = job.get("Type")
    if job_type not in JOB_TYPES:
        errors.append(f'Invalid job type: "{job_type}"')
    priority = job.get("Priority")
    if not _is_int(priority) or not 1 <= priority <= 100:
        errors.append("Job priority must be between [1, 100]")
    datacenters = job.get("Datacenters")
    if not isinstance(datacenters, list) or not all(isinstance(d, str) and d for d in datacenters):
        errors.append("Job datacenters must be a list of non-empty strings")
    groups = job.get("TaskGroups")
    if not groups:
        errors.append("Missing job task groups")
    elif not isinstance(groups, list):
        errors.append("Job TaskGroups must be a list")
    else:
        seen: dict[str, int] = {}
        for number, group in enumerate(groups, start=1):
            if not isinstance(group, dict):
                errors.append(f"Job task group {number} must be an object")
                continue
            name = group.get("Name") or ""
            if not isinstance(name, str):
                errors.append(f"Job task group {number} name must be a string")
                name = str(name)
            if name in seen:
                errors.append(f"Job task group {number} redefines '{name}' from group {seen[name]}")
            elif name:
                seen[name] = number
            group_errors = _validate_group(group, job)
            if group_errors:
                errors.append(
                    f"Task group {name} validation failed: {multierror_text(group_errors)}"
                )
    parameterized = job.get("ParameterizedJob")
    if parameterized is not None:
        if job_type not in ("batch", "sysbatch"):
            errors.append('Parameterized job can only be used with "batch" or "sysbatch" scheduler')
        if not isinstance(parameterized, dict):
            errors.append("ParameterizedJob must be an object")
        elif parameterized.get("Payload") not in PAYLOAD_MODES:
            errors.append(f"Unknown payload requirement: {parameterized.get('Payload')!r}")
    meta = job.get("Meta")
    if meta is not None and not _is_string_map(meta):
        errors.append("Job Meta must map strings to strings")
    errors.extend(_constraint_errors(job.get("Constraints")))
    errors.extend(_periodic_errors(job))
    return errors


def _periodic_specs(periodic: Obj) -> list[str]:
    specs = list(periodic.get("Specs") or [])
    if periodic.get("Spec"):
        specs.insert(0, periodic["Spec"])
    return [str(s) for s in specs]


def _periodic_errors(job: Obj) -> list[str]:
    periodic = job.get("Periodic")
    if periodic is None:
        return []
    if not isinstance(periodic, dict):
        return ["Periodic must be an object"]
    if not periodic.get("Enabled"):
        return []
    errors: list[str] = []
    if job.get("Type") not in ("batch", "sysbatch"):
        errors.append('Periodic can only be used with "batch" or "sysbatch" scheduler')
    if periodic.get("SpecType", "cron") not in ("cron", ""):
        errors.append(f"Unknown periodic specification type {periodic.get('SpecType')!r}")
    specs = _periodic_specs(periodic)
    if not specs:
        errors.append("Must specify a spec")
    for spec in specs:
        if not croniter.is_valid(spec, second_at_beginning=len(spec.split()) == 6):
            errors.append(f"Invalid cron spec {spec!r}")
    try:
        ZoneInfo(str(periodic.get("TimeZone") or "UTC"))
    except (ZoneInfoNotFoundError, ValueError):
        errors.append(f"Invalid time zone {periodic.get('TimeZone')!r}")
    return errors


def next_periodic_launch(periodic: Obj, after: float) -> float | None:
    """The first launch time (unix seconds) strictly after ``after``, over every spec."""
    zone = ZoneInfo(str(periodic.get("TimeZone") or "UTC"))
    start = datetime.datetime.fromtimestamp(after, zone)
    launches = [
        croniter(spec, start, second_at_beginning=len(spec.split()) == 6).get_next(float)
        for spec in _periodic_specs(periodic)
    ]
    return min(launches, default=None)


def _constraint_errors(constraints: Any) -> list[str]:
    if constraints is None:
        return []
    if not isinstance(constraints, list):
        return ["Constraints must be a list"]
    errors: list[str] = []
    for number, constraint in enumerate(constraints, start=1):
        if not isinstance(constraint, dict) or not all(
            isinstance(constraint.get(k, ""), str) for k in ("LTarget", "RTarget", "Operand")
        ):
            errors.append(
                f"Constraint {number} validation failed: "
                "LTarget, RTarget and Operand must be strings"
            )
    return errors


def _is_string_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


def _validate_group(group: Obj, job: Obj) -> list[str]:
    errors: list[str] = []
    if not group.get("Name"):
        errors.append("Missing task group name")
    elif "\x00" in str(group["Name"]):
        errors.append("Task group name contains null character")
    count = group.get("Count")
    if not _is_int(count):
        errors.append("Task group count must be an integer")
    elif count < 0:
        errors.append("Task group count can't be negative")
    tasks = group.get("Tasks")
    if not tasks:
        errors.append("Missing tasks for task group")
    errors.extend(_validate_restart(group.get("RestartPolicy"), "Task Group"))
    if job.get("Type") in ("service", "batch"):
        errors.extend(_validate_reschedule(group.get("ReschedulePolicy")))
    meta = group.get("Meta")
    if meta is not None and not _is_string_map(meta):
        errors.append("Task group Meta must map strings to strings")
    errors.extend(_constraint_errors(group.get("Constraints")))
    if isinstance(tasks, list):
        seen: dict[str, int] = {}
        leaders = 0
        for number, task in enumerate(tasks, start=1):
            if not isinstance(task, dict):
                errors.append(f"Task {number} must be an object")
                continue
            name = task.get("Name") or ""
            if not isinstance(name, str):
                name = str(name)  # _validate_task reports the type
            if name in seen:
                errors.append(f"Task {number} redefines '{name}' from task {seen[name]}")
            elif name:
                seen[name] = number
            if task.get("Leader"):
                leaders += 1
            task_errors = _validate_task(task, job)
            if task_errors:
                errors.append(f"Task {name} validation failed: {multierror_text(task_errors)}")
        if leaders > 1:
            errors.append("Only one task may be marked as leader")
    return errors


def _validate_restart(policy: Any, where: str) -> list[str]:
    if not isinstance(policy, dict):
        return [f"{where} RestartPolicy must be an object"]
    errors: list[str] = []
    for key in ("Attempts", "Interval", "Delay"):
        if not _is_int(policy.get(key)):
            errors.append(f"RestartPolicy.{key} must be an integer (durations in nanoseconds)")
    if errors:
        return errors
    if policy.get("Mode") not in RESTART_MODES:
        errors.append(f"Unsupported restart mode: {policy.get('Mode')!r}")
    if policy["Attempts"] < 0:
        errors.append("Attempts must be >= 0")
    if policy["Delay"] < 0:
        errors.append("Delay must be >= 0")
    if policy["Attempts"] > 0 and policy["Interval"] <= 0:
        errors.append("Interval must be a non zero value if Attempts > 0")
    if (
        policy.get("Mode") == "fail"
        and policy["Attempts"] * policy["Delay"] > policy["Interval"] > 0
    ):
        errors.append(
            f"Nomad can't restart the TaskGroup {policy['Attempts']} times in an interval of "
            f"{format_duration(policy['Interval'])} with a delay of "
            f"{format_duration(policy['Delay'])}"
        )
    return errors


def _validate_reschedule(policy: Any) -> list[str]:
    if not isinstance(policy, dict):
        return ["ReschedulePolicy must be an object"]
    errors: list[str] = []
    for key in ("Attempts", "Interval", "Delay", "MaxDelay"):
        if not _is_int(policy.get(key)):
            errors.append(f"ReschedulePolicy.{key} must be an integer (durations in nanoseconds)")
    if errors:
        return errors
    attempts, unlimited = policy["Attempts"], bool(policy.get("Unlimited"))
    if attempts <= 0 and not unlimited:
        return errors  # disabled: Nomad validates nothing else
    if attempts > 0:
        if policy["Interval"] <= 0:
            errors.append("Interval must be a non zero value if Attempts > 0")
        if unlimited:
            errors.append(
                f"Reschedule Policy with Attempts = {attempts}, Interval = "
                f"{format_duration(policy['Interval'])}, and Unlimited = true is ambiguous"
            )
            errors.append("If Attempts >0, Unlimited cannot also be set to true")
    delay = policy["Delay"]
    if delay < RESCHEDULE_MIN_DELAY:
        errors.append(
            f"Delay cannot be less than {format_duration(RESCHEDULE_MIN_DELAY)} "
            f"(got {format_duration(delay)})"
        )
    function = policy.get("DelayFunction")
    if function not in DELAY_FUNCTIONS:
        errors.append(
            f"Invalid delay function {function!r}, must be one of {list(DELAY_FUNCTIONS)}"
        )
    elif function != "constant" and policy["MaxDelay"] < delay:
        errors.append(
            f"Max Delay cannot be less than Delay {format_duration(delay)} "
            f"(got {format_duration(policy['MaxDelay'])})"
        )
    return errors


def _validate_task(task: Obj, job: Obj) -> list[str]:
    errors: list[str] = []
    name = task.get("Name")
    if not name:
        errors.append("Missing task name")
    elif not isinstance(name, str):
        errors.append("Task name must be a string")
    else:
        if name == "alloc":
            errors.append('Task cannot be named "alloc"')
        if "/" in name:
            errors.append("Task name cannot include slashes")
        if "\x00" in name:
            errors.append("Task name cannot include null characters")
    if not task.get("Driver"):
        errors.append("Missing task driver")
    kill_timeout = task.get("KillTimeout")
    if not _is_int(kill_timeout) or kill_timeout < 0:
        errors.append("KillTimeout must be a positive value")
    config = task.get("Config")
    if config is not None and not isinstance(config, dict):
        errors.append("Task Config must be an object")
    elif task.get("Driver") == "raw_exec":
        command = (config or {}).get("command")
        if not isinstance(command, str) or not command:
            errors.append('Missing required field: "command" in raw_exec config')
        args = (config or {}).get("args")
        if args is not None and not (
            isinstance(args, list) and all(isinstance(a, str) for a in args)
        ):
            errors.append("raw_exec config args must be a list of strings")
    for key in ("Env", "Meta"):
        value = task.get(key)
        if value is not None and not _is_string_map(value):
            errors.append(f"Task {key} must map strings to strings")
    errors.extend(_validate_restart(task.get("RestartPolicy"), "Task"))
    errors.extend(_constraint_errors(task.get("Constraints")))
    lifecycle = task.get("Lifecycle")
    if lifecycle is not None and (
        not isinstance(lifecycle, dict) or lifecycle.get("Hook") not in LIFECYCLE_HOOKS
    ):
        hook = lifecycle.get("Hook") if isinstance(lifecycle, dict) else lifecycle
        errors.append(f"invalid hook: {hook}")
    log_config = task.get("LogConfig")
    if isinstance(log_config, dict):
        if not _is_int(log_config.get("MaxFiles")) or log_config["MaxFiles"] < 1:
            errors.append(f"minimum number of files is 1; got {log_config.get('MaxFiles')}")
        if not _is_int(log_config.get("MaxFileSizeMB")) or log_config["MaxFileSizeMB"] < 1:
            errors.append(f"minimum file size is 1MB; got {log_config.get('MaxFileSizeMB')}")
    resources = task.get("Resources")
    if isinstance(resources, dict):
        for key in ("CPU", "MemoryMB"):
            if not _is_int(resources.get(key)) or resources[key] < 0:
                errors.append(f"Resources.{key} must be a non-negative integer")
    for number, template in enumerate(task.get("Templates") or [], start=1):
        errors.extend(
            f"Template {number} validation failed: {e}" for e in _template_errors(template)
        )
    for number, artifact in enumerate(task.get("Artifacts") or [], start=1):
        if not isinstance(artifact, dict) or not artifact.get("GetterSource"):
            errors.append(f"Artifact {number} validation failed: source must be specified")
        elif isinstance(artifact.get("RelativeDest"), str) and _escapes(artifact["RelativeDest"]):
            errors.append(
                f"Artifact {number} validation failed: destination escapes allocation "
                f"directory: {artifact['RelativeDest']}"
            )
    payload = task.get("DispatchPayload")
    if payload is not None:
        if job.get("ParameterizedJob") is None:
            errors.append("Task uses a DispatchPayload but the job is not parameterized")
        elif not isinstance(payload, dict) or _escapes(str(payload.get("File") or "")):
            errors.append("DispatchPayload.File escapes the task's local directory")
    return errors


def _template_errors(template: Any) -> list[str]:
    if not isinstance(template, dict):
        return ["template must be an object"]
    errors: list[str] = []
    has_source, has_embedded = bool(template.get("SourcePath")), bool(template.get("EmbeddedTmpl"))
    if has_source == has_embedded:
        errors.append("Must specify a source path or have an embedded template")
    if not template.get("DestPath"):
        errors.append("Must specify a destination for the template")
    elif _escapes(str(template["DestPath"])):
        errors.append(f"destination escapes allocation directory: {template['DestPath']}")
    if template.get("ChangeMode") not in ("noop", "restart", "signal", "script"):
        errors.append(f"Invalid change mode {template.get('ChangeMode')!r}")
    perms = template.get("Perms")
    if not isinstance(perms, str) or not re.fullmatch(r"0?[0-7]{3}", perms):
        errors.append(f"Failed to parse {perms!r} as octal")
    return errors


def _escapes(relative: str) -> bool:
    """Whether a task-relative path leaves the allocation directory (``../..``)."""
    depth = 1  # the task directory sits one level inside the allocation directory
    for part in relative.split("/"):
        if part in ("", "."):
            continue
        depth = depth - 1 if part == ".." else depth + 1
        if depth < 0:
            return True
    return relative.startswith("/")


def spec_equal(submitted: Obj, stored: Obj) -> bool:
    """Nomad's "unchanged spec": deep-equal after copying the server-set fields over."""
    left = {k: v for k, v in submitted.items() if k not in SERVER_SET_FIELDS}
    right = {k: v for k, v in stored.items() if k not in SERVER_SET_FIELDS}
    return left == right
