"""What Nomad says about our jobs, kept current by its event stream (an informer, in
controller-runtime's words).

The run reconciler reads jobs, allocations and evaluations from this cache instead of asking
Nomad on every reconcile, so a step costs Nomad one register (plus a dispatch) and what the
event stream delivers anyway. The cache is only trusted for jobs it has seen from the start of
an unbroken stream:

- a job is *tracked* when the reconciler is about to register it (or finds it after a restart);
- events (Job, Allocation, Evaluation topics) update tracked jobs and wake the owning run,
  except an allocation that merely started running: that calls ``started`` (which begins
  copying its logs) and costs no reconcile, since nothing the run records changed;
- a job the cache has not filled (new process, or the stream broke and could have dropped
  events: Nomad gives no gap signal) reads as unknown, and the reconciler fills it with plain
  GETs once, after which events keep it current.

Newer data always wins by ``ModifyIndex``, so a GET that raced an event never rolls it back.

When the event stream is unavailable (it failed twice in a row: a cluster with the event broker
disabled, a token that may not read it, a proxy that cuts long streams), blocking queries take
over (``BlockingQueries``) until the stream delivers again: per tracked job, its allocations,
the job and its evaluations, each answer fed to the cache as the events it stands for, so runs
still advance within milliseconds of Nomad's change rather than at the 30 s resync.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nomad_pipeline.errors import NomadPipelineError, NotFound
from nomad_pipeline.nomad.client import NomadClient
from nomad_pipeline.reconcilers.specjobs import META_NAMESPACE, META_RUN

logger = logging.getLogger(__name__)

NomadObject = dict[str, Any]
JobKey = tuple[str, str]  # (nomad namespace, job ID)
RunKey = tuple[str, str]  # (namespace, run name)


@dataclass(slots=True)
class JobObservation:
    """One job as last seen: the job, its allocations by ID, and its latest evaluation."""

    job: NomadObject | None = None
    allocations: dict[str, NomadObject] = field(default_factory=dict)
    evaluation: NomadObject | None = None
    # False until a full read (GET) or the register response vouches for the entry.
    filled: bool = False
    # Set when Nomad said the job does not exist (purged, or never registered).
    missing: bool = False


def _newer(current: Mapping[str, Any] | None, candidate: Mapping[str, Any]) -> bool:
    if current is None:
        return True
    return int(candidate.get("ModifyIndex") or 0) >= int(current.get("ModifyIndex") or 0)


# The fields whose change a run reacts to; other updates refresh the cache without a wake-up.
_ALLOC_FIELDS = (
    "ClientStatus",
    "DesiredStatus",
    "NextAllocation",
    "FollowupEvalID",
    "JobVersion",
)
# How many forgotten (finished) jobs are remembered so that their late events wake nobody.
_RETIRED_JOBS = 4096


def _differs(
    previous: Mapping[str, Any] | None, current: Mapping[str, Any], fields: tuple[str, ...]
) -> bool:
    if previous is None:
        return True
    return any(previous.get(name) != current.get(name) for name in fields)


def _job_changed(previous: Mapping[str, Any] | None, job: Mapping[str, Any]) -> bool:
    """Whether the run acts on the change: a stop, a new version, or the job entering or
    leaving ``dead`` (a step ends when its job is dead; ``pending`` → ``running`` changes
    nothing the run records). Absent Stop/Version (the entry :meth:`JobCache.registered` made
    from our own jobspec) read as Nomad's defaults, so the job's first event is no change.

    A tracked job not yet filled (``previous`` None: its register or first read is in flight)
    compares against those defaults too: the reconcile that tracked it reads the cache after
    that call returns, so it sees what this event brought.
    """
    previous = previous or {}
    return (
        bool(previous.get("Stop")) != bool(job.get("Stop"))
        or (previous.get("Version") or 0) != (job.get("Version") or 0)
        or (previous.get("Status") == "dead") != (job.get("Status") == "dead")
    )


def _alloc_changed(
    previous: Mapping[str, Any] | None, alloc: Mapping[str, Any], job: Mapping[str, Any] | None
) -> bool:
    status = alloc.get("ClientStatus")
    if previous is None and status == "pending":
        # A new allocation waiting to be placed or started changes nothing the run acts on
        # (placement failures arrive as evaluations); it wakes the run once it runs or ends.
        return False
    if previous is not None and not _differs(previous, alloc, _ALLOC_FIELDS):
        return False
    # A step whose allocations completed ends when its job is dead (``outcomes.py``): until
    # the job says so, the job's own event is the wake-up, whichever of the two comes first.
    return status != "complete" or (job is not None and job.get("Status") == "dead")


def _only_started(previous: Mapping[str, Any] | None, alloc: Mapping[str, Any]) -> bool:
    """Whether the allocation just started running and nothing else the run acts on moved."""
    if alloc.get("ClientStatus") != "running":
        return False
    if previous is None:
        return True
    return previous.get("ClientStatus") == "pending" and not any(
        previous.get(name) != alloc.get(name) for name in _ALLOC_FIELDS if name != "ClientStatus"
    )


def owner_from_meta(job: Mapping[str, Any]) -> RunKey | None:
    meta = job.get("Meta") or {}
    run = meta.get(META_RUN)
    namespace = meta.get(META_NAMESPACE)
    if isinstance(run, str) and isinstance(namespace, str):
        return (namespace, run)
    return None


class JobCache:
    """Tracked Nomad jobs, their owners, and what the event stream said about them."""

    def __init__(
        self,
        wake: Callable[[RunKey], None],
        started: Callable[[RunKey, JobObservation], None],
    ) -> None:
        self._wake = wake
        self._started = started
        self._jobs: dict[JobKey, JobObservation] = {}
        self._owners: dict[JobKey, RunKey] = {}
        # The same relation by run, so a run's end costs its own jobs, not every tracked one.
        self._owned: dict[RunKey, set[JobKey]] = {}
        # Jobs forgotten because their step or run is over (bounded, oldest dropped): their
        # late events (the job turning dead after its allocation ended) wake nobody.
        self._retired: OrderedDict[JobKey, None] = OrderedDict()
        # Set whenever the tracked set changes (for the blocking-query fallback's watchers).
        self.tracking_changed = asyncio.Event()
        self.last_index = 0
        self.events_applied = 0

    def __len__(self) -> int:
        return len(self._jobs)

    def track(self, key: JobKey, owner: RunKey) -> None:
        """Start caching ``key`` for ``owner``; events from now on are applied to it."""
        previous = self._owners.get(key)
        if previous is not None and previous != owner:
            self._disown(key, previous)
        if key not in self._owners:
            self.tracking_changed.set()
        self._owners[key] = owner
        self._owned.setdefault(owner, set()).add(key)
        self._retired.pop(key, None)
        self._jobs.setdefault(key, JobObservation())

    def tracked(self) -> set[JobKey]:
        return set(self._owners)

    def forget(self, key: JobKey) -> None:
        """Stop caching ``key``, whose step or run is over."""
        owner = self._owners.pop(key, None)
        if owner is not None:
            self._disown(key, owner)
            self.tracking_changed.set()
        self._jobs.pop(key, None)
        self._retired[key] = None
        if len(self._retired) > _RETIRED_JOBS:
            self._retired.popitem(last=False)

    def _disown(self, key: JobKey, owner: RunKey) -> None:
        keys = self._owned.get(owner)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._owned[owner]

    def forget_owner(self, owner: RunKey) -> None:
        for key in list(self._owned.get(owner, ())):
            self.forget(key)

    def get(self, key: JobKey) -> JobObservation | None:
        """The observation if the cache can vouch for it, else None (read Nomad, then fill)."""
        observation = self._jobs.get(key)
        if observation is None or not observation.filled:
            return None
        return observation

    def fill(
        self,
        key: JobKey,
        job: NomadObject | None,
        allocations: list[NomadObject],
        evaluation: NomadObject | None,
    ) -> JobObservation:
        """Merge a full read of the job into the cache (``job`` None: Nomad has no such job)."""
        observation = self._jobs.setdefault(key, JobObservation())
        if job is None:
            observation.job = None
            observation.missing = True
        elif _newer(observation.job, job):
            observation.job = job
            observation.missing = False
        for alloc in allocations:
            alloc_id = alloc.get("ID")
            if isinstance(alloc_id, str) and _newer(observation.allocations.get(alloc_id), alloc):
                observation.allocations[alloc_id] = alloc
        if evaluation is not None and _newer(observation.evaluation, evaluation):
            observation.evaluation = evaluation
        observation.filled = True
        return observation

    def registered(self, key: JobKey, job: NomadObject, evaluation_id: str | None) -> None:
        """Record a job we just registered: pending, no allocations, its evaluation's ID.

        Events deliver what follows; the cache can vouch for the entry because it was tracked
        (so subscribed) before the register call.
        """
        observation = self._jobs.setdefault(key, JobObservation())
        if observation.job is None:
            observation.job = {**job, "Status": "pending", "Version": 0, "ModifyIndex": 0}
        observation.missing = False
        if evaluation_id and observation.evaluation is None:
            observation.evaluation = {"ID": evaluation_id, "ModifyIndex": 0}
        observation.filled = True

    def invalidate_owner(self, owner: RunKey) -> None:
        """Distrust the entries of one run (its next read goes to Nomad)."""
        for key in self._owned.get(owner, ()):
            observation = self._jobs.get(key)
            if observation is not None:
                observation.filled = False

    def invalidate(self) -> list[RunKey]:
        """Distrust every entry (the stream broke); returns the owners to reconcile again."""
        for observation in self._jobs.values():
            observation.filled = False
        return sorted(set(self._owners.values()))

    def apply(self, batch: Mapping[str, Any]) -> None:
        """Apply one event-stream batch (``{"Index": N, "Events": [...]}``); wake owners. A
        batch without ``Index`` (made from a read) leaves the stream's resume index alone."""
        index = batch.get("Index")
        if isinstance(index, int):
            self.last_index = max(self.last_index, index)
        woken: set[RunKey] = set()
        for event in batch.get("Events") or []:
            owner = self._apply_event(event)
            if owner is not None:
                woken.add(owner)
        for owner in sorted(woken):
            self._wake(owner)

    def _apply_event(self, event: Mapping[str, Any]) -> RunKey | None:
        topic = event.get("Topic")
        payload = event.get("Payload") or {}
        namespace = event.get("Namespace") or "default"
        if topic == "Job":
            job = payload.get("Job") or {}
            key = (job.get("Namespace") or namespace, job.get("ID") or event.get("Key") or "")
            observation = self._jobs.get(key)
            if observation is None:
                if key in self._retired:
                    return None
                # Not tracked (a restarted controller has not read this run yet): wake the run
                # its Meta names, which reads Nomad itself.
                return owner_from_meta(job)
            self.events_applied += 1
            if payload.get("Deleted"):
                observation.job = None
                observation.missing = True
                return self._owners.get(key)
            if not _newer(observation.job, job):
                return None
            previous = observation.job
            observation.job = job
            observation.missing = False
            return self._owners.get(key) if _job_changed(previous, job) else None
        if topic == "Allocation":
            alloc = payload.get("Allocation") or {}
            key = (alloc.get("Namespace") or namespace, alloc.get("JobID") or "")
            observation = self._jobs.get(key)
            alloc_id = alloc.get("ID")
            if observation is None or not isinstance(alloc_id, str):
                return None
            self.events_applied += 1
            previous = observation.allocations.get(alloc_id)
            if not _newer(previous, alloc):
                return None
            observation.allocations[alloc_id] = alloc
            # Task events inside a pending allocation change nothing the run acts on.
            if not _alloc_changed(previous, alloc, observation.job):
                return None
            owner = self._owners.get(key)
            if owner is not None and _only_started(previous, alloc):
                self._started(owner, observation)
                return None
            return owner
        if topic == "Evaluation":
            evaluation = payload.get("Evaluation") or {}
            key = (evaluation.get("Namespace") or namespace, evaluation.get("JobID") or "")
            observation = self._jobs.get(key)
            if observation is None:
                return None
            # Keep the evaluation that explains placement: the latest one with FailedTGAllocs,
            # or else simply the latest one.
            current = observation.evaluation
            if (
                current is None
                or not current.get("FailedTGAllocs")
                or evaluation.get("FailedTGAllocs")
            ) and _newer(current, evaluation):
                observation.evaluation = evaluation
            self.events_applied += 1
            return self._owners.get(key) if evaluation.get("FailedTGAllocs") else None
        return None


EVENT_TOPICS = ("Job", "Allocation", "Evaluation")


# After this many consecutive failures of the event stream, blocking queries take over.
FALLBACK_AFTER_FAILURES = 2
# How long each blocking query of the fallback waits for a change.
FALLBACK_WAIT = "60s"


class NomadEventSource:
    """Feeds the cache from Nomad's event stream (all namespaces), resuming by index.

    After any break the cache is distrusted (Nomad's small event buffer may have dropped events
    without saying so) and every run with tracked jobs is reconciled again, which re-reads Nomad
    once and carries on from the stream. A stream that keeps failing hands over to blocking
    queries until it delivers again.
    """

    def __init__(
        self,
        nomad: NomadClient,
        cache: JobCache,
        wake: Callable[[RunKey], None],
        *,
        retry_cap: float = 5.0,
    ) -> None:
        self._nomad = nomad
        self._cache = cache
        self._wake = wake
        self._retry_cap = retry_cap
        self.reconnects = 0
        self.fallback: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return "nomad-events"

    async def run(self) -> None:
        failures = 0
        try:
            while True:
                try:
                    async for batch in self._nomad.event_stream(
                        EVENT_TOPICS, index=self._cache.last_index, namespace="*"
                    ):
                        failures = 0
                        if self.fallback is not None:
                            await self._stop_fallback()
                        self._cache.apply(batch)
                except NomadPipelineError as error:
                    failures += 1
                    self.reconnects += 1
                    delay = min(self._retry_cap, 0.05 * 2**failures)
                    logger.warning(
                        "Nomad event stream broke, resuming",
                        extra={
                            "error": str(error),
                            "index": self._cache.last_index,
                            "retry_in": delay,
                        },
                    )
                    if self.fallback is None:
                        # Events may have been lost in the break; while the fallback runs it
                        # keeps the cache current instead.
                        for owner in self._cache.invalidate():
                            self._wake(owner)
                    if failures >= FALLBACK_AFTER_FAILURES and self.fallback is None:
                        logger.warning(
                            "Nomad event stream unavailable; following jobs by blocking queries"
                        )
                        self.fallback = asyncio.create_task(
                            BlockingQueries(self._nomad, self._cache).run(),
                            name="nomad-blocking-queries",
                        )
                    await asyncio.sleep(delay)
        finally:
            await self._stop_fallback()

    async def _stop_fallback(self) -> None:
        fallback, self.fallback = self.fallback, None
        if fallback is None:
            return
        logger.info("Nomad event stream is back; blocking queries stop")
        fallback.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await fallback


class BlockingQueries:
    """Follows every tracked job with blocking queries while the event stream is unavailable."""

    def __init__(self, nomad: NomadClient, cache: JobCache, *, retry_cap: float = 5.0) -> None:
        self._nomad = nomad
        self._cache = cache
        self._retry_cap = retry_cap

    async def run(self) -> None:
        watchers: dict[JobKey, asyncio.Task[None]] = {}
        try:
            while True:
                self._cache.tracking_changed.clear()
                tracked = self._cache.tracked()
                for key in tracked - watchers.keys():
                    watchers[key] = asyncio.create_task(
                        self._watch(key), name=f"nomad-blocking-{key[1]}"
                    )
                for key in watchers.keys() - tracked:
                    watchers.pop(key).cancel()
                await self._cache.tracking_changed.wait()
        finally:
            for task in watchers.values():
                task.cancel()
            for task in watchers.values():
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _watch(self, key: JobKey) -> None:
        async with asyncio.TaskGroup() as readers:
            readers.create_task(self._follow(key, self._allocations))
            readers.create_task(self._follow(key, self._job))
            readers.create_task(self._follow(key, self._evaluations))

    async def _follow(
        self,
        key: JobKey,
        read: Callable[[JobKey, int], Awaitable[tuple[list[NomadObject], int | None]]],
    ) -> None:
        """Repeat one blocking read, feeding each answer to the cache, until the read says
        there is nothing more to wait for (index None); errors back off."""
        index: int | None = 0
        failures = 0
        while index is not None:
            try:
                events, index = await read(key, index)
            except NomadPipelineError as error:
                failures += 1
                delay = min(self._retry_cap, 0.05 * 2**failures)
                logger.warning(
                    "blocking query failed, retrying",
                    extra={"job": key[1], "error": str(error), "retry_in": delay},
                )
                await asyncio.sleep(delay)
                continue
            failures = 0
            if events:
                self._cache.apply({"Events": events})

    async def _allocations(self, key: JobKey, index: int) -> tuple[list[NomadObject], int | None]:
        namespace, job_id = key
        allocations, new_index = await self._nomad.job_allocations(
            job_id, namespace=namespace, index=index, wait=FALLBACK_WAIT
        )
        return [
            {"Topic": "Allocation", "Namespace": namespace, "Payload": {"Allocation": alloc}}
            for alloc in allocations
        ], new_index

    async def _job(self, key: JobKey, index: int) -> tuple[list[NomadObject], int | None]:
        namespace, job_id = key
        try:
            job, new_index = await self._nomad.get_job(
                job_id, namespace=namespace, index=index, wait=FALLBACK_WAIT
            )
        except NotFound:
            # Purged: nothing more to wait for (registering it again is a reconcile's doing,
            # and that reconcile reads the job itself).
            deleted = {"Job": {"ID": job_id, "Namespace": namespace}, "Deleted": True}
            return [{"Topic": "Job", "Namespace": namespace, "Payload": deleted}], None
        return [{"Topic": "Job", "Namespace": namespace, "Payload": {"Job": job}}], new_index

    async def _evaluations(self, key: JobKey, index: int) -> tuple[list[NomadObject], int | None]:
        namespace, job_id = key
        evaluations, new_index = await self._nomad.job_evaluations(
            job_id, namespace=namespace, index=index, wait=FALLBACK_WAIT
        )
        return [
            {"Topic": "Evaluation", "Namespace": namespace, "Payload": {"Evaluation": evaluation}}
            for evaluation in sorted(evaluations, key=lambda e: int(e.get("ModifyIndex") or 0))
        ], new_index
