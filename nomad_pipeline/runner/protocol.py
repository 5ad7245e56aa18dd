"""The wire contract between ``nomad-pipeline-runner`` and the controller's runner API.

``GET /v1/runner/runs/{namespace}/{run}`` answers a :class:`RunnerPlan`; the runner answers with
``POST /v1/runner/runs/{namespace}/{run}/report`` bodies that are a :class:`ReportBatch`. Both
carry ``Authorization: Bearer <token>`` (the run's token). The controller owns these models'
meaning; the runner needs nothing of the controller but them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

RUNNER_API_PREFIX = "/v1/runner/runs"

ReportEventType = Literal["started", "finished", "skipped", "log"]
FinishedPhase = Literal["success", "failed", "cancelled"]
OutputStream = Literal["stdout", "stderr"]


class _WireModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PlanStep(_WireModel):
    name: str
    # The step's script and extra environment as the flow wrote them, ``${...}`` templates
    # included: the runner renders them (runner/rendering.py) so that no value becomes code.
    run: str
    env: dict[str, str] = Field(default_factory=dict)
    # Transitive predecessors: every step that must be terminal before this one is decided
    # (all earlier steps without ``needs`` in the flow, else the closure of ``needs``).
    after: list[str] = Field(default_factory=list)
    condition: str | None = None
    timeout_seconds: float | None = Field(default=None, gt=0)
    retries: int = Field(default=0, ge=0)
    # Delay before the first retry; each further retry doubles it, up to ``retry_backoff_max``.
    retry_backoff_seconds: float = Field(default=1.0, ge=0)
    retry_backoff_max_seconds: float = Field(default=60.0, ge=0)


class StepOutcome(_WireModel):
    phase: Literal["success", "failed", "skipped", "cancelled"]
    exit_code: int | None = None
    attempts: int = 0
    message: str = ""


class RunnerPlan(_WireModel):
    namespace: str
    run: str
    flow: str
    steps: list[PlanStep]
    # What conditions read besides the steps (see resources.expressions.evaluation_context):
    # the run's variables, ``run.*`` (id, name, namespace, flow) and ``trigger.*``.
    variables: dict[str, Any] = Field(default_factory=dict)
    run_context: dict[str, Any] = Field(default_factory=dict)
    trigger_context: dict[str, Any] = Field(default_factory=dict)
    # Steps that already ended in an earlier attempt of this runner (a restarted allocation):
    # they are not run again and their outcome feeds the conditions.
    completed: dict[str, StepOutcome] = Field(default_factory=dict)
    # The last report sequence number the controller applied for this run; a restarted runner
    # numbers its events after it so none is mistaken for a duplicate.
    last_seq: int = 0


class ReportEvent(_WireModel):
    seq: int = Field(ge=1)
    step: str
    type: ReportEventType
    time: datetime
    # ``log`` events: which stream and the text (UTF-8, undecodable bytes replaced).
    stream: OutputStream | None = None
    data: str | None = None
    # ``started``: the attempt number (1 for the first run of the step).
    attempt: int | None = None
    # ``finished``: the outcome.
    phase: FinishedPhase | None = None
    exit_code: int | None = None
    # ``finished``/``skipped``: why (timeout, signal, condition false, ...).
    message: str | None = None


class ReportBatch(_WireModel):
    events: list[ReportEvent]


class ReportAck(_WireModel):
    # The highest sequence number applied so far (events at or below it are never re-applied).
    last_seq: int
    # True once the run was cancelled or deleted: the runner should stop its steps.
    cancelled: bool = False
