"""A work queue with client-go's guarantees, on asyncio.

- Keys are deduplicated: adding a key that is already waiting does nothing.
- A key is never handed to two workers at once: a key added while it is being processed is
  remembered ("dirty") and delivered again only after the worker calls ``done``.
- ``add_after`` delays a key on the event loop's clock; the earliest pending deadline wins.
- ``add_rate_limited`` delays a key by its own exponential backoff (``forget`` resets it), so one
  failing object backs off without slowing the others.

Every queue counts its adds, retries and how long keys wait (``QueueCounters``); ``instrument``
swaps in the counters a ``ControllerMetrics`` exposes.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from nomad_pipeline.controller.metrics import ControllerMetrics, QueueCounters

K = TypeVar("K", bound=Hashable)


class QueueShutDownError(Exception):
    """``get`` was called on (or was waiting in) a queue that has been shut down."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Per-key exponential backoff: ``base * 2**failures`` seconds, capped at ``cap``."""

    base: float = 0.005
    cap: float = 60.0

    def delay(self, failures: int) -> float:
        # Bound the exponent so a key failing for days cannot overflow the float.
        return min(self.cap, self.base * 2.0 ** min(failures, 64))


class WorkQueue(Generic[K]):
    def __init__(self, *, backoff: Backoff | None = None) -> None:
        self._backoff = backoff or Backoff()
        self._ready: deque[K] = deque()
        # Keys that need processing (waiting in _ready, or re-added while being processed).
        self._dirty: set[K] = set()
        self._processing: set[K] = set()
        self._failures: dict[K, int] = {}
        # One timer per delayed key, with the loop time it fires at.
        self._delayed: dict[K, tuple[float, asyncio.TimerHandle]] = {}
        self._getters: deque[asyncio.Future[None]] = deque()
        self._shut_down = False
        self._counters = QueueCounters()
        # When each key waiting for a worker was added (monotonic clock), for the queue wait.
        self._added_at: dict[K, float] = {}

    def __len__(self) -> int:
        """Keys ready to be handed out (not counting delayed or in-flight ones)."""
        return len(self._ready)

    def instrument(self, metrics: ControllerMetrics, name: str) -> None:
        """Count into ``metrics`` under the queue name ``name`` from now on."""
        self._counters = metrics.workqueue(name)
        self._counters.depth = self.__len__

    @property
    def is_shut_down(self) -> bool:
        return self._shut_down

    @property
    def in_flight(self) -> int:
        return len(self._processing)

    @property
    def delayed(self) -> int:
        return len(self._delayed)

    def add(self, key: K) -> None:
        if self._shut_down or key in self._dirty:
            return
        self._counters.adds += 1
        self._dirty.add(key)
        self._added_at.setdefault(key, time.monotonic())
        if key in self._processing:
            return  # delivered again by done()
        self._ready.append(key)
        self._wake_one_getter()

    def add_after(self, key: K, delay: float) -> None:
        if self._shut_down:
            return
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        pending = self._delayed.get(key)
        if pending is not None:
            if pending[0] <= due:
                return
            pending[1].cancel()
        handle = loop.call_at(due, self._fire_delayed, key)
        self._delayed[key] = (due, handle)

    def add_rate_limited(self, key: K) -> None:
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        self._counters.retries += 1
        self.add_after(key, self._backoff.delay(failures))

    def forget(self, key: K) -> None:
        """Reset the key's backoff (call after a successful reconcile)."""
        self._failures.pop(key, None)

    def failures(self, key: K) -> int:
        return self._failures.get(key, 0)

    async def get(self) -> K:
        """The next key; the caller owns it until ``done(key)``. Raises QueueShutDownError."""
        while not self._ready:
            if self._shut_down:
                raise QueueShutDownError
            waiter = asyncio.get_running_loop().create_future()
            self._getters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                # A wake-up meant for us must not be lost: pass it on to the next getter.
                if waiter.done() and not waiter.cancelled() and self._ready:
                    self._wake_one_getter()
                raise
            finally:
                if waiter in self._getters:
                    self._getters.remove(waiter)
        key = self._ready.popleft()
        self._processing.add(key)
        self._dirty.discard(key)
        added = self._added_at.pop(key, None)
        if added is not None:
            self._counters.queue_duration.observe(time.monotonic() - added)
        return key

    def done(self, key: K) -> None:
        self._processing.discard(key)
        if key in self._dirty and not self._shut_down:
            self._ready.append(key)
            self._wake_one_getter()

    def shut_down(self) -> None:
        """Stop accepting keys, drop delayed ones and wake every waiting ``get`` to raise."""
        self._shut_down = True
        for _due, handle in self._delayed.values():
            handle.cancel()
        self._delayed.clear()
        self._ready.clear()
        self._dirty.clear()
        self._added_at.clear()
        while self._getters:
            waiter = self._getters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _fire_delayed(self, key: K) -> None:
        self._delayed.pop(key, None)
        self.add(key)

    def _wake_one_getter(self) -> None:
        while self._getters:
            waiter = self._getters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
