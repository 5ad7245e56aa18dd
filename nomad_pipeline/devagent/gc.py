"""Garbage collection as Nomad does it: the server's core jobs and the client's alloc GC.

Server GC (every ``job_gc_interval``, or forced by ``PUT /v1/system/gc``) follows Nomad's
``CoreScheduler``: a job is purged with its evaluations and allocations once it is GC-able
(``jobIsGCable``), older than ``job_gc_threshold`` and every one of its evaluations and
allocations is terminal and older than the threshold; an evaluation alone is collected after
``eval_gc_threshold`` (``batch_eval_gc_threshold`` for batch jobs) with its terminal
allocations. Nomad turns thresholds into Raft indexes through its time table; the dev agent
compares the records' own ``ModifyTime`` (and a job's ``SubmitTime``) with the clock instead. A
forced collection uses no threshold at all, as Nomad's ``force-gc``.

Client GC (every ``client_gc_interval``) removes the directories of the oldest terminal
allocations while the client tracks more than ``gc_max_allocs`` allocations. The allocation
records stay until server GC; directories of allocations that server GC removed go at once, as
Nomad's client destroys allocations the server no longer knows.

Rows are chosen and deleted without an ``await`` in between (the engine's single-writer rule),
one commit per batch; directories are removed in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import shutil
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from aiohttp import web

from nomad_pipeline.devagent import scheduler
from nomad_pipeline.devagent.engine import Engine
from nomad_pipeline.devagent.state import NomadHTTPError, Obj, now_ns, row_key

log = logging.getLogger(__name__)

NS_PER_SECOND = 1_000_000_000
# Nomad's defaults (server: job_gc_interval, job_gc_threshold, eval_gc_threshold,
# batch_eval_gc_threshold; client: gc_interval, gc_max_allocs).
DEFAULT_JOB_GC_INTERVAL = 5 * 60.0
DEFAULT_JOB_GC_THRESHOLD = 4 * 3600.0
DEFAULT_EVAL_GC_THRESHOLD = 3600.0
DEFAULT_BATCH_EVAL_GC_THRESHOLD = 24 * 3600.0
DEFAULT_CLIENT_GC_INTERVAL = 60.0
DEFAULT_GC_MAX_ALLOCS = 50
# Rows per commit: a batch this size keeps the event loop busy for milliseconds only
# (Nomad splits its reaps the same way, by ``maxIdsPerReap``).
JOBS_PER_COMMIT = 64
ROWS_PER_COMMIT = 1024

TERMINAL_EVAL_STATUSES = ("complete", "failed", "canceled")

Clock = Callable[[], int]
"""Wall-clock time in nanoseconds since the epoch, the unit of the records' times."""


@dataclass(frozen=True, slots=True)
class GCConfig:
    """Intervals and thresholds in seconds; ``gc_max_allocs`` counts allocations."""

    job_gc_interval: float = DEFAULT_JOB_GC_INTERVAL
    job_gc_threshold: float = DEFAULT_JOB_GC_THRESHOLD
    eval_gc_threshold: float = DEFAULT_EVAL_GC_THRESHOLD
    batch_eval_gc_threshold: float = DEFAULT_BATCH_EVAL_GC_THRESHOLD
    client_gc_interval: float = DEFAULT_CLIENT_GC_INTERVAL
    gc_max_allocs: int = DEFAULT_GC_MAX_ALLOCS

    def __post_init__(self) -> None:
        for name in ("job_gc_interval", "client_gc_interval"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: {getattr(self, name)} must be a positive duration")
        for name in ("job_gc_threshold", "eval_gc_threshold", "batch_eval_gc_threshold"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: {getattr(self, name)} must not be negative")
        if self.gc_max_allocs < 0:
            raise ValueError(f"gc_max_allocs: {self.gc_max_allocs} must not be negative")


@dataclass(slots=True)
class Reap:
    """Rows one server GC commit deletes."""

    jobs: list[str] = field(default_factory=list)
    evals: list[str] = field(default_factory=list)
    allocs: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.jobs or self.evals or self.allocs)


def _cutoff(now: int, threshold: float, *, force: bool) -> float:
    """Records modified at or before this time are old enough (everything when forced)."""
    return math.inf if force else now - threshold * NS_PER_SECOND


def job_gcable(job: Obj) -> bool:
    """Nomad's ``jobIsGCable``."""
    if job.get("Periodic") or job.get("ParameterizedJob"):
        return bool(job.get("Stop"))
    if job["Status"] != "dead":
        return False
    return bool(job.get("Stop")) or job["Type"] in ("batch", "sysbatch")


def alloc_gc_eligible(alloc: Obj, job: Obj | None, cutoff: float) -> bool:
    """Nomad's ``allocGCEligible``, with the client's own view: never live work.

    A failed allocation of a live job that was not replaced yet is kept: the scheduler may still
    reschedule it and needs it for that (Nomad checks the reschedule policy; the dev agent keeps
    every such allocation, which only ever keeps more).
    """
    if not scheduler.alloc_client_terminal(alloc) or alloc["ModifyTime"] > cutoff:
        return False
    if job is None or job.get("Stop") or job["Status"] == "dead":
        return True
    if alloc["DesiredStatus"] == "stop" or alloc["ClientStatus"] != "failed":
        return True
    return bool(alloc.get("NextAllocation"))


class GarbageCollector:
    """Runs server and client GC on their intervals; ``collect_server(force=True)`` on demand."""

    def __init__(self, engine: Engine, config: GCConfig, *, clock: Clock = now_ns) -> None:
        self.engine = engine
        self.state = engine.state
        self.config = config
        self.clock = clock
        # One pass at a time: a forced pass waits for a timed one instead of racing it.
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(
                self._every(self.config.job_gc_interval, self._timed_server_pass),
                name="devagent-server-gc",
            ),
            asyncio.create_task(
                self._every(self.config.client_gc_interval, self.collect_client),
                name="devagent-client-gc",
            ),
        ]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _timed_server_pass(self) -> None:
        await self.collect_server(force=False)

    async def _every(self, interval: float, work: Callable[[], Awaitable[object]]) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await work()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A failed pass is retried at the next interval; the agent keeps serving.
                log.exception("garbage collection pass failed")

    # -- server GC -------------------------------------------------------------------------

    async def collect_server(self, *, force: bool) -> Reap:
        """One server GC pass; returns everything it deleted."""
        total = Reap()
        async with self._lock:
            while True:
                # Chosen afresh after every commit: nothing may change between choice and commit.
                reap = self._choose(force=force)
                if not reap:
                    break
                await self.engine.reap(reap.jobs, reap.evals, reap.allocs)
                total.jobs += reap.jobs
                total.evals += reap.evals
                total.allocs += reap.allocs
            if total:
                log.info(
                    "garbage collected",
                    extra={
                        "jobs": len(total.jobs),
                        "evaluations": len(total.evals),
                        "allocations": len(total.allocs),
                        "forced": force,
                    },
                )
                await self._remove_alloc_dirs(total.allocs)
        return total

    def _choose(self, *, force: bool) -> Reap:
        now = self.clock()
        reap = Reap()
        self._choose_jobs(reap, _cutoff(now, self.config.job_gc_threshold, force=force))
        if reap:
            return reap
        self._choose_evals(reap, self._allocs_by_eval(), now, force=force)
        return reap

    def _allocs_by_eval(self) -> dict[str, list[Obj]]:
        by_eval: dict[str, list[Obj]] = {}
        for alloc in self.state.rows("allocs"):
            by_eval.setdefault(alloc["EvalID"], []).append(alloc)
        return by_eval

    def _live_children(self) -> set[str]:
        """Keys of parent jobs (periodic, parameterized) with a child that is not dead."""
        parents: set[str] = set()
        for job in self.state.rows("jobs"):
            if job.get("ParentID") and job["Status"] != "dead":
                parents.add(row_key(job["Namespace"], job["ParentID"]))
        return parents

    def _choose_jobs(self, reap: Reap, cutoff: float) -> None:
        """Nomad's ``jobGC``: jobs whose every evaluation and allocation can go with them."""
        parents_with_live_children = self._live_children()
        for job_key, job in self.state.items("jobs"):
            if len(reap.jobs) >= JOBS_PER_COMMIT:
                return
            if not job_gcable(job) or job["SubmitTime"] > cutoff:
                continue
            if job_key in parents_with_live_children:
                continue
            evals = self.engine.job_evaluations(job["Namespace"], job["ID"])
            allocs = self.engine.job_allocations(job["Namespace"], job["ID"], all_instances=True)
            if not all(
                e["Status"] in TERMINAL_EVAL_STATUSES and e["ModifyTime"] <= cutoff for e in evals
            ):
                continue
            if not all(
                alloc_gc_eligible(a, job, cutoff) and not self.engine.has_alloc_runner(a["ID"])
                for a in allocs
            ):
                continue
            reap.jobs.append(job_key)
            reap.evals.extend(e["ID"] for e in evals)
            reap.allocs.extend(a["ID"] for a in allocs)

    def _choose_evals(
        self, reap: Reap, allocs_by_eval: dict[str, list[Obj]], now: int, *, force: bool
    ) -> None:
        """Nomad's ``evalGC``, never taking a job's most recent evaluation."""
        cutoffs = {
            "batch": _cutoff(now, self.config.batch_eval_gc_threshold, force=force),
            "other": _cutoff(now, self.config.eval_gc_threshold, force=force),
        }
        latest = self._latest_evals()
        for evaluation in self.state.rows("evals"):
            if len(reap.evals) + len(reap.allocs) >= ROWS_PER_COMMIT:
                return
            if evaluation["Status"] not in TERMINAL_EVAL_STATUSES:
                continue
            is_batch = evaluation["Type"] == "batch"
            cutoff = cutoffs["batch" if is_batch else "other"]
            if evaluation["ModifyTime"] > cutoff or evaluation["ID"] in latest:
                continue
            job = self.state.get("jobs", row_key(evaluation["Namespace"], evaluation["JobID"]))
            # A batch job that is still there and not stopped keeps its evaluations: collecting
            # its terminal allocations would make the scheduler run them again.
            if is_batch and job is not None and not (job["Status"] == "dead" and job.get("Stop")):
                continue
            allocs = allocs_by_eval.get(evaluation["ID"], [])
            eligible = [
                a["ID"]
                for a in allocs
                if alloc_gc_eligible(a, job, cutoff) and not self.engine.has_alloc_runner(a["ID"])
            ]
            if len(eligible) == len(allocs):
                reap.evals.append(evaluation["ID"])
            reap.allocs.extend(eligible)

    def _latest_evals(self) -> set[str]:
        """The most recent evaluation of every job that still exists."""
        newest: dict[str, Obj] = {}
        for evaluation in self.state.rows("evals"):
            job_key = row_key(evaluation["Namespace"], evaluation["JobID"])
            current = newest.get(job_key)
            if current is None or (evaluation["CreateIndex"], evaluation["ID"]) > (
                current["CreateIndex"],
                current["ID"],
            ):
                newest[job_key] = evaluation
        return {e["ID"] for key, e in newest.items() if self.state.get("jobs", key) is not None}

    # -- client GC -------------------------------------------------------------------------

    async def collect_client(self) -> list[str]:
        """Remove the oldest terminal allocation directories above ``gc_max_allocs``.

        Nomad's client counts every allocation it tracks, live or terminal, and destroys
        terminal ones, oldest first, until it tracks no more than ``gc_max_allocs``.
        """
        async with self._lock:
            terminal: list[tuple[int, str]] = []
            live = 0
            for alloc in self.state.rows("allocs"):
                if scheduler.alloc_client_terminal(alloc) and not self.engine.has_alloc_runner(
                    alloc["ID"]
                ):
                    terminal.append((alloc["ModifyIndex"], alloc["ID"]))
                else:
                    live += 1
            terminal.sort()
            allowed = self.config.gc_max_allocs - live
            paths = [(alloc_id, self.engine.alloc_dir(alloc_id)) for _, alloc_id in terminal]
            removed = await asyncio.to_thread(_remove_oldest_dirs, paths, allowed)
        if removed:
            log.info("client garbage collected allocations", extra={"allocations": len(removed)})
        return removed

    async def _remove_alloc_dirs(self, alloc_ids: list[str]) -> None:
        paths = [self.engine.alloc_dir(alloc_id) for alloc_id in alloc_ids]
        await asyncio.to_thread(_remove_dirs, paths)


def _held(paths: list[tuple[str, Path]]) -> Iterator[tuple[str, Path]]:
    return ((alloc_id, path) for alloc_id, path in paths if path.is_dir())


def _remove_oldest_dirs(paths: list[tuple[str, Path]], allowed: int) -> list[str]:
    """Of the directories that still exist (oldest first), remove all but the last ``allowed``."""
    held = list(_held(paths))
    excess = len(held) - max(allowed, 0)
    removed = []
    for alloc_id, path in held[: max(excess, 0)]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(alloc_id)
    return removed


def _remove_dirs(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


# -- HTTP ----------------------------------------------------------------------------------

GC_KEY: Final = web.AppKey("devagent_garbage_collector", GarbageCollector)


async def system_gc(request: web.Request) -> web.Response:
    """``PUT``/``POST /v1/system/gc``: a forced server GC; 200 with an empty body, as Nomad.

    Nomad queues its forced collection and answers at once; the dev agent answers once the
    collection is done, which a client cannot tell apart except that it never has to wait.
    """
    if request.method not in ("PUT", "POST"):
        raise NomadHTTPError(405, "Invalid method")
    await request.app[GC_KEY].collect_server(force=True)
    return web.Response(status=200)


def add_routes(app: web.Application) -> None:
    app.router.add_route("*", "/v1/system/gc", system_gc)
