"""The reconcile contract and the controller loop, in controller-runtime's shape.

A ``Request`` names an object, never an event: the reconciler reads the current state and
converges it, so merged or missed events do no harm. What happens next is decided by the outcome
alone:

- ``Result()``: done; the key's backoff is reset.
- ``Result(requeue_after=t)``: reconcile again after ``t`` seconds (backoff reset).
- ``TerminalError``: logged, not requeued; the reconciler surfaces it as a condition.
- any other exception: requeued with the key's exponential backoff.

Each reconcile's result and duration are counted (``ReconcileCounters``); ``instrument`` swaps
in the counters a ``ControllerMetrics`` exposes, under the controller's name.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from nomad_pipeline.controller.metrics import ControllerMetrics, ReconcileCounters
from nomad_pipeline.controller.workqueue import QueueShutDownError, WorkQueue
from nomad_pipeline.errors import TerminalError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Request:
    """Which object to converge: identity only, never the event or the body."""

    kind: str
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Result:
    # Seconds until the object is reconciled again; None waits for the next event.
    requeue_after: float | None = None


class Reconciler(Protocol):
    async def reconcile(self, request: Request) -> Result: ...


class Runnable(Protocol):
    """A long-lived component: ``run`` blocks until cancelled; returning early is a bug."""

    @property
    def name(self) -> str: ...

    async def run(self) -> None: ...


class Controller:
    """Feeds requests from a work queue to a reconciler with ``workers`` concurrent tasks."""

    def __init__(
        self,
        name: str,
        reconciler: Reconciler,
        queue: WorkQueue[Request] | None = None,
        *,
        workers: int = 1,
    ) -> None:
        if workers < 1:
            raise ValueError(f"controller {name!r}: workers must be at least 1, got {workers}")
        self._name = name
        self._reconciler = reconciler
        self.queue: WorkQueue[Request] = queue if queue is not None else WorkQueue()
        self._workers = workers
        # Failed reconciles (transient or terminal), for tests and diagnostics.
        self.errors = 0
        self._counters = ReconcileCounters()

    @property
    def name(self) -> str:
        return self._name

    def instrument(self, metrics: ControllerMetrics) -> None:
        """Count reconciles and the work queue into ``metrics`` under this controller's name."""
        self._counters = metrics.reconciles(self._name)
        self.queue.instrument(metrics, self._name)

    def enqueue(self, request: Request) -> None:
        self.queue.add(request)

    async def run(self) -> None:
        logger.info("controller starting", extra={"controller": self._name})
        try:
            async with asyncio.TaskGroup() as workers:
                for index in range(self._workers):
                    workers.create_task(self._work(), name=f"{self._name}-worker-{index}")
        finally:
            self.queue.shut_down()
            logger.info("controller stopped", extra={"controller": self._name})

    async def _work(self) -> None:
        while True:
            try:
                request = await self.queue.get()
            except QueueShutDownError:
                return
            try:
                await self._reconcile_one(request)
            finally:
                self.queue.done(request)

    async def _reconcile_one(self, request: Request) -> None:
        extra = {
            "controller": self._name,
            "kind": request.kind,
            "namespace": request.namespace,
            "object_name": request.name,
        }
        counters = self._counters
        started = time.perf_counter()
        try:
            result = await self._reconciler.reconcile(request)
        except asyncio.CancelledError:
            raise
        except TerminalError as error:
            counters.duration.observe(time.perf_counter() - started)
            counters.errors += 1
            self.errors += 1
            logger.error("reconcile failed permanently", extra={**extra, "error": str(error)})
            self.queue.forget(request)
        except Exception:
            counters.duration.observe(time.perf_counter() - started)
            counters.errors += 1
            self.errors += 1
            logger.exception(
                "reconcile failed, backing off",
                extra={**extra, "failures": self.queue.failures(request) + 1},
            )
            self.queue.add_rate_limited(request)
        else:
            counters.duration.observe(time.perf_counter() - started)
            self.queue.forget(request)
            if result.requeue_after is None:
                counters.success += 1
            else:
                # controller-runtime's split: an immediate requeue versus one after a delay.
                if result.requeue_after > 0:
                    counters.requeue_after += 1
                else:
                    counters.requeue += 1
                self.queue.add_after(request, result.requeue_after)
