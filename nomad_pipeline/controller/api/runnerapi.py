"""Routes the inline flows' runner calls: its plan, and its batched reports.

- ``GET /v1/runner/runs/{namespace}/{run}`` answers the run's :class:`RunnerPlan`.
- ``POST /v1/runner/runs/{namespace}/{run}/report`` takes a :class:`ReportBatch`: log data goes
  to the log store, step transitions to the Run's status in one write with the
  resource-version precondition (re-read and re-applied on conflict).

Both need ``Authorization: Bearer <runner_token(secret, namespace, run)>``; the secret is
``<data-dir>/runner-token.key`` (``data-dir`` is the parent of the API's LOG_ROOT).

Reports are idempotent by sequence number: the highest applied ``seq`` per run is kept beside
the run's logs (``LogStore.report_seq``), so a batch the runner sends again after a lost answer
changes nothing. The order is logs, then status, then the sequence number: a controller that
dies in between may append a retried batch's log lines twice, but never loses one.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from nomad_pipeline.controller.api import BACKGROUND, LOG_ROOT, STORE
from nomad_pipeline.controller.api.errors import read_json_object
from nomad_pipeline.controller.api.logs import ensure_log_store, log_store_of
from nomad_pipeline.controller.logstore import LogStore
from nomad_pipeline.controller.runnertoken import load_or_create_secret, token_matches
from nomad_pipeline.errors import Conflict, Invalid, Unauthorized
from nomad_pipeline.resources.durations import duration_seconds
from nomad_pipeline.resources.kinds import TERMINAL_PHASES, FlowSpec, Run, StepStatus
from nomad_pipeline.runner.protocol import (
    RUNNER_API_PREFIX,
    OutputStream,
    PlanStep,
    ReportAck,
    ReportBatch,
    ReportEvent,
    RunnerPlan,
    StepOutcome,
)
from nomad_pipeline.store.interface import Store

RUNNER_SECRET = web.AppKey("runner_secret", bytes)
_REPORT_LOCKS = web.AppKey("runner_report_locks", weakref.WeakValueDictionary[str, asyncio.Lock])

# Conflicting status writes (the run reconciler writes the same Run) are retried this often.
_STATUS_WRITE_ATTEMPTS = 20


def secret_setup(secret: bytes) -> Callable[[web.Application], None]:
    """A route setup installing the runner token secret (before :func:`setup`, which otherwise
    reads it from the data directory)."""

    def install(app: web.Application) -> None:
        app[RUNNER_SECRET] = secret

    return install


def setup(app: web.Application) -> None:
    """Add the runner routes (``build_api(extra_routes=[runnerapi.setup])``).

    Reads (or creates) the runner token secret under the data directory now, at start-up.
    """
    if RUNNER_SECRET not in app:
        app[RUNNER_SECRET] = load_or_create_secret(app[LOG_ROOT].parent)
    app[_REPORT_LOCKS] = weakref.WeakValueDictionary()
    ensure_log_store(app)
    app.router.add_get(f"{RUNNER_API_PREFIX}/{{namespace}}/{{run}}", get_plan)
    app.router.add_post(f"{RUNNER_API_PREFIX}/{{namespace}}/{{run}}/report", post_report)


async def get_plan(request: web.Request) -> web.Response:
    """The run's steps and what conditions read, for the runner (token required)."""
    namespace, name = _authorized(request)
    run = await request.app[STORE].get(Run, namespace, name)
    log_store = log_store_of(request.app)
    plan = build_plan(run, last_seq=await log_store.report_seq(namespace, name))
    return web.json_response(text=plan.model_dump_json())


async def post_report(request: web.Request) -> web.Response:
    """Apply a batch of runner events (token required); answers the last applied seq."""
    namespace, name = _authorized(request)
    body = await read_json_object(request)
    try:
        batch = ReportBatch.model_validate(body)
    except ValidationError as error:
        raise Invalid(f"report body is invalid: {_first_error(error)}") from None
    app = request.app
    # The runner may give up waiting and resend while this batch is still being applied: one
    # batch per run at a time, and the work is shielded from the request's cancellation so it
    # never stops half-way.
    locks = app[_REPORT_LOCKS]
    lock = locks.setdefault(f"{namespace}/{name}", asyncio.Lock())
    work = asyncio.create_task(
        _apply_locked(
            lock,
            app[STORE],
            log_store=log_store_of(app),
            namespace=namespace,
            name=name,
            events=batch.events,
        ),
        name=f"runner report {namespace}/{name}",
    )
    app[BACKGROUND].add(work)
    work.add_done_callback(app[BACKGROUND].discard)
    ack = await asyncio.shield(work)
    return web.json_response(text=ack.model_dump_json())


def build_plan(run: Run, *, last_seq: int) -> RunnerPlan:
    """The plan of an inline run: rendered by the runner, decided by its stored status."""
    namespace, name = run.metadata.namespace, run.metadata.name
    flow_spec = run.spec.flow_spec
    if flow_spec.inline is None:
        raise Invalid(f"run {namespace}/{name} is not an inline flow: it has no runner plan")
    after = transitive_dependencies(flow_spec)
    steps = [
        PlanStep(
            name=step.name,
            run=step.run,
            env=step.env,
            after=after[step.name],
            condition=step.condition,
            timeout_seconds=None if step.timeout is None else duration_seconds(step.timeout),
            retries=step.retries,
        )
        for step in flow_spec.inline.steps
    ]
    # The flow's defaults for what the run leaves unset (as the run reconciler computes them).
    variables = {v.name: v.default for v in flow_spec.variables if v.default is not None}
    variables.update({k: v for k, v in run.spec.variables.items() if v is not None})
    completed = {
        status.name: StepOutcome.model_validate(
            {
                "phase": status.phase,
                "exit_code": status.exit_code,
                "attempts": status.attempts,
                "message": status.message,
            }
        )
        for status in run.status.steps
        if status.phase in TERMINAL_PHASES
    }
    return RunnerPlan(
        namespace=namespace,
        run=name,
        flow=run.spec.flow,
        steps=steps,
        variables=variables,
        run_context={"id": name, "name": name, "namespace": namespace, "flow": run.spec.flow},
        trigger_context=run.spec.trigger.model_dump(mode="json", exclude_none=True),
        completed=completed,
        last_seq=last_seq,
    )


def transitive_dependencies(flow_spec: FlowSpec) -> dict[str, list[str]]:
    """Each step's predecessors, transitively, in flow order (the flow is validated acyclic)."""
    direct = flow_spec.dependencies()
    closure: dict[str, set[str]] = {}

    def ancestors(step: str) -> set[str]:
        if step not in closure:
            found: set[str] = set()
            for needed in direct[step]:
                found |= {needed, *ancestors(needed)}
            closure[step] = found
        return closure[step]

    order = flow_spec.step_names
    return {step: [other for other in order if other in ancestors(step)] for step in order}


async def _apply_locked(
    lock: asyncio.Lock,
    store: Store,
    *,
    log_store: LogStore,
    namespace: str,
    name: str,
    events: list[ReportEvent],
) -> ReportAck:
    async with lock:
        return await apply_report(store, log_store, namespace, name, events)


async def apply_report(
    store: Store, log_store: LogStore, namespace: str, name: str, events: Iterable[ReportEvent]
) -> ReportAck:
    """Apply the events not applied yet; at most one status write (plus conflict retries)."""
    last_seq = await log_store.report_seq(namespace, name)
    fresh = sorted((e for e in events if e.seq > last_seq), key=lambda e: e.seq)
    run = await store.get(Run, namespace, name)
    if not fresh:
        return ReportAck(last_seq=last_seq, cancelled=_cancelled(run))
    known = set(run.spec.flow_spec.step_names)
    for event in fresh:
        if event.step not in known:
            raise Invalid(
                f"report event {event.seq} names step {event.step!r}, which run "
                f"{namespace}/{name} does not have",
                field="events.step",
            )
    await _append_logs(log_store, namespace, name, fresh)
    transitions = [event for event in fresh if event.type != "log"]
    if transitions:
        run = await _write_transitions(store, run, transitions)
        for event in transitions:
            if event.type in ("finished", "skipped"):
                await log_store.mark_step_finished(namespace, name, event.step)
    await log_store.set_report_seq(namespace, name, fresh[-1].seq)
    return ReportAck(last_seq=fresh[-1].seq, cancelled=_cancelled(run))


async def _append_logs(
    log_store: LogStore, namespace: str, name: str, events: list[ReportEvent]
) -> None:
    # Consecutive chunks of one step's stream become one append (one write, one wake-up).
    pending: list[str] = []
    target: tuple[str, OutputStream] | None = None

    async def flush() -> None:
        if target is not None and pending:
            step, stream = target
            data = "".join(pending).encode()
            await log_store.append(namespace, name, step, stream, data)
        pending.clear()

    for event in events:
        if event.type != "log" or event.stream is None or not event.data:
            continue
        if target != (event.step, event.stream):
            await flush()
            target = (event.step, event.stream)
        pending.append(event.data)
    await flush()


async def _write_transitions(store: Store, run: Run, transitions: list[ReportEvent]) -> Run:
    for _ in range(_STATUS_WRITE_ATTEMPTS):
        updated = run.model_copy(deep=True)
        apply_transitions(updated, transitions)
        try:
            return await store.update_status(updated)
        except Conflict:
            run = await store.get(Run, run.metadata.namespace, run.metadata.name)
    raise Conflict(
        f"run {run.metadata.namespace}/{run.metadata.name}: status kept changing while "
        f"applying a runner report ({_STATUS_WRITE_ATTEMPTS} attempts); the runner will retry"
    )


def apply_transitions(run: Run, transitions: Iterable[ReportEvent]) -> None:
    """Write step transitions into ``run.status.steps`` (missing steps are added in order).

    A step's terminal phase is final: the runner never reruns a step its plan lists as
    completed, so a report about such a step comes late (after the run reconciler failed the
    step because the runner died, say) and must not undo that verdict.
    """
    statuses = _steps_in_flow_order(run)
    for event in transitions:
        step = statuses[event.step]
        if step.phase in TERMINAL_PHASES:
            continue
        if event.type == "started":
            step.phase = "running"
            step.attempts = event.attempt or step.attempts + 1
            if step.start_time is None or step.attempts == 1:
                step.start_time = event.time
            step.end_time = None
            step.exit_code = None
            step.message = ""
        elif event.type == "finished":
            step.phase = event.phase or "failed"
            step.exit_code = event.exit_code
            step.end_time = event.time
            step.message = event.message or ""
        elif event.type == "skipped":
            step.phase = "skipped"
            step.end_time = event.time
            step.message = event.message or ""
    run.status.steps = list(statuses.values())


def _steps_in_flow_order(run: Run) -> dict[str, StepStatus]:
    existing = {step.name: step for step in run.status.steps}
    ordered = {
        name: existing.get(name) or StepStatus(name=name) for name in run.spec.flow_spec.step_names
    }
    # Entries the flow does not know (none expected) are kept rather than silently dropped.
    for name, step in existing.items():
        ordered.setdefault(name, step)
    return ordered


def _cancelled(run: Run) -> bool:
    return run.spec.cancel or run.status.phase == "cancelled"


def _authorized(request: web.Request) -> tuple[str, str]:
    namespace = request.match_info["namespace"]
    name = request.match_info["run"]
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the runner API needs 'Authorization: Bearer <run token>'")
    if not token_matches(request.app[RUNNER_SECRET], namespace, name, token.strip()):
        raise Unauthorized(f"the token is not valid for run {namespace}/{name}")
    return namespace, name


def _first_error(error: ValidationError) -> str:
    detail: Mapping[str, Any] = error.errors()[0]
    where = ".".join(str(part) for part in detail.get("loc", ()))
    return f"{where}: {detail.get('msg', 'invalid')}"
