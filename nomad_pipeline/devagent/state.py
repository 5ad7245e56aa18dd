"""The dev agent's state: Nomad's tables, one global index, blocking waits and the event buffer.

Everything Nomad keeps in Raft lives here as plain JSON-ready dicts with Nomad's PascalCase field
names, so the HTTP layer serves them as they are. The store is single-writer by construction: it
is only touched from the event loop, and every change goes through :meth:`StateStore.commit`,
which bumps the global index, records the table's index, persists, publishes events and wakes
blocking queries. Persistence (``--data-dir``) is SQLite, written by one background thread in
group commits so the event loop never blocks on disk; ``commit`` returns once the change is
durable, as a Raft apply would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Obj = dict[str, Any]

# Nomad's tables, as the HTTP layer names them for blocking queries.
TABLES = ("jobs", "job_versions", "evals", "allocs", "vars", "namespaces", "nodes")

DEFAULT_EVENT_BUFFER = 100


class NomadHTTPError(Exception):
    """An error as Nomad answers it: a status code and a text/plain body (or a JSON body)."""

    def __init__(self, status: int, text: str, *, body: Any = None) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        # Some errors (variable CAS conflicts) answer with a JSON object instead of text.
        self.body = body


# Compact, and without the per-container cycle check (a tenth of the encoding time): state,
# requests and events are trees decoded from JSON or built from literals, never cyclic.
_JSON = json.JSONEncoder(separators=(",", ":"), check_circular=False)


def to_json(value: Any) -> str:
    """``value`` as compact JSON text, as ``json.dumps(value, separators=(",", ":"))``."""
    return _JSON.encode(value)


def new_uuid() -> str:
    return str(uuid.uuid4())


def now_ns() -> int:
    return time.time_ns()


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of Nomad's event stream (``Topic``, ``Type``, ``Key``, ...)."""

    topic: str
    type: str
    key: str
    namespace: str
    payload: Obj
    filter_keys: tuple[str, ...] = ()

    def to_wire(self, index: int) -> Obj:
        return {
            "Topic": self.topic,
            "Type": self.type,
            "Key": self.key,
            "Namespace": self.namespace,
            "FilterKeys": list(self.filter_keys) or None,
            "Index": index,
            "Payload": self.payload,
        }


@dataclass(slots=True)
class Change:
    """Put (``value`` set) or delete (``value`` None) one row of one table."""

    table: str
    key: str
    value: Obj | None


@dataclass(slots=True)
class EventBatch:
    index: int
    events: list[Obj]


@dataclass(slots=True, eq=False)
class _Subscriber:
    queue: asyncio.Queue[EventBatch] = field(default_factory=lambda: asyncio.Queue(maxsize=10_000))


def row_key(*parts: str) -> str:
    """Composite keys (namespace + id) joined by NUL, which no Nomad ID or path may contain."""
    return "\x00".join(parts)


class StateStore:
    def __init__(self, data_dir: Path | None, *, event_buffer: int = DEFAULT_EVENT_BUFFER) -> None:
        self._tables: dict[str, dict[str, Obj]] = {name: {} for name in TABLES}
        self._table_index: dict[str, int] = dict.fromkeys(TABLES, 1)
        self.index = 1
        self._changed = asyncio.Event()
        self._events: deque[EventBatch] = deque(maxlen=event_buffer)
        self._subscribers: set[_Subscriber] = set()
        self._db_path = data_dir / "state.db" if data_dir is not None else None
        self._db: sqlite3.Connection | None = None
        self._pending: list[tuple[list[Change], int, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._wake_writer = asyncio.Event()
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Load persisted tables (if any) and start the persistence writer."""
        if self._db_path is None:
            return
        self._db_path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await asyncio.to_thread(self._open_db, self._db_path)
        rows, index = await asyncio.to_thread(self._load_rows)
        for table, key, value in rows:
            if table in self._tables:
                self._tables[table][key] = json.loads(value)
        self.index = max(index, 1)
        self._table_index = dict.fromkeys(TABLES, self.index)
        self._writer = asyncio.create_task(self._write_loop(), name="devagent-state-writer")

    async def close(self) -> None:
        if self._writer is not None:
            # The writer drains what was committed, then exits. It is never cancelled mid-write:
            # a cancelled to_thread keeps running and would race the next use of the connection.
            self._closing = True
            self._wake_writer.set()
            await self._writer
            self._writer = None
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.to_thread(db.close)
        for subscriber in list(self._subscribers):
            self._subscribers.discard(subscriber)

    @staticmethod
    def _open_db(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS rows"
            " (tbl TEXT, key TEXT, value TEXT, PRIMARY KEY(tbl, key))"
        )
        db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER)")
        return db

    def _load_rows(self) -> tuple[list[tuple[str, str, str]], int]:
        assert self._db is not None
        rows = self._db.execute("SELECT tbl, key, value FROM rows").fetchall()
        found = self._db.execute("SELECT value FROM meta WHERE name='index'").fetchone()
        return rows, int(found[0]) if found else 1

    # -- reads -----------------------------------------------------------------------------

    def get(self, table: str, key: str) -> Obj | None:
        return self._tables[table].get(key)

    def rows(self, table: str) -> Iterable[Obj]:
        return self._tables[table].values()

    def items(self, table: str) -> Iterable[tuple[str, Obj]]:
        return self._tables[table].items()

    def table_index(self, *tables: str) -> int:
        """The index of the last change to any of ``tables`` (X-Nomad-Index of a list)."""
        return max(self._table_index[t] for t in tables)

    # A blocking query's ``wait`` is a deadline the caller passes through, hence ``timeout``.
    async def wait(
        self,
        tables: tuple[str, ...],
        min_index: int,
        timeout: float,  # noqa: ASYNC109
    ) -> None:
        """Block until one of ``tables`` changed past ``min_index``, or ``timeout`` passes.

        "No guarantee of change", as Nomad: callers re-read and compare content.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.table_index(*tables) <= min_index:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await changed.wait()

    # -- writes ----------------------------------------------------------------------------

    async def commit(self, changes: list[Change], events: list[Event] | None = None) -> int:
        """Apply ``changes`` atomically under one new index and return that index."""
        self.index += 1
        index = self.index
        for change in changes:
            table = self._tables[change.table]
            if change.value is None:
                table.pop(change.key, None)
            else:
                table[change.key] = change.value
            self._table_index[change.table] = index
        if events:
            self._publish(EventBatch(index, [e.to_wire(index) for e in events]))
        # Wake every blocking query; each re-checks its own tables.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        if self._db is not None:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._pending.append((changes, index, done))
            self._wake_writer.set()
            await done
        return index

    def _take_pending(self) -> list[tuple[list[Change], int, asyncio.Future[None]]]:
        pending, self._pending = self._pending, []
        return pending

    async def _write_loop(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                await self._wake_writer.wait()
                self._wake_writer.clear()
                continue
            batch = self._take_pending()
            try:
                await asyncio.to_thread(self._write_batch, batch)
            except Exception as exc:  # a failed disk write must fail the writes, not hang them
                for _, _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for _, _, done in batch:
                if not done.done():
                    done.set_result(None)

    def _write_batch(self, batch: list[tuple[list[Change], int, asyncio.Future[None]]]) -> None:
        assert self._db is not None
        db = self._db
        # The batch is one SQLite transaction: only the last value of a row written by several
        # of its commits (an allocation going pending, running, complete) reaches the disk.
        latest: dict[tuple[str, str], Obj | None] = {}
        for changes, _, _ in batch:
            for change in changes:
                latest[(change.table, change.key)] = change.value
        last_index = max(index for _, index, _ in batch)
        # One object stored in two tables (a job and its version row) is encoded once; ``latest``
        # keeps every value alive meanwhile, so no id is reused within the batch.
        encoded: dict[int, str] = {}
        db.execute("BEGIN")
        try:
            for (table, key), value in latest.items():
                if value is None:
                    db.execute("DELETE FROM rows WHERE tbl=? AND key=?", (table, key))
                    continue
                text = encoded.get(id(value))
                if text is None:
                    text = encoded[id(value)] = to_json(value)
                db.execute("INSERT OR REPLACE INTO rows VALUES (?, ?, ?)", (table, key, text))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('index', ?)", (last_index,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- events ----------------------------------------------------------------------------

    def _publish(self, batch: EventBatch) -> None:
        self._events.append(batch)
        for subscriber in list(self._subscribers):
            try:
                subscriber.queue.put_nowait(batch)
            except asyncio.QueueFull:
                # A reader this far behind is cut off, as Nomad closes slow subscriptions.
                self._subscribers.discard(subscriber)

    async def subscribe(self, after_index: int) -> AsyncIterator[EventBatch]:
        """Batches with index > ``after_index``: the buffered ones first, then live ones.

        An index older than the buffer starts at the oldest event still kept (no gap signal,
        as Nomad). The iterator ends if the reader falls too far behind.
        """
        async for batches in self.subscribe_many(after_index):
            for batch in batches:
                yield batch

    async def subscribe_many(self, after_index: int) -> AsyncIterator[list[EventBatch]]:
        """:meth:`subscribe`, yielding every batch that is already waiting at once (at least
        one), so a reader can hand a burst of commits on in one write."""
        subscriber = _Subscriber()
        backlog = [b for b in self._events if b.index > after_index]
        self._subscribers.add(subscriber)
        try:
            last = after_index
            if backlog:
                last = backlog[-1].index
                yield backlog
            while subscriber in self._subscribers:
                waiting = [await subscriber.queue.get()]
                while not subscriber.queue.empty():
                    waiting.append(subscriber.queue.get_nowait())
                fresh = [batch for batch in waiting if batch.index > last]
                if fresh:
                    last = fresh[-1].index
                    yield fresh
        finally:
            self._subscribers.discard(subscriber)
