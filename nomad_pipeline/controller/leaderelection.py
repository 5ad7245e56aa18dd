"""Leader election over a Nomad Variable lock, in controller-runtime's shape.

Several controllers sharing one Nomad (the nomad-vars backend) all serve the API, but only the
one holding the lock runs the reconcilers. The lock is Nomad's Variables lock API
(``PUT /v1/var/:path?lock-acquire|lock-renew|lock-release``); the variable's Items name the
holder (hostname, pid, API address, since) for operators, readable with any Nomad client.

Timings follow controller-runtime's proportions (lease 15 s, renew deadline 10 s, retry period
2 s), scaled by the lease (= the lock's TTL):

- the holder renews every retry period; when no renewal has succeeded for the renew deadline
  (2/3 of the lease) it stops its reconcilers and campaigns again. Nomad only expires a lock
  2 x TTL after its last renewal, plus LockDelay, so a holder that lost touch has stopped a
  full TTL before anyone else can be granted the lock;
- a follower tries to acquire every retry period.

A controller restarted with the same data directory re-takes its own lock at once: the lock ID
is kept in ``<data-dir>/leader-lock.json`` and tried with ``lock-renew`` before campaigning
(otherwise a SIGKILLed single controller would wait 2 x TTL + LockDelay). The file is held with
``flock`` while the elector runs, so two live processes given one data directory never both
claim the saved lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from nomad_pipeline.controller.manager import Manager
from nomad_pipeline.controller.runtime import Runnable
from nomad_pipeline.errors import Conflict, Invalid, NomadPipelineError, NotFound
from nomad_pipeline.nomad.client import NomadClient, parse_duration

logger = logging.getLogger(__name__)

# A sibling of the nomad-vars store's prefix (``nomad-pipeline/``), not inside it: the store
# reads every variable under its prefix as an object and would warn about the lock variable.
LEADER_LOCK_PATH = "nomad-pipeline-leader"
LEADER_STATE_FILE = "leader-lock.json"
DEFAULT_LEASE = "15s"
# Nomad refuses lock TTLs outside this range (400 "TTL must be between 10 seconds and 24 hours").
MIN_LEASE_SECONDS = 10.0
MAX_LEASE_SECONDS = 24 * 3600.0
# A release on shutdown is a courtesy (the lock expires anyway); never hold up a stop for it.
RELEASE_TIMEOUT_SECONDS = 5.0


def parse_lease(text: str) -> float:
    """Seconds of a ``--leader-lease`` Go duration, within Nomad's lock TTL range."""
    try:
        seconds = parse_duration(text)
    except Invalid as error:
        raise Invalid(f"leader lease: {error.message}", field="leader_lease") from None
    if not MIN_LEASE_SECONDS <= seconds <= MAX_LEASE_SECONDS:
        raise Invalid(
            f"leader lease {text!r} must be between 10s and 24h (Nomad's lock TTL range)",
            field="leader_lease",
        )
    return seconds


def go_duration(seconds: float) -> str:
    """A Go duration string Nomad parses (``15s``, ``1500ms``)."""
    milliseconds = round(seconds * 1000)
    if milliseconds % 1000 == 0:
        return f"{milliseconds // 1000}s"
    return f"{milliseconds}ms"


@dataclass(frozen=True, slots=True)
class LeaseTimings:
    """Seconds: the lock's TTL, how long to lead without a renewal, how often to try, and the
    LockDelay Nomad waits after an expiry before granting the lock again."""

    ttl: float
    renew_deadline: float
    retry_period: float
    lock_delay: float

    @classmethod
    def for_lease(cls, lease: float) -> LeaseTimings:
        # controller-runtime: 15 s lease, 10 s renew deadline, 2 s retry period. The LockDelay
        # is short because Nomad's own 2 x TTL expiry already leaves a full TTL between the
        # holder giving up (renew deadline) and the lock expiring.
        retry_period = lease * 2 / 15
        return cls(
            ttl=lease,
            renew_deadline=lease * 2 / 3,
            retry_period=retry_period,
            lock_delay=retry_period,
        )


@dataclass(frozen=True, slots=True)
class LeaderIdentity:
    """Who campaigns: written to the lock variable's Items when it leads."""

    hostname: str
    pid: int
    # The API's ``http://HOST:PORT``, resolved when the lock is taken (the API may start later).
    address: Callable[[], str | None]

    @classmethod
    def of_this_process(cls, address: Callable[[], str | None]) -> LeaderIdentity:
        return cls(hostname=socket.gethostname(), pid=os.getpid(), address=address)

    @property
    def holder(self) -> str:
        return f"{self.hostname}/{self.pid}"

    def items(self, since: datetime) -> dict[str, str]:
        return {
            "holder": self.holder,
            "hostname": self.hostname,
            "pid": str(self.pid),
            "address": self.address() or "",
            "since": since.isoformat(),
        }


class LeaderElector:
    """A Runnable that campaigns for the lock and runs ``runnables()`` only while it leads.

    ``runnables`` is called at each term (controllers shut their queues down when they stop, so
    a new term needs new ones). ``on_change(leading)`` is called on every transition. A runnable
    that fails while leading ends ``run`` with its error, after the lock is released.
    """

    def __init__(
        self,
        nomad: NomadClient,
        runnables: Callable[[], Sequence[Runnable]],
        *,
        namespace: str = "default",
        path: str = LEADER_LOCK_PATH,
        lease: float = 15.0,
        state_dir: Path | None = None,
        identity: LeaderIdentity | None = None,
        on_change: Callable[[bool], None] = lambda leading: None,
    ) -> None:
        self._nomad = nomad
        self._runnables = runnables
        self._namespace = namespace
        self._path = path
        self.timings = LeaseTimings.for_lease(lease)
        self._state_path = None if state_dir is None else state_dir / LEADER_STATE_FILE
        self._state_file: IO[str] | None = None
        self._identity = identity or LeaderIdentity.of_this_process(lambda: None)
        self._on_change = on_change
        self._lock_id: str | None = None
        self._renewed_at = 0.0
        self._observed_term: str | None = None
        self._leading = False
        self.terms = 0

    @property
    def name(self) -> str:
        return "leader-elector"

    @property
    def leading(self) -> bool:
        return self._leading

    async def run(self) -> None:
        saved_lock_id = await asyncio.to_thread(self._open_state)
        try:
            while True:
                lock_id = await self._campaign(saved_lock_id)
                saved_lock_id = await self._lead(lock_id)
        finally:
            await self._release()
            await asyncio.to_thread(self._close_state)

    # ---- campaigning -----------------------------------------------------------------------

    async def _campaign(self, saved_lock_id: str | None) -> str:
        """Return the ID of a lock this process now holds; tries until it gets one."""
        loop = asyncio.get_running_loop()
        if saved_lock_id is not None and await self._retake(saved_lock_id):
            return saved_lock_id
        while True:
            attempt_started = loop.time()
            try:
                variable = await self._nomad.lock_acquire(
                    self._path,
                    namespace=self._namespace,
                    ttl=go_duration(self.timings.ttl),
                    lock_delay=go_duration(self.timings.lock_delay),
                    items=self._identity.items(datetime.now(UTC)),
                )
            except Conflict:
                await self._observe_leader()
            except NomadPipelineError as error:
                logger.warning(
                    "cannot campaign for leadership; retrying",
                    extra={"lock_path": self._path, "error": str(error)},
                )
            else:
                # The lease counts from when the request left, never from the answer.
                self._renewed_at = attempt_started
                lock_id: str = variable["Lock"]["ID"]
                return lock_id
            await asyncio.sleep(self.timings.retry_period)

    async def _retake(self, lock_id: str) -> bool:
        """Renew the lock saved by this data directory's previous process; True if held."""
        attempt_started = asyncio.get_running_loop().time()
        try:
            renewed = await self._nomad.lock_renew(self._path, lock_id, namespace=self._namespace)
        except (Conflict, NotFound):
            logger.info(
                "saved leader lock is no longer held; campaigning",
                extra={"lock_path": self._path},
            )
            await asyncio.to_thread(self._save_lock_id, None)
            return False
        except NomadPipelineError as error:
            logger.warning(
                "cannot renew the saved leader lock; campaigning",
                extra={"lock_path": self._path, "error": str(error)},
            )
            return False
        held_ttl = str((renewed.get("Lock") or {}).get("TTL", ""))
        if not self._is_our_ttl(held_ttl):
            # Kept with another lease, the lock could expire before our renew deadline: give it
            # back and campaign with ours.
            logger.info(
                "the saved leader lock has another lease; releasing it to campaign",
                extra={"lock_path": self._path, "held_ttl": held_ttl},
            )
            self._lock_id = lock_id
            await self._release()
            return False
        self._renewed_at = attempt_started
        try:
            # Record this process as the holder (the Items still name the previous one).
            await self._nomad.put_variable(
                self._path,
                self._identity.items(datetime.now(UTC)),
                namespace=self._namespace,
                lock_id=lock_id,
            )
        except NomadPipelineError as error:
            logger.warning(
                "re-took the leader lock but could not update its holder",
                extra={"lock_path": self._path, "error": str(error)},
            )
        logger.info(
            "re-took the leader lock this data directory held", extra={"lock_path": self._path}
        )
        return True

    def _is_our_ttl(self, text: str) -> bool:
        try:
            return abs(parse_duration(text) - self.timings.ttl) < 0.001
        except Invalid:
            return False

    async def _observe_leader(self) -> None:
        """Log who leads when it changes (followers' view)."""
        try:
            variable = await self._nomad.get_variable(self._path, namespace=self._namespace)
        except NomadPipelineError:
            # Released between our acquire and this read: the next attempt will tell.
            return
        items: dict[str, Any] = variable.get("Items") or {}
        holder = str(items.get("holder", ""))
        # A term is its holder and start: a new term of the same process is news too.
        term = f"{holder} {items.get('address', '')} {items.get('since', '')}"
        if holder and term != self._observed_term:
            self._observed_term = term
            logger.info(
                "following the leader",
                extra={
                    "leader": holder,
                    "leader_address": items.get("address", ""),
                    "leader_since": items.get("since", ""),
                    "lock_path": self._path,
                },
            )

    # ---- leading ---------------------------------------------------------------------------

    async def _lead(self, lock_id: str) -> str | None:
        """Run the runnables until leadership is lost; their failure propagates. Returns the
        lock ID when it may still be ours (renewals failed, Nomad did not refuse them)."""
        self._lock_id = lock_id
        self._observed_term = None
        await asyncio.to_thread(self._save_lock_id, lock_id)
        self.terms += 1
        manager = Manager(self._runnables(), stop_timeout=self.timings.renew_deadline)
        self._set_leading(True)
        logger.info(
            "became leader",
            extra={
                "leader": self._identity.holder,
                "lock_path": self._path,
                "runnables": manager.names,
            },
        )
        leading = asyncio.create_task(manager.run(), name="leader-runnables")
        try:
            retry_lock_id = await self._hold(lock_id, leading)
        finally:
            manager.stop()
            await asyncio.wait({leading})
            self._set_leading(False)
        error = None if leading.cancelled() else leading.exception()
        if error is not None:
            raise error
        return retry_lock_id

    async def _hold(self, lock_id: str, leading: asyncio.Task[None]) -> str | None:
        """Renew every retry period; return once leadership is lost: None when Nomad refused
        the renewal, the lock ID when the renew deadline passed without an answer (it may still
        be ours: the next campaign tries to renew it first). Raises if the runnables end."""
        loop = asyncio.get_running_loop()
        while True:
            deadline = self._renewed_at + self.timings.renew_deadline
            wait = min(self.timings.retry_period, max(0.0, deadline - loop.time()))
            done, _ = await asyncio.wait({leading}, timeout=wait)
            if done:
                leading.result()
                raise RuntimeError("the leader's runnables returned while they should run")
            attempt_started = loop.time()
            if attempt_started >= deadline:
                await self._lost("no renewal within the renew deadline", forget_lock=False)
                return lock_id
            try:
                async with asyncio.timeout(deadline - attempt_started):
                    await self._nomad.lock_renew(self._path, lock_id, namespace=self._namespace)
            except (Conflict, NotFound) as error:
                await self._lost(f"the lock is no longer ours: {error}", forget_lock=True)
                return None
            except TimeoutError:
                await self._lost("no renewal within the renew deadline", forget_lock=False)
                return lock_id
            except NomadPipelineError as error:
                logger.warning(
                    "cannot renew the leader lock; still leading until the renew deadline",
                    extra={
                        "lock_path": self._path,
                        "error": str(error),
                        "seconds_left": round(deadline - loop.time(), 3),
                    },
                )
                continue
            self._renewed_at = attempt_started

    async def _lost(self, reason: str, *, forget_lock: bool) -> None:
        logger.warning(
            "lost leadership; stopping the reconcilers",
            extra={"leader": self._identity.holder, "lock_path": self._path, "reason": reason},
        )
        self._lock_id = None
        self._observed_term = None
        if forget_lock:
            await asyncio.to_thread(self._save_lock_id, None)

    async def _release(self) -> None:
        lock_id, self._lock_id = self._lock_id, None
        if lock_id is None:
            return
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT_SECONDS):
                await self._nomad.lock_release(self._path, lock_id, namespace=self._namespace)
        except (NomadPipelineError, TimeoutError) as error:
            logger.warning(
                "could not release the leader lock; it expires by itself",
                extra={"lock_path": self._path, "error": str(error)},
            )
        else:
            logger.info("released the leader lock", extra={"lock_path": self._path})
        await asyncio.to_thread(self._save_lock_id, None)

    def _set_leading(self, leading: bool) -> None:
        self._leading = leading
        self._on_change(leading)

    # ---- the saved lock ID (blocking file I/O: called through asyncio.to_thread) ------------

    def _open_state(self) -> str | None:
        """Open and flock the state file; the saved lock ID for this lock, if any."""
        if self._state_path is None:
            return None
        self._state_path.parent.mkdir(parents=True, exist_ok=True)
        state_file = self._state_path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(state_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            state_file.close()
            logger.warning(
                "another process uses this data directory; not re-taking its leader lock",
                extra={"state_file": str(self._state_path)},
            )
            return None
        self._state_file = state_file
        state_file.seek(0)
        text = state_file.read()
        if not text.strip():
            return None
        try:
            saved = json.loads(text)
        except json.JSONDecodeError:
            logger.warning(
                "ignoring an unreadable leader state file",
                extra={"state_file": str(self._state_path)},
            )
            return None
        if not isinstance(saved, dict) or (saved.get("namespace"), saved.get("path")) != (
            self._namespace,
            self._path,
        ):
            return None
        lock_id = saved.get("lock_id")
        return lock_id if isinstance(lock_id, str) and lock_id else None

    def _save_lock_id(self, lock_id: str | None) -> None:
        state_file = self._state_file
        if state_file is None:
            return
        # Rewritten in place: the flock belongs to this inode, so no rename.
        state_file.seek(0)
        state_file.truncate()
        if lock_id is not None:
            record = {"namespace": self._namespace, "path": self._path, "lock_id": lock_id}
            state_file.write(json.dumps(record) + "\n")
        state_file.flush()
        os.fsync(state_file.fileno())

    def _close_state(self) -> None:
        state_file, self._state_file = self._state_file, None
        if state_file is not None:
            with contextlib.suppress(OSError):
                state_file.close()


__all__ = [
    "DEFAULT_LEASE",
    "LEADER_LOCK_PATH",
    "LeaderElector",
    "LeaderIdentity",
    "LeaseTimings",
    "go_duration",
    "parse_lease",
]
