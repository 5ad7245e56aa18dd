"""What Nomad says about our jobs, kept current by its event stream (an informer, in
controller-runtime's words).

The run reconciler reads jobs, allocations and evaluations from this cache instead of asking
Nomad on every reconcile, so a step costs Nomad one register (plus a dispatch) and what the
event stream delivers anyway. The cache is only trusted for jobs it has seen from the start of
an unbroken stream:

- a job is *tracked* when the reconciler is about to register it (or finds it after a restart);
- events (Job, Allocation, Evaluation topics) update tracked jobs and wake the owning run;
- a job the cache has not filled (new process, or the stream broke and could have dropped
  events: Nomad gives no gap signal) reads as unknown, and the reconciler fills it with plain
  GETs once, after which events keep it current.

Newer data always wins by ``ModifyIndex``, so a GET that raced an event never rolls it back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nomad_pipeline.errors import NomadPipelineError
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
_JOB_FIELDS = ("Status", "Stop", "Version")
_ALLOC_FIELDS = (
    "ClientStatus",
    "DesiredStatus",
    "NextAllocation",
    "FollowupEvalID",
    "JobVersion",
)


def _differs(
    previous: Mapping[str, Any] | None, current: Mapping[str, Any], fields: tuple[str, ...]
) -> bool:
    if previous is None:
        return True
    return any(previous.get(name) != current.get(name) for name in fields)


def owner_from_meta(job: Mapping[str, Any]) -> RunKey | None:
    meta = job.get("Meta") or {}
    run = meta.get(META_RUN)
    namespace = meta.get(META_NAMESPACE)
    if isinstance(run, str) and isinstance(namespace, str):
        return (namespace, run)
    return None


class JobCache:
    """Tracked Nomad jobs, their owners, and what the event stream said about them."""

    def __init__(self, wake: Callable[[RunKey], None]) -> None:
        self._wake = wake
        self._jobs: dict[JobKey, JobObservation] = {}
        self._owners: dict[JobKey, RunKey] = {}
        self.last_index = 0
        self.events_applied = 0

    def __len__(self) -> int:
        return len(self._jobs)

    def track(self, key: JobKey, owner: RunKey) -> None:
        """Start caching ``key`` for ``owner``; events from now on are applied to it."""
        self._owners[key] = owner
        self._jobs.setdefault(key, JobObservation())

    def forget(self, key: JobKey) -> None:
        self._owners.pop(key, None)
        self._jobs.pop(key, None)

    def forget_owner(self, owner: RunKey) -> None:
        for key in [k for k, o in self._owners.items() if o == owner]:
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
        for key, observed_owner in self._owners.items():
            if observed_owner == owner and key in self._jobs:
                self._jobs[key].filled = False

    def invalidate(self) -> list[RunKey]:
        """Distrust every entry (the stream broke); returns the owners to reconcile again."""
        for observation in self._jobs.values():
            observation.filled = False
        return sorted(set(self._owners.values()))

    def apply(self, batch: Mapping[str, Any]) -> None:
        """Apply one event-stream batch (``{"Index": N, "Events": [...]}``); wake owners."""
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
            return self._owners.get(key) if _differs(previous, job, _JOB_FIELDS) else None
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
            return self._owners.get(key) if _differs(previous, alloc, _ALLOC_FIELDS) else None
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


class NomadEventSource:
    """Feeds the cache from Nomad's event stream (all namespaces), resuming by index.

    After any break the cache is distrusted (Nomad's small event buffer may have dropped events
    without saying so) and every run with tracked jobs is reconciled again, which re-reads Nomad
    once and carries on from the stream.
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

    @property
    def name(self) -> str:
        return "nomad-events"

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                async for batch in self._nomad.event_stream(
                    EVENT_TOPICS, index=self._cache.last_index, namespace="*"
                ):
                    failures = 0
                    self._cache.apply(batch)
            except NomadPipelineError as error:
                failures += 1
                self.reconnects += 1
                delay = min(self._retry_cap, 0.05 * 2**failures)
                logger.warning(
                    "Nomad event stream broke, resuming",
                    extra={"error": str(error), "index": self._cache.last_index, "retry_in": delay},
                )
                for owner in self._cache.invalidate():
                    self._wake(owner)
                await asyncio.sleep(delay)
