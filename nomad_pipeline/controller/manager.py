"""Runs the controller's long-lived components and stops them in order.

Every runnable is a named task in one TaskGroup: if any fails or returns early, the others are
cancelled and the error propagates. ``stop()`` cancels them one by one in reverse order of
addition, so sources of events stop before the controllers they feed, and servers go last.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence

from nomad_pipeline.controller.runtime import Request, Runnable
from nomad_pipeline.errors import Gone
from nomad_pipeline.resources.meta import Resource
from nomad_pipeline.store.interface import Store

logger = logging.getLogger(__name__)


class Manager:
    def __init__(self, runnables: Sequence[Runnable] = (), *, stop_timeout: float = 30.0) -> None:
        self._runnables: list[Runnable] = list(runnables)
        self._stop_timeout = stop_timeout
        self._stopping = asyncio.Event()
        self._running = False

    def add(self, runnable: Runnable) -> None:
        if self._running:
            raise RuntimeError(f"cannot add {runnable.name!r}: the manager is already running")
        self._runnables.append(runnable)

    @property
    def names(self) -> list[str]:
        return [runnable.name for runnable in self._runnables]

    def stop(self) -> None:
        """Ask ``run`` to stop every runnable and return; safe to call at any time."""
        self._stopping.set()

    async def run(self) -> None:
        """Run every runnable until ``stop()``; raises if one of them fails or returns."""
        self._running = True
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(_guard(runnable), name=runnable.name)
                    for runnable in self._runnables
                ]
                await self._stopping.wait()
                for runnable, task in reversed(list(zip(self._runnables, tasks, strict=True))):
                    await self._stop_one(runnable, task)
        finally:
            self._running = False

    async def _stop_one(self, runnable: Runnable, task: asyncio.Task[None]) -> None:
        task.cancel()
        done, _pending = await asyncio.wait({task}, timeout=self._stop_timeout)
        if not done:
            logger.error(
                "runnable did not stop in time",
                extra={"runnable": runnable.name, "timeout": self._stop_timeout},
            )


async def _guard(runnable: Runnable) -> None:
    try:
        await runnable.run()
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("runnable failed", extra={"runnable": runnable.name})
        raise
    raise RuntimeError(f"runnable {runnable.name!r} returned while it should run until stopped")


def requests_for_object(obj: Resource) -> list[Request]:
    """The default mapping: an event on an object reconciles that object."""
    return [Request(obj.kind, obj.metadata.namespace, obj.metadata.name)]


class StoreWatchSource:
    """Feeds a controller with the objects of one kind: a full list, then store watch events.

    On start and whenever the watch expires (Gone) it re-lists, enqueueing every object, so no
    change is missed; other store errors are retried with a capped backoff.
    """

    def __init__(
        self,
        store: Store,
        kind: type[Resource],
        enqueue: Callable[[Request], None],
        *,
        to_requests: Callable[[Resource], Iterable[Request]] = requests_for_object,
        retry_cap: float = 5.0,
    ) -> None:
        self._store = store
        self._kind = kind
        self._enqueue = enqueue
        self._to_requests = to_requests
        self._retry_cap = retry_cap
        self.relists = 0

    @property
    def name(self) -> str:
        return f"watch-{self._kind.KIND.lower()}"

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                await self._list_then_watch()
            except asyncio.CancelledError:
                raise
            except Gone:
                logger.info("watch expired, re-listing", extra={"kind": self._kind.KIND})
                failures = 0
            except Exception:
                failures += 1
                delay = min(self._retry_cap, 0.05 * 2**failures)
                logger.exception(
                    "store watch failed, retrying",
                    extra={"kind": self._kind.KIND, "retry_in": delay},
                )
                await asyncio.sleep(delay)

    async def _list_then_watch(self) -> None:
        listed = await self._store.list(self._kind)
        self.relists += 1
        for obj in listed.items:
            self._emit(obj)
        events = self._store.watch(self._kind, since=listed.resource_version)
        try:
            async for event in events:
                self._emit(event.object)
        finally:
            # Close the store's generator now (on cancel or Gone), not whenever it is collected.
            if isinstance(events, AsyncGenerator):
                await events.aclose()

    def _emit(self, obj: Resource) -> None:
        for request in self._to_requests(obj):
            self._enqueue(request)


def watch_store(
    store: Store,
    kind: type[Resource],
    enqueue: Callable[[Request], None],
    *,
    to_requests: Callable[[Resource], Iterable[Request]] = requests_for_object,
) -> StoreWatchSource:
    """A runnable mapping store events of ``kind`` to Requests (re-lists on Gone)."""
    return StoreWatchSource(store, kind, enqueue, to_requests=to_requests)
