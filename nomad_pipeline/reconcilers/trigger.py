"""The Trigger reconciler: cron schedules and git polling start runs; webhooks are routes.

Level-triggered: the trigger's stored status (last and pending firing, last revision) plus the
clock and the remote are the whole truth. A firing is recorded in the trigger's status first,
with the resource-version precondition, so only one controller wins it; the run is then created
under a name derived from the trigger and the firing (:func:`ulid_for`), so a crash between the
two, or a second controller, re-creates the same name and gets AlreadyExists instead of a second
run. After downtime at most one missed firing is made up (within ``starting_deadline``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from nomad_pipeline.controller.api.runs import create_run, request_cancel
from nomad_pipeline.controller.manager import watch_store
from nomad_pipeline.controller.runtime import Controller, Request, Result, Runnable
from nomad_pipeline.errors import AlreadyExists, Invalid, NotFound
from nomad_pipeline.reconcilers.cronschedule import CronSchedule
from nomad_pipeline.reconcilers.gitsource import Commit, GitError, GitMirrors
from nomad_pipeline.resources.durations import parse_duration
from nomad_pipeline.resources.kinds import (
    TERMINAL_PHASES,
    TRIGGER_LABEL,
    Flow,
    Run,
    RunTrigger,
    Trigger,
)
from nomad_pipeline.resources.meta import ready_condition
from nomad_pipeline.resources.ulid import ulid_for
from nomad_pipeline.store.interface import Store

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1024)
def _schedule(schedules: tuple[str, ...], timezone: str) -> CronSchedule:
    """Parsed schedules, shared: parsing validates with croniter, which is slow per reconcile."""
    return CronSchedule.parse(schedules, timezone)


def trigger_run_labels(trigger: Trigger) -> dict[str, str]:
    return {TRIGGER_LABEL: trigger.metadata.name}


def git_trigger_variables(url: str, branch: str, commit: Commit, before: str) -> dict[str, str]:
    """The seed's ``trigger.*`` variables for a commit seen by polling (as a push would)."""
    name = url.rstrip("/").removesuffix(".git").rsplit("/", 1)[-1]
    owner = url.rstrip("/").removesuffix(".git").rsplit("/", 2)[-2] if "/" in url else ""
    return {
        "trigger.git_ref": f"refs/heads/{branch}",
        "trigger.git_sha": commit.sha,
        "trigger.git_before": before,
        "trigger.git_repository": f"{owner}/{name}",
        "trigger.git_pusher": commit.author,
        "trigger.git_repo_name": name,
        "trigger.git_repo_owner": owner,
        "trigger.git_repo_url": url,
        "trigger.git_commit_message": commit.message,
        "trigger.git_commit_author": commit.author,
        "trigger.git_commit_url": "",
    }


class TriggerReconciler:
    def __init__(
        self,
        store: Store,
        *,
        mirrors: GitMirrors,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._mirrors = mirrors
        self._clock = clock

    async def reconcile(self, request: Request) -> Result:
        try:
            trigger = await self._store.get(Trigger, request.namespace, request.name)
        except NotFound:
            return Result()
        now = self._clock()
        generation = trigger.metadata.generation
        if trigger.spec.suspend:
            await self._write_status(
                trigger,
                next_fire_time=None,
                conditions=trigger.status.with_condition(
                    ready_condition("False", "Suspended", "suspended", now, generation)
                ),
            )
            return Result()
        source = trigger.spec.source
        if source.cron is not None:
            return await self._reconcile_cron(trigger, now)
        if source.git is not None:
            return await self._reconcile_git(trigger, now)
        webhook = source.webhook
        listening = "waiting for webhook deliveries"
        if webhook is not None and webhook.secret is None:
            listening += " (no secret: deliveries are not authenticated)"
        await self._write_status(
            trigger,
            conditions=trigger.status.with_condition(
                ready_condition("True", "Listening", listening, now, generation)
            ),
        )
        return Result()

    # -- cron ------------------------------------------------------------------------------

    async def _reconcile_cron(self, trigger: Trigger, now: datetime) -> Result:
        cron = trigger.spec.source.cron
        assert cron is not None
        status = trigger.status
        if (
            status.pending_fire_time is None
            and status.next_fire_time is not None
            and now < status.next_fire_time
            and status.observed_generation == trigger.metadata.generation
        ):
            # Woken before the next firing (by our own status write, most often): the last
            # reconcile of this spec computed that nothing is due until then.
            return Result(requeue_after=(status.next_fire_time - now).total_seconds())
        schedule = _schedule(tuple(cron.schedules), cron.timezone)
        if trigger.status.pending_fire_time is not None:
            # Recorded but maybe not created (a crash in between): finish that firing first.
            finished = await self._fire(trigger, trigger.status.pending_fire_time)
            trigger = await self._write_status(trigger, **finished)
        status = trigger.status
        since = status.last_fire_time or trigger.metadata.creation_timestamp or now
        due = schedule.latest_due(since, now)
        deadline = parse_duration(cron.starting_deadline) if cron.starting_deadline else None
        # Status changes written with the next fire time, in one write.
        changes: dict[str, Any] = {}
        if due is not None and deadline is not None and now - due > deadline:
            logger.info(
                "missed firing is past its starting deadline",
                extra={"trigger": trigger.metadata.name, "scheduled": due.isoformat()},
            )
            changes = {
                "last_fire_time": due,
                "message": f"missed the firing at {due.isoformat()}: past the starting deadline",
            }
            due = None
        if due is not None:
            # Record first (CAS: only one controller wins), then create.
            trigger = await self._write_status(trigger, pending_fire_time=due, last_fire_time=due)
            changes = await self._fire(trigger, due)
        next_fire = schedule.next_after(now)
        await self._write_status(
            trigger,
            **changes,
            next_fire_time=next_fire,
            conditions=trigger.status.with_condition(
                ready_condition(
                    "True",
                    "Scheduled",
                    f"next firing at {next_fire.isoformat()}",
                    now,
                    trigger.metadata.generation,
                ),
            ),
        )
        return Result(requeue_after=max((next_fire - self._clock()).total_seconds(), 0.0))

    async def _fire(self, trigger: Trigger, scheduled: datetime) -> dict[str, Any]:
        """Start the run of a recorded firing, honouring the concurrency policy; returns the
        status changes that clear it (for the caller to write)."""
        cron = trigger.spec.source.cron
        assert cron is not None
        # Only forbid and replace look at active runs; listing them costs a scan of the runs.
        active = [] if cron.concurrency_policy == "allow" else await self._active_runs(trigger)
        if cron.concurrency_policy == "forbid" and active:
            message = (
                f"skipped the firing at {scheduled.isoformat()}: run {active[0].metadata.name} "
                "is still active (concurrency_policy forbid)"
            )
            return {"pending_fire_time": None, "message": message}
        if cron.concurrency_policy == "replace":
            for run in active:
                await request_cancel(self._store, run.metadata.namespace, run.metadata.name)
        run_trigger = RunTrigger(type="cron", name=trigger.metadata.name, schedule_time=scheduled)
        seed = f"{trigger.metadata.uid}/cron/{scheduled.isoformat()}"
        run_name, message = await self._start_run(trigger, run_trigger, seed, scheduled, {})
        return {"pending_fire_time": None, "last_run": run_name, "message": message}

    async def _active_runs(self, trigger: Trigger) -> list[Run]:
        runs = await self._store.list(
            Run, trigger.metadata.namespace, selector=trigger_run_labels(trigger)
        )
        return [run for run in runs.items if run.status.phase not in TERMINAL_PHASES]

    async def _start_run(
        self,
        trigger: Trigger,
        run_trigger: RunTrigger,
        seed: str,
        moment: datetime,
        extra_variables: Mapping[str, Any],
    ) -> tuple[str | None, str]:
        """Create the run for one firing; (run name or None, a status message)."""
        name = ulid_for(moment, seed)
        namespace = trigger.metadata.namespace
        try:
            flow = await self._store.get(Flow, namespace, trigger.spec.flow)
        except NotFound:
            return None, f"flow {namespace}/{trigger.spec.flow} does not exist; no run started"
        try:
            await create_run(
                self._store,
                flow,
                {**trigger.spec.variables, **extra_variables},
                trigger=run_trigger,
                name=name,
                labels=trigger_run_labels(trigger),
            )
        except AlreadyExists:
            pass  # this firing's run was created before a crash or by another controller
        except Invalid as exc:
            return None, f"no run started: {exc.message}"
        logger.info("trigger started a run", extra={"trigger": trigger.metadata.name, "run": name})
        return name, f"started run {name}"

    # -- git polling -----------------------------------------------------------------------

    async def _reconcile_git(self, trigger: Trigger, now: datetime) -> Result:
        git = trigger.spec.source.git
        assert git is not None
        interval = parse_duration(git.interval).total_seconds()
        try:
            commit = await self._mirrors.resolve(git.url, branch=git.branch)
        except GitError as exc:
            await self._write_status(
                trigger,
                message=exc.message,
                conditions=trigger.status.with_condition(
                    ready_condition(
                        "False", "FetchFailed", exc.message, now, trigger.metadata.generation
                    ),
                ),
            )
            return Result(requeue_after=interval)
        previous = trigger.status.last_revision
        if previous is None:
            # The first revision seen is the baseline, not a new commit.
            trigger = await self._write_status(
                trigger, last_revision=commit.sha, message=f"watching {git.branch} at {commit.sha}"
            )
        elif commit.sha != previous:
            trigger = await self._write_status(trigger, last_revision=commit.sha)
            run_trigger = RunTrigger(type="git", name=trigger.metadata.name, revision=commit.sha)
            seed = f"{trigger.metadata.uid}/git/{commit.sha}"
            variables = git_trigger_variables(git.url, git.branch, commit, previous)
            run_name, message = await self._start_run(trigger, run_trigger, seed, now, variables)
            trigger = await self._write_status(trigger, last_run=run_name, message=message)
        await self._write_status(
            trigger,
            conditions=trigger.status.with_condition(
                ready_condition(
                    "True", "Polling", f"at {commit.sha}", now, trigger.metadata.generation
                ),
            ),
        )
        return Result(requeue_after=interval)

    # -- status ----------------------------------------------------------------------------

    async def _write_status(self, trigger: Trigger, **changes: Any) -> Trigger:
        """Write status fields with the resource-version precondition; skip no-op writes.

        ``last_run=None`` keeps the previous run (a firing that started nothing names none).
        """
        if changes.get("last_run", "") is None:
            changes.pop("last_run")
        updates = {"observed_generation": trigger.metadata.generation, **changes}
        status = trigger.status.model_copy(update=updates)
        if status == trigger.status:
            return trigger
        written = await self._store.update_status(trigger.model_copy(update={"status": status}))
        return written


def trigger_controller(
    store: Store, *, mirrors: GitMirrors, clock: Callable[[], datetime], workers: int = 4
) -> Sequence[Runnable]:
    """The trigger controller and its store watch, ready for the manager."""
    controller = Controller(
        "triggers", TriggerReconciler(store, mirrors=mirrors, clock=clock), workers=workers
    )
    return [watch_store(store, Trigger, controller.enqueue), controller]
