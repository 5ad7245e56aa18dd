"""The Run reconciler: runs a flow's steps on Nomad, level-triggered and crash-safe.

The run's stored status plus what Nomad reports about its jobs is the whole truth, so any
controller process can pick up any run. Each reconcile:

1. reads the Run (a deleted run stops being tracked; a finished one only applies retention);
2. cancels (``spec.cancel``) or times out (flow ``timeout``): every Nomad job of the run is
   stopped (``DELETE /v1/job``, idempotent), whatever the phase, also after a restart;
3. admits a pending run under the flow's ``concurrency`` (queue / skip / cancel-oldest);
4. observes each active step's job (from the event-fed cache, see ``nomadwatch.py``) and folds
   the outcome into the step (``outcomes.py``), failed attempts retried with backoff;
5. plans what starts or is skipped next (``planning.py``) and registers those steps' jobs at
   once, so a step's end is followed by the next step's register with no store round trip in
   between (a refused register fails its step, and the plan runs again);
6. writes the status **once** (with the resource-version precondition).

Exactly-once registration: a step's job ID is deterministic (run, step, attempt; see
``specjobs.py``) and registered with ``EnforceIndex`` 0, which Nomad refuses for an existing job.
A controller killed after a register and before its status write plans the same step again on
restart, computes the same ID, and adopts the job Nomad answers "already exists" for. Each retry
attempt has its own job ID (``-a2``, ``-a3``...), so a new attempt is a new job, never a
re-register. A job registered but not yet recorded can still be stopped: cancel and timeouts
also stop the jobs the plan may have registered for pending and retrying steps.

Cancel is ``spec.cancel: true`` on the Run (``PUT /v1/runs/{id}/cancel`` sets it): being in the
spec, it survives restarts and is seen by whichever controller reconciles the run next.

Deletion: every Run is created with the finalizer ``nomad-pipeline.io/stop-jobs``, so deleting
it (a user, or retention) only sets ``metadata.deletion_timestamp``. The next reconcile then
stops every Nomad job of the run exactly as cancel does (recorded and unrecorded ones; nothing
for a finished run), stops its log copiers, deletes its logs, forgets it, and removes the
finalizer with a conditional metadata update, upon which the store deletes the run. Every move
is idempotent, so a controller killed midway does it all again on restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from nomad_pipeline.controller.admission import STOP_JOBS_FINALIZER
from nomad_pipeline.controller.api.runs import request_cancel
from nomad_pipeline.controller.logstore import LogStore
from nomad_pipeline.controller.metrics import RunMetrics
from nomad_pipeline.controller.runnertoken import runner_token
from nomad_pipeline.controller.runtime import Request, Result
from nomad_pipeline.errors import (
    Invalid,
    NomadError,
    NomadPipelineError,
    NotFound,
)
from nomad_pipeline.nomad.client import NomadClient
from nomad_pipeline.reconcilers.inlinejob import (
    RUNNER_META_STEP,
    host_runner_command,
    render_runner_job,
    runner_job_id,
)
from nomad_pipeline.reconcilers.nomadwatch import JobCache, JobKey, JobObservation, RunKey
from nomad_pipeline.reconcilers.outcomes import StepOutcome, summarise_allocations
from nomad_pipeline.reconcilers.planning import (
    PlanStep,
    StepState,
    plan,
    run_phase,
)
from nomad_pipeline.reconcilers.specjobs import (
    META_STEP,
    StepIdentity,
    dispatch_token,
    hcl_var_file,
    is_parameterized,
    render_spec_job,
    run_env,
    spec_job_id,
    unwrap_job,
)
from nomad_pipeline.reconcilers.speclogs import LogCopier, LogSource
from nomad_pipeline.resources.durations import duration_seconds
from nomad_pipeline.resources.expressions import evaluation_context, lookup
from nomad_pipeline.resources.kinds import (
    TERMINAL_PHASES,
    Run,
    RunStatus,
    SpecificationStep,
    StepStatus,
)
from nomad_pipeline.resources.meta import Resource
from nomad_pipeline.resources.templates import render, template_names
from nomad_pipeline.store.interface import Store

logger = logging.getLogger(__name__)

RUN_KIND = "Run"
_PARSE_CACHE_SIZE = 256
_ALREADY_EXISTS = "already exists"


class ApiNotServingError(NomadPipelineError):
    """Transient: the runner job needs the API's address, which is not known yet."""

    http_status = 503
    reason = "Unavailable"


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class RunSettings:
    """What the run reconciler needs besides the store and Nomad."""

    # The controller's API address as a runner inside an allocation reaches it (None until the
    # API serves: the run is retried with backoff).
    controller_address: Callable[[], str | None]
    # The secret per-run runner tokens derive from (``controller/runnertoken.py``).
    runner_secret: bytes
    runner_command: tuple[str, ...] = field(default_factory=lambda: tuple(host_runner_command()))
    # Delay before a step's second attempt; doubled for each further one, capped.
    retry_backoff: float = 1.0
    retry_backoff_max: float = 60.0
    # How long a runner that exited cleanly may leave steps unreported before the run fails.
    runner_report_grace: float = 10.0
    # Active runs are reconciled at least this often, re-reading Nomad (a safety net for an
    # event stream that dropped something; never the hot path).
    resync_interval: float = 30.0


@dataclass(slots=True)
class RunStats:
    """Counters the benchmark and metrics read."""

    reconciles: int = 0
    status_writes: int = 0
    nomad_requests: int = 0
    registrations: int = 0
    # Wall time spent awaiting the store's status writes and Nomad's job registers (loop
    # clock), so a benchmark can tell the controller's own latency from its dependencies'.
    status_write_seconds: float = 0.0
    register_seconds: float = 0.0


@dataclass(slots=True)
class _Registration:
    """A job recorded in the status that must exist on Nomad once the status is written."""

    step: str
    key: JobKey
    job: dict[str, Any]
    identity: StepIdentity


@dataclass(slots=True)
class _Pass:
    """One reconcile's working state: the status being built and what to do after writing."""

    run: Run
    status: RunStatus
    now: datetime
    registrations: list[_Registration] = field(default_factory=list)
    requeue: list[float] = field(default_factory=list)
    finished_jobs: list[JobKey] = field(default_factory=list)

    @property
    def key(self) -> RunKey:
        return (self.run.metadata.namespace, self.run.metadata.name)

    def step(self, name: str) -> StepStatus:
        found = self.status.step(name)
        if found is None:
            raise KeyError(name)
        return found

    def requeue_in(self, seconds: float) -> None:
        self.requeue.append(max(0.0, seconds))


class RunReconciler:
    def __init__(
        self,
        store: Store,
        nomad: NomadClient,
        *,
        cache: JobCache,
        logs: LogStore,
        copier: LogCopier,
        settings: RunSettings,
        enqueue: Callable[[Request], None],
        now: Callable[[], datetime] = _utcnow,
        metrics: RunMetrics | None = None,
    ) -> None:
        self._store = store
        self._nomad = nomad
        self._cache = cache
        self._logs = logs
        self._copier = copier
        self._settings = settings
        self._enqueue = enqueue
        self._now = now
        self._parsed: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        # Dispatched child of each parameterized step job (parent -> child), and their runs.
        self._children: dict[JobKey, JobKey] = {}
        self._children_of: dict[RunKey, set[JobKey]] = {}
        self._flow_locks: dict[tuple[str, str], asyncio.Lock] = {}
        # When a runner's allocation was first seen ended with steps unreported (grace period).
        self._runner_ended: dict[RunKey, float] = {}
        # The resource version of each run's last status write by this reconciler (kept until
        # the run is deleted): store watch events up to it need no reconcile (``requests_for``).
        self._written: dict[RunKey, int] = {}
        # When each run last re-read Nomad in full (loop time), for the resync safety net.
        self._last_full_read: dict[RunKey, float] = {}
        self.stats = RunStats()
        # Finished runs and steps are counted here (a standalone reconciler counts unexposed).
        self._metrics = metrics if metrics is not None else RunMetrics()

    # ---- entry point -------------------------------------------------------------------------

    def requests_for(self, obj: Resource) -> list[Request]:
        """The store watch's mapping: a Run event reconciles that run, unless this reconciler
        has already acted on it.

        A status write succeeds only on the version its reconcile read, so that reconcile saw
        every change before its own write: an event at or below the run's last written version
        is the write itself or older (the watch may deliver it after a later write, or after
        the run finished), and needs no reconcile.
        """
        key = (obj.metadata.namespace, obj.metadata.name)
        version = obj.metadata.resource_version
        written = self._written.get(key)
        if version is not None and written is not None and int(version) <= written:
            return []
        return [Request(RUN_KIND, *key)]

    async def reconcile(self, request: Request) -> Result:
        self.stats.reconciles += 1
        key = (request.namespace, request.name)
        try:
            run = await self._store.get(Run, request.namespace, request.name)
        except NotFound:
            self._forget(key)
            return Result()
        if run.metadata.deleting:
            return await self._finalize(run)
        if run.status.phase in TERMINAL_PHASES:
            return await self._reconcile_finished(run)
        work = _Pass(run, self._initial_status(run), self._now())
        loop_now = asyncio.get_running_loop().time()
        last_read = self._last_full_read.setdefault(key, loop_now)
        # The resync requeue fires about ``resync_interval`` after the last read; a timer firing
        # a hair early must still count.
        if loop_now - last_read >= self._settings.resync_interval * 0.9:
            self._cache.invalidate_owner(key)
            self._last_full_read[key] = loop_now

        if run.spec.cancel:
            await self._stop_run(work, "cancelled", "run cancelled")
            return await self._commit(work)
        if work.status.phase == "pending":
            admitted = await self._admit(work)
            if not admitted:
                return await self._commit(work)
            work.status.phase = "running"
            work.status.start_time = work.now
            work.status.message = ""
            if run.spec.from_failed and run.spec.rerun_of:
                await self._reuse_succeeded_steps(work, run.spec.rerun_of)
        if await self._flow_timed_out(work):
            return await self._commit(work)
        if run.spec.flow_spec.specification is not None:
            await self._reconcile_specification(work)
        else:
            await self._reconcile_inline(work)
        return await self._commit(work)

    # ---- status bookkeeping ------------------------------------------------------------------

    def _initial_status(self, run: Run) -> RunStatus:
        """The stored status with one entry per flow step, in flow order."""
        # Shallow copies suffice (every field of a step is immutable) and cost a fraction of a
        # deep copy, which dominated the reconciler's CPU time.
        status = run.status.model_copy(
            update={
                "steps": [step.model_copy() for step in run.status.steps],
                "conditions": list(run.status.conditions),
            }
        )
        existing = {step.name: step for step in status.steps}
        status.steps = [
            existing.get(name) or StepStatus(name=name) for name in run.spec.flow_spec.step_names
        ]
        status.observed_generation = run.metadata.generation
        return status

    async def _commit(self, work: _Pass) -> Result:
        """Register what is left to register, write the status if it changed, decide the
        requeue."""
        await self._register_queued(work)
        run = work.run
        if work.status != run.status:
            if work.status.phase in TERMINAL_PHASES and work.status.end_time is None:
                work.status.end_time = work.now
            updated = run.model_copy(update={"status": work.status})
            self.stats.status_writes += 1
            loop = asyncio.get_running_loop()
            started = loop.time()
            ended_steps = _newly_ended_steps(run.status, work.status)
            was_terminal = run.status.phase in TERMINAL_PHASES
            run = await self._store.update_status(updated)
            self.stats.status_write_seconds += loop.time() - started
            work.run = run
            self._written[work.key] = int(run.metadata.resource_version or 0)
            self._steps_ended(run, ended_steps)
            if not was_terminal and run.status.phase in TERMINAL_PHASES:
                self._count_finished(run)
        for job_key in work.finished_jobs:
            self._cache.forget(job_key)
        if run.status.phase in TERMINAL_PHASES:
            await self._on_finished(run)
            return await self._reconcile_finished(run)
        if run.status.phase == "running":
            work.requeue_in(self._settings.resync_interval)
        return Result(requeue_after=min(work.requeue) if work.requeue else None)

    def _count_finished(self, run: Run) -> None:
        """Count a run whose terminal status was just written, and its steps' final phases.

        The write is conditional on the version read, so exactly one write makes a run
        terminal: counting there counts each run once, across reconciles and restarts. Steps are
        counted with their run because an inline run's steps are ended by its runner's reports
        (written by the API, not here)."""
        namespace, flow = run.metadata.namespace, run.spec.flow
        status = run.status
        seconds = None
        if status.start_time is not None and status.end_time is not None:
            seconds = max(0.0, (status.end_time - status.start_time).total_seconds())
        self._metrics.run_finished(namespace, flow, status.phase, seconds)
        for step in status.steps:
            if step.phase in TERMINAL_PHASES:
                self._metrics.step_finished(namespace, flow, step.phase)

    def _steps_ended(self, run: Run, steps: list[str]) -> None:
        """Specification steps whose terminal phase is now stored: their copied logs end (an
        inline run's step logs come from its runner, not from the copier)."""
        if run.spec.flow_spec.specification is None:
            return
        for step in steps:
            self._copier.step_ended(run.metadata.namespace, run.metadata.name, step)

    def _forget(self, key: RunKey) -> None:
        self._written.pop(key, None)
        self._cache.forget_owner(key)
        self._runner_ended.pop(key, None)
        self._last_full_read.pop(key, None)
        self._copier.stop_run(*key)
        for parent in self._children_of.pop(key, set()):
            self._children.pop(parent, None)

    async def _reuse_succeeded_steps(self, work: _Pass, original_name: str) -> None:
        """A ``--from-failed`` rerun keeps the original's succeeded steps (specification flows;
        an inline flow's runner runs its steps in one allocation, so it runs them all)."""
        if work.run.spec.flow_spec.specification is None:
            return
        try:
            original = await self._store.get(Run, work.run.metadata.namespace, original_name)
        except NotFound:
            work.status.message = f"run {original_name} is gone; running every step"
            return
        for status in work.status.steps:
            previous = original.status.step(status.name)
            if status.phase == "pending" and previous is not None and previous.phase == "success":
                reused = previous.model_copy()
                reused.message = f"reused from run {original_name}"
                work.status.steps[work.status.steps.index(status)] = reused

    # ---- cancel and timeouts -----------------------------------------------------------------

    async def _stop_run(self, work: _Pass, phase: str, message: str) -> None:
        """Stop every Nomad job of the run and end it with ``phase`` (cancelled or failed)."""
        await self._stop_jobs(work)
        for step in work.status.steps:
            if step.phase in TERMINAL_PHASES:
                continue
            step.end_time = work.now
            if step.nomad_job_id is not None and step.start_time is not None:
                step.phase = "cancelled" if phase == "cancelled" else "failed"
                step.message = message
            else:
                step.phase = "skipped"
                step.message = message
        work.status.phase = "cancelled" if phase == "cancelled" else "failed"
        work.status.message = message
        if work.status.start_time is None:
            work.status.start_time = work.now
        self._copier.stop_run(*work.key)

    async def _stop_jobs(self, work: _Pass) -> None:
        stopped: set[JobKey] = set()
        for key in [*self._recorded_jobs(work), *await self._unrecorded_jobs(work)]:
            if key in stopped:
                continue
            stopped.add(key)
            await self._stop_job(key)
            work.finished_jobs.append(key)

    def _recorded_jobs(self, work: _Pass) -> list[JobKey]:
        return [
            (step.nomad_namespace or "default", step.nomad_job_id)
            for step in work.status.steps
            if step.nomad_job_id is not None and step.phase not in TERMINAL_PHASES
        ]

    async def _unrecorded_jobs(self, work: _Pass) -> list[JobKey]:
        """Jobs a controller may have registered without living to record them: the next
        attempt of every pending or retrying specification step, an inline run's runner job.
        Stopping a job that does not exist is a no-op on Nomad."""
        run = work.run
        inline = run.spec.flow_spec.inline
        if inline is not None:
            if any(step.nomad_job_id is not None for step in work.status.steps):
                return []
            return [(inline.runner.namespace, runner_job_id(inline, run.spec.flow, work.key[1]))]
        spec = run.spec.flow_spec.specification
        assert spec is not None
        steps_by_name = {step.name: step for step in spec.steps}
        candidates: list[JobKey] = []
        for status in work.status.steps:
            if status.phase == "pending":
                attempt = 1
            elif status.phase == "running" and status.end_time is not None:
                attempt = status.attempts + 1
            else:
                continue
            identity = self._identity(run, status.name, attempt)
            try:
                job = await self._render_spec_job(run, steps_by_name[status.name], identity)
            except (Invalid, NomadError):
                # A job that cannot be rendered was never registered.
                continue
            candidates.append((job.get("Namespace") or "default", job["ID"]))
        return candidates

    @staticmethod
    def _identity(run: Run, step: str, attempt: int) -> StepIdentity:
        return StepIdentity(
            namespace=run.metadata.namespace,
            run=run.metadata.name,
            flow=run.spec.flow,
            step=step,
            attempt=attempt,
        )

    async def _stop_job(self, key: JobKey) -> None:
        namespace, job_id = key
        self.stats.nomad_requests += 1
        await self._nomad.deregister_job(job_id, namespace=namespace)
        # Dispatched children of a parameterized step are jobs of their own. They are found by
        # ID prefix, so a restarted controller that never saw the dispatch stops them too.
        self._children.pop(key, None)
        self.stats.nomad_requests += 1
        listed, _ = await self._nomad.list_jobs(f"{job_id}/dispatch-", namespace=namespace)
        children = [(namespace, str(stub["ID"])) for stub in listed if not stub.get("Stop")]
        for child_key in children:
            self.stats.nomad_requests += 1
            await self._nomad.deregister_job(child_key[1], namespace=child_key[0])
            self._cache.forget(child_key)

    async def _flow_timed_out(self, work: _Pass) -> bool:
        timeout = work.run.spec.flow_spec.timeout
        if timeout is None or work.status.start_time is None:
            return False
        seconds = duration_seconds(timeout)
        elapsed = (work.now - work.status.start_time).total_seconds()
        if elapsed < seconds:
            work.requeue_in(seconds - elapsed)
            return False
        await self._stop_run(work, "failed", f"the flow timed out after {timeout}")
        return True

    # ---- concurrency -------------------------------------------------------------------------

    async def _admit(self, work: _Pass) -> bool:
        """Whether a pending run may start under its flow's ``concurrency`` policy.

        Decided under a per-flow lock, and an admitted run's ``running`` phase is written
        before the lock is released, so two workers never admit past the maximum.
        """
        run = work.run
        concurrency = run.spec.flow_spec.concurrency
        if concurrency is None:
            return True
        namespace, flow = run.metadata.namespace, run.spec.flow
        lock = self._flow_locks.setdefault((namespace, flow), asyncio.Lock())
        async with lock:
            siblings = [
                other
                for other in (await self._store.list(Run, namespace)).items
                if other.spec.flow == flow and other.metadata.name != run.metadata.name
            ]
            running = sorted(
                (o for o in siblings if o.status.phase == "running"),
                key=lambda o: o.metadata.name,
            )
            queued_before = [
                o
                for o in siblings
                if o.status.phase == "pending"
                and not o.spec.cancel
                and o.metadata.name < run.metadata.name
            ]
            free = concurrency.max - len(running)
            if free > len(queued_before):
                work.status.phase = "running"
                work.status.start_time = work.now
                work.status.message = ""
                self.stats.status_writes += 1
                work.run = await self._store.update_status(
                    run.model_copy(update={"status": work.status})
                )
                work.status = self._initial_status(work.run)
                return True
            if concurrency.policy == "skip":
                work.status.phase = "skipped"
                work.status.message = (
                    f"skipped: {len(running)} run(s) of flow {flow!r} already running "
                    f"(concurrency max {concurrency.max})"
                )
                for step in work.status.steps:
                    step.phase = "skipped"
                    step.message = "run skipped by the flow's concurrency policy"
                return False
            if concurrency.policy == "cancel-oldest":
                excess = len(running) + len(queued_before) + 1 - concurrency.max
                for oldest in running[: max(0, excess)]:
                    await self._request_cancel(oldest)
                work.status.message = (
                    f"waiting for {max(0, excess)} older run(s) of flow {flow!r} to be cancelled"
                )
                return False
            work.status.message = (
                f"queued: {len(running)} run(s) of flow {flow!r} running, "
                f"{len(queued_before)} queued before this one (concurrency max {concurrency.max})"
            )
            return False

    async def _request_cancel(self, run: Run) -> None:
        if not run.spec.cancel:
            self.stats.status_writes += 1
            await request_cancel(self._store, run.metadata.namespace, run.metadata.name)

    async def _on_finished(self, run: Run) -> None:
        """Wake what a finished run unblocks: queued runs and retention of older ones."""
        key = (run.metadata.namespace, run.metadata.name)
        self._cache.forget_owner(key)
        self._runner_ended.pop(key, None)
        self._last_full_read.pop(key, None)
        spec = run.spec.flow_spec
        if spec.concurrency is None and spec.run_retention is None:
            return
        siblings = (await self._store.list(Run, run.metadata.namespace)).items
        for other in siblings:
            if other.spec.flow != run.spec.flow or other.metadata.name == run.metadata.name:
                continue
            if other.status.phase == "pending" or (
                spec.run_retention is not None and other.status.phase in TERMINAL_PHASES
            ):
                self._enqueue(Request(RUN_KIND, other.metadata.namespace, other.metadata.name))

    # ---- retention ---------------------------------------------------------------------------

    async def _reconcile_finished(self, run: Run) -> Result:
        """Apply ``run_retention``: delete this run (and its logs) once it is past it."""
        retention = run.spec.flow_spec.run_retention
        if retention is None:
            return Result()
        namespace, name = run.metadata.namespace, run.metadata.name
        expired = False
        requeue: float | None = None
        if retention.max_age is not None:
            ended = run.status.end_time or run.metadata.creation_timestamp or self._now()
            age = (self._now() - ended).total_seconds()
            max_age = duration_seconds(retention.max_age)
            expired = age >= max_age
            requeue = None if expired else max_age - age
        if not expired and retention.keep_last is not None:
            finished = sorted(
                (
                    other.metadata.name
                    for other in (await self._store.list(Run, namespace)).items
                    if other.spec.flow == run.spec.flow and other.status.phase in TERMINAL_PHASES
                ),
                reverse=True,
            )
            expired = name not in finished[: retention.keep_last]
        if not expired:
            return Result(requeue_after=requeue)
        try:
            marked: Run | None = await self._store.delete(
                Run, namespace, name, resource_version=run.metadata.resource_version
            )
        except NotFound:
            marked = None
        logger.info("run deleted by retention", extra={"namespace": namespace, "run": name})
        if marked is not None and marked.metadata.deleting:
            return await self._finalize(marked)
        await self._logs.delete_run(namespace, name)
        self._forget((namespace, name))
        return Result()

    # ---- deletion ----------------------------------------------------------------------------

    async def _finalize(self, run: Run) -> Result:
        """The run is being deleted: stop its Nomad jobs as cancel does, stop copying and delete
        its logs, forget it, then remove our finalizer (the store then deletes the run).
        Idempotent: a pass that fails or a controller that dies midway is simply repeated."""
        key = (run.metadata.namespace, run.metadata.name)
        if run.status.phase not in TERMINAL_PHASES:
            work = _Pass(run, self._initial_status(run), self._now())
            await self._stop_jobs(work)
            for job_key in work.finished_jobs:
                self._cache.forget(job_key)
        await self._copier.discard_run(*key)
        await self._logs.delete_run(*key)
        self._forget(key)
        if STOP_JOBS_FINALIZER in run.metadata.finalizers:
            remaining = [name for name in run.metadata.finalizers if name != STOP_JOBS_FINALIZER]
            metadata = run.metadata.model_copy(update={"finalizers": remaining})
            # Conditional on the version read: a run changed meanwhile is finalized again.
            await self._store.update(run.model_copy(update={"metadata": metadata}))
        logger.info(
            "run finalized for deletion",
            extra={"namespace": key[0], "run": key[1], "phase": run.status.phase},
        )
        return Result()

    # ---- specification flows -----------------------------------------------------------------

    async def _reconcile_specification(self, work: _Pass) -> None:
        spec = work.run.spec.flow_spec.specification
        assert spec is not None
        steps_by_name = {step.name: step for step in spec.steps}
        for status in work.status.steps:
            if status.phase == "running" and status.nomad_job_id is not None:
                await self._observe_spec_step(work, steps_by_name[status.name], status)
        plan_steps = [_plan_step(step) for step in spec.steps]
        while True:
            # Registers before planning: a refused register fails its step, which the plan
            # then follows (a failure handler starts in the same pass).
            await self._register_queued(work)
            to_start = self._plan(work, plan_steps)
            starting = [s for s in work.status.steps if s.phase == "pending" and s.name in to_start]
            if not starting:
                break
            for status in starting:
                # Each start leaves ``pending`` (running, or failed to render): the loop ends.
                await self._start_spec_attempt(work, steps_by_name[status.name], status, 1)
        self._finish_if_done(work, plan_steps)

    def _plan(self, work: _Pass, steps: list[PlanStep]) -> set[str]:
        """Apply the plan's skips and failures to the status; the steps to start."""
        states = {
            status.name: StepState(status.phase, status.exit_code) for status in work.status.steps
        }
        decided = plan(steps, states, self._context(work.run))
        for name, reason in decided.skip.items():
            status = work.step(name)
            status.phase = "skipped"
            status.message = reason
            status.end_time = work.now
        for name, reason in decided.fail.items():
            status = work.step(name)
            status.phase = "failed"
            status.message = reason
            status.end_time = work.now
        return set(decided.start)

    def _finish_if_done(self, work: _Pass, steps: list[PlanStep]) -> None:
        states = {
            status.name: StepState(status.phase, status.exit_code) for status in work.status.steps
        }
        phase = run_phase(steps, states)
        if phase in TERMINAL_PHASES:
            work.status.phase = phase
            work.status.end_time = work.now
            failed = [s.name for s in work.status.steps if s.phase == "failed"]
            work.status.message = f"failed steps: {', '.join(failed)}" if failed else ""

    def _context(self, run: Run) -> dict[str, Any]:
        namespace, name = run.metadata.namespace, run.metadata.name
        return evaluation_context(
            variables=run_variables(run),
            run={"id": name, "name": name, "namespace": namespace, "flow": run.spec.flow},
            trigger=run.spec.trigger.model_dump(mode="json", exclude_none=True),
        )

    async def _start_spec_attempt(
        self, work: _Pass, step: SpecificationStep, status: StepStatus, attempt: int
    ) -> None:
        """Render the attempt's job, record it in the status and queue its registration."""
        run = work.run
        identity = self._identity(run, step.name, attempt)
        try:
            job = await self._render_spec_job(run, step, identity)
        except (Invalid, NomadError) as error:
            status.phase = "failed"
            status.attempts = attempt
            status.start_time = status.start_time or work.now
            status.end_time = work.now
            status.message = f"jobspec: {error.message}"
            return
        key: JobKey = (job.get("Namespace") or "default", job["ID"])
        status.phase = "running"
        status.attempts = attempt
        status.nomad_job_id = key[1]
        status.nomad_namespace = key[0]
        status.alloc_id = None
        status.exit_code = None
        status.start_time = work.now
        status.end_time = None
        status.message = "" if attempt == 1 else f"attempt {attempt}"
        work.registrations.append(_Registration(step.name, key, job, identity))
        if step.timeout is not None:
            # Nothing else may wake the run before then: a step that runs changes nothing.
            work.requeue_in(duration_seconds(step.timeout))

    async def _render_spec_job(
        self, run: Run, step: SpecificationStep, identity: StepIdentity
    ) -> dict[str, Any]:
        context = self._context(run)
        name_format = (
            render(step.job.name_format, context) if step.job.name_format is not None else None
        )
        job_id = spec_job_id(run.metadata.name, step.name, identity.attempt, name_format)
        source = step.job.text()
        if isinstance(source, dict):
            base = unwrap_job(source)
        else:
            values = {
                name: _template_value(template, context)
                for name, template in step.job.variables.items()
            }
            base = await self._parse(source, hcl_var_file(values))
        return render_spec_job(
            base, identity, job_id=job_id, env=run_env(identity, run_variables(run))
        )

    async def _parse(self, hcl: str, var_file: str) -> dict[str, Any]:
        """Nomad's ``jobs/parse``, memoised: the same jobspec and values parse the same."""
        cache_key = (hcl, var_file)
        cached = self._parsed.get(cache_key)
        if cached is not None:
            self._parsed.move_to_end(cache_key)
            return cached
        self.stats.nomad_requests += 1
        parsed = await self._nomad.parse_job(hcl, var_file)
        self._parsed[cache_key] = parsed
        if len(self._parsed) > _PARSE_CACHE_SIZE:
            self._parsed.popitem(last=False)
        return parsed

    async def _register_queued(self, work: _Pass) -> None:
        """Register the queued jobs, concurrently (a DAG's parallel steps start together)."""
        queued, work.registrations = work.registrations, []
        if len(queued) == 1:
            await self._register(work, queued[0])
        elif queued:
            await asyncio.gather(*(self._register(work, item) for item in queued))

    async def _register(self, work: _Pass, registration: _Registration) -> None:
        """Make the recorded job exist on Nomad, once (see the module docstring)."""
        key = registration.key
        self._cache.track(key, work.key)
        self.stats.nomad_requests += 1
        self.stats.registrations += 1
        try:
            response = await self._register_call(registration.job, key[0])
        except Invalid as error:
            self._registration_refused(work, registration, error.message)
            return
        except NomadError as error:
            if _ALREADY_EXISTS not in error.message:
                self._registration_refused(work, registration, error.message)
                return
            # Registered before a crash, or by a pass whose status write lost a conflict: the
            # cache fills from Nomad on the next read.
            self.stats.registrations -= 1
        else:
            self._cache.registered(key, registration.job, response.get("EvalID"))
        if is_parameterized(registration.job):
            await self._dispatch(key, registration.identity, work.key)

    async def _register_call(self, job: dict[str, Any], namespace: str) -> dict[str, Any]:
        """Register ``job`` unless it exists (``EnforceIndex`` 0), timing the call."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            return await self._nomad.register_job(
                job, namespace=namespace, enforce_index=True, job_modify_index=0
            )
        finally:
            self.stats.register_seconds += loop.time() - started

    def _registration_refused(self, work: _Pass, registration: _Registration, message: str) -> None:
        """Nomad refused the job (validation, unknown namespace): the attempt fails."""
        text = f"Nomad refused the job: {message}"
        for step in work.status.steps:
            if step.nomad_job_id != registration.key[1] or step.phase in TERMINAL_PHASES:
                continue
            if registration.step not in (step.name, RUNNER_META_STEP):
                continue
            step.phase = "failed"
            step.end_time = work.now
            step.message = text
        if registration.step == RUNNER_META_STEP:
            # Without its runner an inline run cannot do anything.
            work.status.phase = "failed"
            work.status.end_time = work.now
            work.status.message = text
        work.finished_jobs.append(registration.key)

    async def _dispatch(self, parent: JobKey, identity: StepIdentity, owner: RunKey) -> JobKey:
        """Dispatch the step's parameterized job (idempotent per run, step and attempt)."""
        known = self._children.get(parent)
        if known is not None:
            return known
        self.stats.nomad_requests += 1
        response = await self._nomad.dispatch_job(
            parent[1], namespace=parent[0], idempotency_token=dispatch_token(identity)
        )
        child: JobKey = (parent[0], str(response["DispatchedJobID"]))
        self._children[parent] = child
        self._children_of.setdefault(owner, set()).add(parent)
        self._cache.track(child, owner)
        return child

    async def _observation(self, key: JobKey) -> JobObservation:
        """The job as the cache knows it, or read from Nomad (and cached) when it cannot say."""
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        namespace, job_id = key
        try:
            self.stats.nomad_requests += 1
            job, _ = await self._nomad.get_job(job_id, namespace=namespace)
        except NotFound:
            return self._cache.fill(key, None, [], None)
        self.stats.nomad_requests += 1
        allocations, _ = await self._nomad.job_allocations(job_id, namespace=namespace)
        evaluation = None
        if not allocations and job.get("Status") == "pending":
            self.stats.nomad_requests += 1
            evaluations, _ = await self._nomad.job_evaluations(job_id, namespace=namespace)
            failed = [e for e in evaluations if e.get("FailedTGAllocs")]
            evaluation = max(failed, key=lambda e: e.get("ModifyIndex", 0), default=None)
        return self._cache.fill(key, job, allocations, evaluation)

    async def _observe_spec_step(
        self, work: _Pass, step: SpecificationStep, status: StepStatus
    ) -> None:
        assert status.nomad_job_id is not None
        key: JobKey = (status.nomad_namespace or "default", status.nomad_job_id)
        self._cache.track(key, work.key)
        identity = self._identity(work.run, step.name, max(1, status.attempts))
        if status.end_time is not None:
            # A failed attempt waiting for its retry.
            due = status.end_time + timedelta(seconds=self._backoff(status.attempts))
            if work.now >= due:
                work.finished_jobs.append(key)
                await self._start_spec_attempt(work, step, status, status.attempts + 1)
            else:
                work.requeue_in((due - work.now).total_seconds())
            return
        observation = await self._observation(key)
        if observation.missing or observation.job is None:
            # Recorded but not on Nomad: purged, or its register failed in a way that left
            # the step recorded (a lost connection): register it now, exactly as recorded.
            try:
                job = await self._render_spec_job(work.run, step, identity)
            except (Invalid, NomadError) as error:
                self._end_attempt(work, step, status, StepOutcome("failed", error.message), key)
                return
            work.registrations.append(_Registration(step.name, key, job, identity))
            return
        job_observation = observation
        if is_parameterized(observation.job):
            child = await self._dispatch(key, identity, work.key)
            job_observation = await self._observation(child)
            if job_observation.job is None:
                return
        outcome = summarise_allocations(
            list(job_observation.allocations.values()),
            job_observation.job or {},
            job_observation.evaluation,
        )
        self._copy_logs(work.key, step.name, job_observation)
        if outcome.terminal:
            self._end_attempt(work, step, status, outcome, key)
            return
        if step.timeout is not None and status.start_time is not None:
            limit = duration_seconds(step.timeout)
            elapsed = (work.now - status.start_time).total_seconds()
            if elapsed >= limit:
                await self._stop_job(key)
                message = f"timed out after {step.timeout}"
                self._end_attempt(
                    work,
                    step,
                    status,
                    StepOutcome("failed", message, alloc_id=outcome.alloc_id),
                    key,
                )
                return
            work.requeue_in(limit - elapsed)

    def _end_attempt(
        self,
        work: _Pass,
        step: SpecificationStep,
        status: StepStatus,
        outcome: StepOutcome,
        key: JobKey,
    ) -> None:
        status.exit_code = outcome.exit_code
        status.alloc_id = outcome.alloc_id or status.alloc_id
        status.end_time = work.now
        if outcome.phase == "failed" and status.attempts <= step.retries:
            delay = self._backoff(status.attempts)
            status.message = (
                f"attempt {status.attempts} failed: {outcome.message}; retrying in {delay:g}s"
            )
            work.requeue_in(delay)
            return
        status.phase = outcome.phase
        status.message = outcome.message
        work.finished_jobs.append(key)
        child = self._children.pop(key, None)
        if child is not None:
            work.finished_jobs.append(child)

    def _backoff(self, attempts: int) -> float:
        exponent = max(0, attempts - 1)
        return float(
            min(self._settings.retry_backoff_max, self._settings.retry_backoff * 2**exponent)
        )

    def allocation_started(self, owner: RunKey, observation: JobObservation) -> None:
        """An allocation of the run's job started (the job cache's hook): its logs are followed
        from now on, without a reconcile. A runner job's logs come from the runner instead."""
        step = ((observation.job or {}).get("Meta") or {}).get(META_STEP)
        if isinstance(step, str) and step != RUNNER_META_STEP:
            self._copy_logs(owner, step, observation)

    def _copy_logs(self, owner: RunKey, step: str, observation: JobObservation) -> None:
        """Follow the step's allocations' logs; tell the copier when they ended."""
        job = observation.job or {}
        task = _main_task(job)
        if task is None:
            return
        namespace, run = owner
        version = job.get("Version")
        for alloc in observation.allocations.values():
            alloc_id = alloc.get("ID")
            if not isinstance(alloc_id, str) or (
                version is not None
                and alloc.get("JobVersion") not in (version, None)
                and not job.get("Stop")
            ):
                continue
            client_status = alloc.get("ClientStatus")
            if client_status == "pending":
                continue
            ended = client_status in ("complete", "failed", "lost")
            if not self._copier.copying(namespace, run, step, alloc_id):
                self._copier.start(
                    LogSource(
                        namespace=namespace,
                        run=run,
                        step=step,
                        nomad_namespace=job.get("Namespace") or "default",
                        alloc_id=alloc_id,
                        task=task,
                    ),
                    ended=ended,
                )
            elif ended:
                self._copier.allocation_done(namespace, run, step, alloc_id)

    # ---- inline flows ------------------------------------------------------------------------

    async def _reconcile_inline(self, work: _Pass) -> None:
        run = work.run
        inline = run.spec.flow_spec.inline
        assert inline is not None
        namespace, name = work.key
        steps = [_plan_step(step) for step in inline.steps]
        job_id = runner_job_id(inline, run.spec.flow, name)
        key: JobKey = (inline.runner.namespace, job_id)
        recorded = any(status.nomad_job_id == job_id for status in work.status.steps)
        if not recorded:
            job = self._render_runner_job(run, job_id)
            for status in work.status.steps:
                status.nomad_job_id = job_id
                status.nomad_namespace = key[0]
            identity = StepIdentity(namespace, name, run.spec.flow, RUNNER_META_STEP)
            work.registrations.append(_Registration(RUNNER_META_STEP, key, job, identity))
            return
        self._cache.track(key, work.key)
        states = {
            status.name: StepState(status.phase, status.exit_code) for status in work.status.steps
        }
        if run_phase(steps, states) in TERMINAL_PHASES:
            self._finish_if_done(work, steps)
            work.finished_jobs.append(key)
            return
        observation = await self._observation(key)
        if observation.missing or observation.job is None:
            job = self._render_runner_job(run, job_id)
            identity = StepIdentity(namespace, name, run.spec.flow, RUNNER_META_STEP)
            work.registrations.append(_Registration(RUNNER_META_STEP, key, job, identity))
            return
        outcome = summarise_allocations(
            list(observation.allocations.values()), observation.job, observation.evaluation
        )
        if outcome.alloc_id is not None:
            for status in work.status.steps:
                if status.alloc_id is None and status.phase != "pending":
                    status.alloc_id = outcome.alloc_id
        if not outcome.terminal:
            self._runner_ended.pop(work.key, None)
            return
        if outcome.phase == "success":
            # The runner exited cleanly; its last reports may still be on their way.
            loop_now = asyncio.get_running_loop().time()
            first_seen = self._runner_ended.setdefault(work.key, loop_now)
            remaining = self._settings.runner_report_grace - (loop_now - first_seen)
            if remaining > 0:
                work.requeue_in(remaining)
                return
            message = "the runner exited without reporting every step"
        else:
            message = f"the runner failed: {outcome.message}"
        for status in work.status.steps:
            if status.phase not in TERMINAL_PHASES:
                status.phase = "failed" if status.phase == "running" else "skipped"
                status.message = message
                status.end_time = work.now
        work.status.phase = "failed"
        work.status.message = message
        work.finished_jobs.append(key)

    def _render_runner_job(self, run: Run, job_id: str) -> dict[str, Any]:
        inline = run.spec.flow_spec.inline
        assert inline is not None
        namespace, name = run.metadata.namespace, run.metadata.name
        identity = StepIdentity(namespace, name, run.spec.flow, RUNNER_META_STEP)
        address = self._settings.controller_address()
        if address is None:
            raise ApiNotServingError("the controller's API is not serving yet; the runner needs it")
        return render_runner_job(
            inline,
            job_id=job_id,
            namespace=namespace,
            run=name,
            controller_address=address,
            token=runner_token(self._settings.runner_secret, namespace, name),
            context=self._context(run),
            env=run_env(identity, run_variables(run)),
            host_command=self._settings.runner_command,
        )


def run_variables(run: Run) -> dict[str, Any]:
    """The run's variables with the flow's defaults for those it does not set."""
    defaults = {v.name: v.default for v in run.spec.flow_spec.variables if v.default is not None}
    given = {name: value for name, value in run.spec.variables.items() if value is not None}
    return {**defaults, **given}


def _newly_ended_steps(before: RunStatus, after: RunStatus) -> list[str]:
    """The steps terminal in ``after`` that were not in ``before``."""
    already = {step.name for step in before.steps if step.phase in TERMINAL_PHASES}
    return [
        step.name
        for step in after.steps
        if step.phase in TERMINAL_PHASES and step.name not in already
    ]


def _plan_step(step: Any) -> PlanStep:
    return PlanStep(name=step.name, condition=step.condition, needs=tuple(step.needs))


def _main_task(job: Mapping[str, Any]) -> str | None:
    """The task whose logs are the step's: the first task of the first group."""
    for group in job.get("TaskGroups") or []:
        for task in group.get("Tasks") or []:
            name = task.get("Name")
            if isinstance(name, str):
                return name
    return None


def _template_value(template: str, context: Mapping[str, Any]) -> Any:
    """A jobspec variable's value: a template that is exactly one ``${name}`` keeps the value's
    type (a list stays a list for an HCL list variable); anything else renders as text."""
    names = template_names(template)
    if len(names) == 1 and template.strip() == "${" + names[0] + "}":
        value = lookup(context, names[0])
        if value is not None:
            return value
    return render(template, context)
