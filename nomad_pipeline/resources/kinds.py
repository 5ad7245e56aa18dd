"""The kinds: Namespace, Flow, Run, Trigger and GitRepository.

Specs are validated completely at parse time so a bad flow is refused at apply, never
discovered mid-run: durations, cron expressions, time zones, conditions (parsed, and every name
they read must exist and run earlier), templates (known roots and declared variables), step
names, ``needs`` (existing steps, no cycle) and variable defaults.

Step order: when no step of a flow declares ``needs``, each step needs the one before it (the
seed's sequential behaviour); once any step declares ``needs``, the flow is a DAG and steps
without ``needs`` start at once. :meth:`FlowSpec.dependencies` gives the effective edges.

Inline runner driver: ``raw_exec`` by default (runs the host's ``nomad-pipeline-runner``, works
on the dev agent and on clients with raw_exec enabled); ``docker`` needs ``image`` (which must
contain the runner), ``exec`` may name one.
"""

from __future__ import annotations

import json
import re
import zoneinfo
from datetime import datetime
from typing import Any, ClassVar, Literal, Self

from pydantic import (
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from nomad_pipeline.errors import Invalid
from nomad_pipeline.resources import names
from nomad_pipeline.resources.durations import Duration
from nomad_pipeline.resources.expressions import KNOWN_ROOTS, parse_expression
from nomad_pipeline.resources.jsonpath import parse_json_path
from nomad_pipeline.resources.meta import API_GROUP, Resource, Status, StrictModel
from nomad_pipeline.resources.names import Phase
from nomad_pipeline.resources.templates import template_names
from nomad_pipeline.resources.validation import FieldError
from nomad_pipeline.resources.variables import (
    TRIGGER_PREFIX,
    VariableType,
    check_value,
)

STEP_NAME_PATTERN = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?$")
VARIABLE_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# What conditions may read about a step, and about the run.
STEP_ATTRIBUTES = frozenset({"status", "exit_code", "attempts", "message"})
RUN_ATTRIBUTES = frozenset({"id", "name", "namespace", "flow"})

# Defined in ``names`` (importable without pydantic, for the CLI) with ``Phase``.
TERMINAL_PHASES = names.TERMINAL_PHASES


def _check_step_name(value: str) -> str:
    if not STEP_NAME_PATTERN.match(value):
        raise ValueError(
            f"invalid step name {value!r}: 1-63 letters, digits, '_' or '-', starting and "
            "ending with a letter or digit"
        )
    return value


def _check_condition(value: str | None) -> str | None:
    if value is not None:
        try:
            parse_expression(value)
        except Invalid as error:
            raise ValueError(error.message) from None
    return value


def _check_template(value: str) -> str:
    try:
        template_names(value)
    except Invalid as error:
        raise ValueError(error.message) from None
    return value


# ---------------------------------------------------------------------------------------------
# Namespace


class NamespaceSpec(StrictModel):
    description: str = ""


class NamespaceStatus(Status):
    pass


class Namespace(Resource):
    KIND: ClassVar[str] = "Namespace"

    kind: Literal["Namespace"] = "Namespace"
    spec: NamespaceSpec = Field(default_factory=NamespaceSpec)
    status: NamespaceStatus = Field(default_factory=NamespaceStatus)


# ---------------------------------------------------------------------------------------------
# Flow


class Variable(StrictModel):
    name: str
    type: VariableType = "string"
    required: bool = False
    default: Any = None
    description: str = ""

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not VARIABLE_NAME_PATTERN.match(value):
            raise ValueError(
                f"invalid variable name {value!r}: letters, digits and '_', with '.' between "
                "parts (such as trigger.git_sha)"
            )
        return value

    @model_validator(mode="after")
    def _default_has_type(self) -> Self:
        if self.default is not None:
            try:
                check_value(self.type, self.default)
            except ValueError as error:
                raise FieldError(("default",), str(error)) from None
        return self


class Artifact(StrictModel):
    """A Nomad artifact (go-getter): ``options`` values are templates (``${var.git_sha}``)."""

    source: str
    destination: str = "local/"
    options: dict[str, str] = Field(default_factory=dict)

    @field_validator("source", "destination")
    @classmethod
    def _templated(cls, value: str) -> str:
        return _check_template(value)

    @field_validator("options")
    @classmethod
    def _templated_options(cls, value: dict[str, str]) -> dict[str, str]:
        for option in value.values():
            _check_template(option)
        return value


class TaskResources(StrictModel):
    cpu: int = Field(default=100, ge=1)
    memory: int = Field(default=256, ge=1)


class Runner(StrictModel):
    namespace: str = "default"
    driver: Literal["raw_exec", "exec", "docker"] = "raw_exec"
    image: str | None = None
    artifacts: list[Artifact] = Field(default_factory=list)
    resources: TaskResources = Field(default_factory=TaskResources)

    @model_validator(mode="after")
    def _image_fits_driver(self) -> Self:
        if self.driver == "docker" and not self.image:
            raise FieldError(("image",), "the docker driver needs an image (with the runner)")
        if self.driver == "raw_exec" and self.image:
            raise FieldError(
                ("image",), "raw_exec runs the host's nomad-pipeline-runner and uses no image"
            )
        return self


class _StepBase(StrictModel):
    name: str
    condition: str | None = None
    needs: list[str] = Field(default_factory=list)
    timeout: Duration | None = None
    retries: int = Field(default=0, ge=0, le=100)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return _check_step_name(value)

    @field_validator("condition")
    @classmethod
    def _condition_parses(cls, value: str | None) -> str | None:
        return _check_condition(value)


class InlineStep(_StepBase):
    run: str
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("run")
    @classmethod
    def _run_templated(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return _check_template(value)

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, template in value.items():
            if not ENV_NAME_PATTERN.match(name):
                raise ValueError(f"invalid environment variable name {name!r}")
            _check_template(template)
        return value


class InlineSpec(StrictModel):
    # The seed's `inline "<job-id>"` label: the runner job's ID prefix (default: the flow name).
    job_id: str | None = None
    runner: Runner = Field(default_factory=Runner)
    steps: list[InlineStep] = Field(min_length=1)


class JobSpec(StrictModel):
    """A step's Nomad jobspec: exactly one of ``path``, ``hcl`` or ``json``.

    ``source`` is the content of ``path``, read when the manifest is loaded, so the stored flow
    does not depend on files on the controller's host. ``variables`` maps jobspec variable names
    to templates (``${var.env}``).
    """

    path: str | None = None
    source: str | None = None
    hcl: str | None = None
    json_: dict[str, Any] | None = Field(default=None, alias="json")
    name_format: str | None = None
    variables: dict[str, str] = Field(default_factory=dict)

    @field_validator("json_", mode="before")
    @classmethod
    def _json_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(f"not valid JSON: {error}") from None
        return value

    @field_validator("name_format")
    @classmethod
    def _name_templated(cls, value: str | None) -> str | None:
        return None if value is None else _check_template(value)

    @field_validator("variables")
    @classmethod
    def _variables_templated(cls, value: dict[str, str]) -> dict[str, str]:
        for template in value.values():
            _check_template(template)
        return value

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        given = [name for name in ("path", "hcl", "json_") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "exactly one of path, hcl or json is required"
                + (f" (got {', '.join(n.rstrip('_') for n in given)})" if given else "")
            )
        if self.source is not None and self.path is None:
            raise FieldError(("source",), "source holds the content of path; set path")
        return self

    def text(self) -> str | dict[str, Any]:
        """The jobspec: HCL text (from ``hcl`` or the loaded ``path``) or the JSON object."""
        if self.json_ is not None:
            return self.json_
        if self.hcl is not None:
            return self.hcl
        if self.source is None:
            raise Invalid(f"jobspec {self.path!r} was not loaded", field="job.source")
        return self.source


class SpecificationStep(_StepBase):
    job: JobSpec


class SpecificationSpec(StrictModel):
    steps: list[SpecificationStep] = Field(min_length=1)


class Concurrency(StrictModel):
    max: int = Field(default=1, ge=1)
    policy: Literal["queue", "skip", "cancel-oldest"] = "queue"


class RunRetention(StrictModel):
    keep_last: int | None = Field(default=None, ge=0)
    max_age: Duration | None = None


class FlowSpec(StrictModel):
    variables: list[Variable] = Field(default_factory=list)
    inline: InlineSpec | None = None
    specification: SpecificationSpec | None = None
    timeout: Duration | None = None
    concurrency: Concurrency | None = None
    run_retention: RunRetention | None = None

    @property
    def steps(self) -> list[InlineStep] | list[SpecificationStep]:
        if self.inline is not None:
            return self.inline.steps
        if self.specification is not None:
            return self.specification.steps
        return []

    @property
    def step_names(self) -> list[str]:
        return [step.name for step in self.steps]

    def dependencies(self) -> dict[str, list[str]]:
        """Each step's effective prerequisites, in flow order (see the module docstring)."""
        steps = self.steps
        if any(step.needs for step in steps):
            return {step.name: list(step.needs) for step in steps}
        return {
            step.name: ([steps[index - 1].name] if index else [])
            for index, step in enumerate(steps)
        }

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (self.inline is None) == (self.specification is None):
            raise ValueError("exactly one of inline or specification is required")
        section: tuple[str, str] = (
            ("inline", "steps") if self.inline is not None else ("specification", "steps")
        )
        self._check_unique_names(section)
        self._check_needs(section)
        self._check_references(section)
        return self

    def _check_unique_names(self, section: tuple[str, str]) -> None:
        names = [variable.name for variable in self.variables]
        for index, name in enumerate(names):
            if name in names[:index]:
                raise FieldError(("variables", index, "name"), f"duplicate variable {name!r}")
        seen: set[str] = set()
        for index, step in enumerate(self.steps):
            if step.name in seen:
                raise FieldError((*section, index, "name"), f"duplicate step name {step.name!r}")
            seen.add(step.name)

    def _check_needs(self, section: tuple[str, str]) -> None:
        known = set(self.step_names)
        for index, step in enumerate(self.steps):
            for position, needed in enumerate(step.needs):
                where = (*section, index, "needs", position)
                if needed == step.name:
                    raise FieldError(where, f"step {step.name!r} cannot need itself")
                if needed not in known:
                    raise FieldError(where, f"unknown step {needed!r}")
        _check_acyclic(self.dependencies(), section, self.step_names)

    def _check_references(self, section: tuple[str, str]) -> None:
        """Conditions read declared variables and earlier steps; templates declared variables."""
        declared = {variable.name for variable in self.variables}
        steps = self.steps
        has_conditions = any(step.condition for step in steps)
        ancestors = _ancestors(self.dependencies()) if has_conditions else {}
        templates: list[tuple[tuple[str | int, ...], str]] = []
        for index, step in enumerate(steps):
            if step.condition is not None:
                for name in sorted(parse_expression(step.condition).names()):
                    problem = _reference_problem(name, declared, ancestors[step.name], step.name)
                    if problem:
                        raise FieldError((*section, index, "condition"), problem)
            templates.extend(
                ((*section, index, *field), text) for field, text in _step_templates(step)
            )
        if self.inline is not None:
            for index, artifact in enumerate(self.inline.runner.artifacts):
                artifact_at = ("inline", "runner", "artifacts", index)
                templates.append(((*artifact_at, "source"), artifact.source))
                templates.append(((*artifact_at, "destination"), artifact.destination))
                templates.extend(
                    ((*artifact_at, "options", key), value)
                    for key, value in artifact.options.items()
                )
        for location, template in templates:
            for name in template_names(template):
                problem = _reference_problem(name, declared, set(), None)
                if problem:
                    raise FieldError(location, problem)


def _step_templates(step: _StepBase) -> list[tuple[tuple[str, ...], str]]:
    if isinstance(step, InlineStep):
        return [(("run",), step.run), *((("env", key), value) for key, value in step.env.items())]
    if not isinstance(step, SpecificationStep):
        return []
    found: list[tuple[tuple[str, ...], str]] = [
        (("job", "variables", key), value) for key, value in step.job.variables.items()
    ]
    if step.job.name_format is not None:
        found.append((("job", "name_format"), step.job.name_format))
    return found


def _check_acyclic(
    edges: dict[str, list[str]], section: tuple[str | int, ...], order: list[str]
) -> None:
    state: dict[str, str] = {}  # "visiting" | "done"
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = "visiting"
        stack.append(name)
        for needed in edges[name]:
            if state.get(needed) == "visiting":
                cycle = [*stack[stack.index(needed) :], needed]
                raise FieldError(
                    (*section, order.index(name), "needs"),
                    "needs form a cycle: " + " -> ".join(cycle),
                )
            if needed not in state:
                visit(needed)
        stack.pop()
        state[name] = "done"

    for name in order:
        if name not in state:
            visit(name)


def _ancestors(edges: dict[str, list[str]]) -> dict[str, set[str]]:
    memo: dict[str, set[str]] = {}

    def of(name: str) -> set[str]:
        if name not in memo:
            found: set[str] = set()
            for needed in edges[name]:
                found.add(needed)
                found |= of(needed)
            memo[name] = found
        return memo[name]

    return {name: of(name) for name in edges}


def _reference_problem(
    name: str, variables: set[str], earlier_steps: set[str], step: str | None
) -> str | None:
    """Why ``name`` cannot be read here, or None when it can."""
    parts = name.split(".")
    root = parts[0]
    if root not in KNOWN_ROOTS:
        return f"unknown name {name!r}: names start with {', '.join(sorted(KNOWN_ROOTS))}"
    if root == "var":
        rest = ".".join(parts[1:])
        if rest.startswith(TRIGGER_PREFIX):
            return None
        if not any(rest == v or rest.startswith(v + ".") for v in variables):
            known = ", ".join(sorted(variables)) or "none"
            return f"unknown variable {rest!r} in {name!r} (declared: {known})"
        return None
    if root == "run":
        if len(parts) != 2 or parts[1] not in RUN_ATTRIBUTES:
            return f"unknown name {name!r}: run has {', '.join(sorted(RUN_ATTRIBUTES))}"
        return None
    if root == "nomad_pipeline":
        return None if name == "nomad_pipeline.run_id" else f"unknown name {name!r}"
    if root == "trigger":
        return None if len(parts) >= 2 else f"{name!r} needs a field, such as trigger.git_sha"
    step_parts = parts[2:] if root == "inline" else parts[1:]
    if (root == "inline" and (len(parts) < 2 or parts[1] != "steps")) or len(step_parts) != 2:
        return f"{name!r} must read <steps>.<step>.<{'|'.join(sorted(STEP_ATTRIBUTES))}>"
    referenced, attribute = step_parts
    if attribute not in STEP_ATTRIBUTES:
        return (
            f"unknown step field {attribute!r} in {name!r}: "
            f"use {', '.join(sorted(STEP_ATTRIBUTES))}"
        )
    if referenced not in earlier_steps:
        if referenced == step:
            return f"a step's condition cannot read its own result ({name!r})"
        return (
            f"{name!r}: step {referenced!r} does not exist or does not run before "
            f"{step!r} (add it to needs)"
        )
    return None


class FlowStatus(Status):
    pass


class Flow(Resource):
    KIND: ClassVar[str] = "Flow"

    kind: Literal["Flow"] = "Flow"
    spec: FlowSpec
    status: FlowStatus = Field(default_factory=FlowStatus)


# ---------------------------------------------------------------------------------------------
# Run


class RunTrigger(StrictModel):
    """What started a run. ``name`` is the Trigger's name for cron/webhook/git runs."""

    type: Literal["manual", "cron", "webhook", "git"] = "manual"
    name: str | None = None
    delivery_id: str | None = None
    event: str | None = None
    schedule_time: datetime | None = None
    revision: str | None = None


class RunSpec(StrictModel):
    flow: str
    flow_spec: FlowSpec
    variables: dict[str, Any] = Field(default_factory=dict)
    trigger: RunTrigger = Field(default_factory=RunTrigger)
    # Setting cancel asks the run reconciler to stop every Nomad job of the run (level-triggered,
    # so a cancel survives controller restarts).
    cancel: bool = False
    # A rerun names the run it repeats; with from_failed its succeeded steps are reused.
    rerun_of: str | None = None
    from_failed: bool = False

    @model_validator(mode="after")
    def _variables_typed(self) -> Self:
        for variable in self.flow_spec.variables:
            value = self.variables.get(variable.name)
            if value is None:
                if variable.required:
                    raise FieldError(("variables", variable.name), "required variable missing")
                continue
            try:
                check_value(variable.type, value)
            except ValueError as error:
                raise FieldError(("variables", variable.name), str(error)) from None
        return self


class StepStatus(StrictModel):
    """One step of a run. Every field is on the wire, null included (checks read them all)."""

    name: str
    phase: Phase = "pending"
    nomad_job_id: str | None = None
    nomad_namespace: str | None = None
    alloc_id: str | None = None
    exit_code: int | None = None
    attempts: int = 0
    start_time: datetime | None = None
    end_time: datetime | None = None
    message: str = ""

    @model_serializer(mode="wrap")
    def _every_field(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for name in type(self).model_fields:
            data.setdefault(name, None)
        return data


class RunStatus(Status):
    phase: Phase = "pending"
    start_time: datetime | None = None
    end_time: datetime | None = None
    message: str = ""
    steps: list[StepStatus] = Field(default_factory=list)

    def step(self, name: str) -> StepStatus | None:
        return next((step for step in self.steps if step.name == name), None)


# Labels every run carries: the flow it runs, and the trigger that started it (if one did), so
# ``get runs -l nomad-pipeline.io/flow=build`` and trigger policies select a flow's runs.
FLOW_LABEL = f"{API_GROUP}/flow"
TRIGGER_LABEL = f"{API_GROUP}/trigger"


class Run(Resource):
    KIND: ClassVar[str] = "Run"

    kind: Literal["Run"] = "Run"
    spec: RunSpec
    status: RunStatus = Field(default_factory=RunStatus)


# ---------------------------------------------------------------------------------------------
# Trigger

_CRON_MACROS = frozenset(
    {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
)


def _check_cron(expression: str) -> str:
    text = expression.strip()
    if text.startswith("@"):
        if text not in _CRON_MACROS:
            raise ValueError(
                f"unknown cron macro {text!r}: use one of {', '.join(sorted(_CRON_MACROS))}"
            )
        return text
    # croniter takes ~20 ms to import: only manifests with cron schedules pay for it.
    from croniter import croniter

    if len(text.split()) != 5 or not croniter.is_valid(text):
        raise ValueError(
            f"invalid cron expression {expression!r}: expected 5 fields "
            "(minute hour day-of-month month day-of-week) or a macro such as @hourly"
        )
    return text


def _check_timezone(name: str) -> str:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r} (use an IANA name such as Europe/Berlin)"
        ) from None
    return name


class CronSource(StrictModel):
    schedules: list[str] = Field(min_length=1)
    timezone: str = "UTC"
    concurrency_policy: Literal["allow", "forbid", "replace"] = "allow"
    starting_deadline: Duration | None = None

    @field_validator("schedules")
    @classmethod
    def _valid_schedules(cls, value: list[str]) -> list[str]:
        return [_check_cron(expression) for expression in value]

    @field_validator("timezone")
    @classmethod
    def _valid_timezone(cls, value: str) -> str:
        return _check_timezone(value)


class NomadVariableRef(StrictModel):
    path: str
    key: str
    namespace: str = "default"


class SecretRef(StrictModel):
    """Where a secret lives; its value is never stored in an object or printed."""

    from_env: str | None = None
    from_nomad_variable: NomadVariableRef | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.from_env is None) == (self.from_nomad_variable is None):
            raise ValueError("exactly one of from_env or from_nomad_variable is required")
        if self.from_env is not None and not ENV_NAME_PATTERN.match(self.from_env):
            raise FieldError(("from_env",), f"invalid environment variable name {self.from_env!r}")
        return self


class WebhookSource(StrictModel):
    """``branches`` and ``paths`` are glob patterns; empty means any."""

    provider: Literal["github", "gitlab", "generic"]
    repository: str | None = None
    events: list[str] = Field(default_factory=lambda: ["push"])
    branches: list[str] = Field(default_factory=list)
    paths: list[str] = Field(default_factory=list)
    secret: SecretRef | None = None
    # generic only: the header carrying the body's HMAC-SHA256, and variables picked from the
    # JSON body with JSONPath-like expressions ("$.head_commit.id", "commits[0].message").
    signature_header: str | None = None
    variables: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _generic_fields(self) -> Self:
        if self.provider != "generic":
            for field in ("signature_header", "variables"):
                if getattr(self, field):
                    raise FieldError((field,), "only the generic provider uses this field")
        for name, expression in self.variables.items():
            try:
                parse_json_path(expression)
            except Invalid as error:
                raise FieldError(("variables", name), error.message) from None
        return self


class GitSource(StrictModel):
    url: str
    branch: str = "main"
    interval: Duration = "1m"


class TriggerSource(StrictModel):
    cron: CronSource | None = None
    webhook: WebhookSource | None = None
    git: GitSource | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        given = [name for name in ("cron", "webhook", "git") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "exactly one of cron, webhook or git is required"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self

    @property
    def type(self) -> Literal["cron", "webhook", "git"]:
        if self.cron is not None:
            return "cron"
        return "webhook" if self.webhook is not None else "git"


class TriggerSpec(StrictModel):
    flow: str
    variables: dict[str, Any] = Field(default_factory=dict)
    suspend: bool = False
    source: TriggerSource


class TriggerStatus(Status):
    next_fire_time: datetime | None = None
    last_fire_time: datetime | None = None
    # The schedule time being fired, recorded before the run is created (crash safety).
    pending_fire_time: datetime | None = None
    last_run: str | None = None
    # Recent webhook deliveries, oldest first: delivery id -> the name of the run it starts,
    # recorded before the run is created, so a replayed delivery starts no second run.
    last_deliveries: dict[str, str] = Field(default_factory=dict)
    last_revision: str | None = None
    message: str = ""


class Trigger(Resource):
    KIND: ClassVar[str] = "Trigger"

    kind: Literal["Trigger"] = "Trigger"
    spec: TriggerSpec
    status: TriggerStatus = Field(default_factory=TriggerStatus)


# ---------------------------------------------------------------------------------------------
# GitRepository


class GitRef(StrictModel):
    branch: str | None = None
    tag: str | None = None
    commit: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        given = [name for name in ("branch", "tag", "commit") if getattr(self, name)]
        if len(given) != 1:
            raise ValueError(
                "exactly one of branch, tag or commit is required"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self


class GitRepositorySpec(StrictModel):
    url: str
    ref: GitRef = Field(default_factory=lambda: GitRef(branch="main"))
    path: str = "."
    interval: Duration = "1m"
    prune: bool = False
    suspend: bool = False
    # Credentials: an https token, or an ssh private key for ssh URLs.
    secret_ref: SecretRef | None = None

    @field_validator("path")
    @classmethod
    def _inside_repository(cls, value: str) -> str:
        if value.startswith("/") or ".." in value.split("/"):
            raise ValueError(f"path {value!r} must be relative and stay inside the repository")
        return value


class FileError(StrictModel):
    path: str
    message: str


# ``nomad-pipeline sync GITREPO`` (or the sync route) writes a new value here to ask for an
# immediate reconcile; the reconciler copies the value it handled to
# ``status.last_handled_reconcile_at``.
RECONCILE_REQUESTED_ANNOTATION = f"{API_GROUP}/reconcile-requested-at"


class GitRepositoryStatus(Status):
    last_fetched_revision: str | None = None
    last_applied_revision: str | None = None
    file_errors: list[FileError] = Field(default_factory=list)
    # When the remote was last fetched: the next fetch is due ``spec.interval`` later.
    last_fetch_time: datetime | None = None
    # The reconcile-requested annotation's value the last reconcile answered.
    last_handled_reconcile_at: str | None = None


class GitRepository(Resource):
    KIND: ClassVar[str] = "GitRepository"

    kind: Literal["GitRepository"] = "GitRepository"
    spec: GitRepositorySpec
    status: GitRepositoryStatus = Field(default_factory=GitRepositoryStatus)
