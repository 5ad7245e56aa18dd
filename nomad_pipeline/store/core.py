"""What every store shares: write rules, the object cache, the event history and watch.

Both backends keep every object in memory as a parsed model (the memory store as its only copy,
the nomad-vars store as a cache of Nomad) and differ only in how a write is made durable
(:meth:`CachingStore._persist` / :meth:`CachingStore._erase`).

Models are treated as immutable, both ways:

- objects handed out by a store are shared, never copied per read: derive changed ones with
  ``obj.model_copy(update=...)`` (or ``model_copy(deep=True)`` before editing nested values);
- objects passed to a write must not be mutated afterwards. ``create`` copies the whole new
  object (once per object) and ``update`` the spec it takes; ``update_status``, the per-step
  hot path, copies nothing: the stored object shares the caller's status, and the spec and
  metadata of the current object (a Run carries its flow's whole spec, which a deep copy per
  status write would duplicate on every step).
"""

from __future__ import annotations

import asyncio
import copy
import uuid
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel

from nomad_pipeline.errors import AlreadyExists, Conflict, Gone, Invalid, NotFound
from nomad_pipeline.resources.meta import Resource
from nomad_pipeline.store.interface import ListResult, WatchEvent, WatchEventType

R = TypeVar("R", bound=Resource)

DEFAULT_HISTORY_SIZE = 10_000
# An unconditional write whose cached base went stale retries from the refreshed cache; a
# conditional one (carrying resource_version) reports Conflict at once instead.
STALE_CACHE_RETRIES = 5

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def scoped_namespace(kind: type[Resource], namespace: str) -> str:
    """Cluster-scoped kinds (Namespace) live under namespace ``""`` whatever the caller says."""
    return namespace if kind.NAMESPACED else ""


def describe(kind: str, namespace: str, name: str) -> str:
    """``Flow default/build`` or ``Namespace ci`` for error messages."""
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


def describe_object(obj: Resource) -> str:
    return describe(obj.kind, obj.metadata.namespace, obj.metadata.name)


def matches_selector(labels: Mapping[str, str], selector: Mapping[str, str] | None) -> bool:
    """Exact label match: every ``key=value`` of the selector is among the labels."""
    if not selector:
        return True
    return all(labels.get(key) == value for key, value in selector.items())


def storage_wire(obj: Resource) -> dict[str, Any]:
    """The JSON a backend persists: no resource_version (the backend owns it) and, for
    cluster-scoped objects, no namespace (``""`` is not a valid namespace name on parse)."""
    wire = obj.to_wire()
    metadata = wire["metadata"]
    metadata.pop("resource_version", None)
    if not obj.metadata.namespace:
        metadata.pop("namespace", None)
    return wire


# Serialised specs by identity (each entry keeps its spec alive, so an id is never reused
# while cached). Status writes share the stored spec (``prepare_status_update``), and a Run's
# spec carries its flow's whole spec: serialising it once instead of on every step's write
# roughly halves a status write's serialisation time.
_SPEC_JSON_CACHE_SIZE = 1024
_spec_json: OrderedDict[int, tuple[BaseModel, str]] = OrderedDict()


def storage_json(obj: Resource) -> str:
    """:func:`storage_wire` as compact JSON text, serialised by pydantic (about three times
    cheaper than building the dict and encoding it with :mod:`json`), the spec from a cache."""
    excluded = {"resource_version"} if obj.metadata.namespace else {"resource_version", "namespace"}
    spec = obj.spec
    if not isinstance(spec, BaseModel):
        return obj.model_dump_json(by_alias=True, exclude_none=True, exclude={"metadata": excluded})
    head = obj.model_dump_json(
        by_alias=True, exclude_none=True, exclude={"metadata": excluded, "spec": True}
    )
    return f'{head[:-1]},"spec":{_cached_spec_json(spec)}}}'


def _cached_spec_json(spec: BaseModel) -> str:
    cached = _spec_json.get(id(spec))
    if cached is not None and cached[0] is spec:
        _spec_json.move_to_end(id(spec))
        return cached[1]
    text = spec.model_dump_json(by_alias=True, exclude_none=True)
    _spec_json[id(spec)] = (spec, text)
    if len(_spec_json) > _SPEC_JSON_CACHE_SIZE:
        _spec_json.popitem(last=False)
    return text


def from_storage_wire(kind: type[R], wire: Mapping[str, Any], resource_version: int) -> R:
    """Parse what :func:`storage_wire` wrote; a missing namespace means cluster-scoped."""
    return _stamped(kind.model_validate(wire), resource_version)


def from_storage_json(kind: type[R], text: str | bytes, resource_version: int) -> R:
    """:func:`from_storage_wire` straight from JSON text (pydantic parses it ~2x faster)."""
    return _stamped(kind.model_validate_json(text), resource_version)


def _stamped(obj: R, resource_version: int) -> R:
    cluster_scoped = "namespace" not in obj.metadata.model_fields_set
    metadata = obj.metadata.model_copy(
        update={
            "resource_version": str(resource_version),
            **({"namespace": ""} if cluster_scoped else {}),
        }
    )
    return obj.model_copy(update={"metadata": metadata})


def as_kind(kind: type[R], obj: Resource) -> R:
    """``obj`` as an instance of ``kind`` (objects parsed before their class was known are
    generic ``Resource`` models; they are re-validated once as the real kind)."""
    if isinstance(obj, kind):
        return obj
    version = int(obj.metadata.resource_version or 0)
    return from_storage_wire(kind, storage_wire(obj), version)


def _parse_version(value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise Invalid(
            f"{what}: resource_version {value!r} is not a version this store issued "
            "(a decimal number)",
            field="metadata.resource_version",
        ) from None


def check_version(current: Resource, expected: str | None) -> None:
    """Refuse a stale ``expected`` resource version (None means unconditional)."""
    if expected is None:
        return
    what = describe_object(current)
    if _parse_version(expected, what) != int(current.metadata.resource_version or 0):
        raise Conflict(
            f"{what}: resource_version {expected} is stale, the current one is "
            f"{current.metadata.resource_version}; re-read the object and retry"
        )


def prepare_create(obj: R, *, namespace: str, now: datetime) -> R:
    """The object as first stored: new uid, generation 1, creation time, caller's spec/status."""
    metadata = obj.metadata.model_copy(
        deep=True,
        update={
            "namespace": namespace,
            "uid": str(uuid.uuid4()),
            "generation": 1,
            "resource_version": None,
            "creation_timestamp": now,
            "deletion_timestamp": None,
        },
    )
    # A create writes every part of the object, so every part is copied (once per object, off
    # the per-step path): the caller may keep editing its own.
    return obj.model_copy(deep=True, update={"metadata": metadata})


def prepare_update(obj: R, current: R) -> R | None:
    """Labels, annotations, finalizers and spec from ``obj``, the rest from ``current``; None if
    unchanged.

    ``generation`` bumps only when the spec changed. Raises Conflict on a stale version, and
    while ``current`` is being deleted, on a spec change (Conflict) or an added finalizer
    (Invalid): then only removing finalizers (and editing labels/annotations) is allowed.
    """
    check_version(current, obj.metadata.resource_version)
    spec_changed = obj.spec != current.spec
    finalizers = obj.metadata.finalizers
    if (
        not spec_changed
        and obj.metadata.labels == current.metadata.labels
        and obj.metadata.annotations == current.metadata.annotations
        and finalizers == current.metadata.finalizers
    ):
        return None
    if current.metadata.deletion_timestamp is not None:
        _check_deleting_update(current, finalizers, spec_changed=spec_changed)
    metadata = current.metadata.model_copy(
        update={
            "labels": dict(obj.metadata.labels),
            "annotations": dict(obj.metadata.annotations),
            "finalizers": list(finalizers),
            "generation": current.metadata.generation + (1 if spec_changed else 0),
        }
    )
    # The spec is what this write takes from ``obj``: copied; the status stays ``current``'s.
    return current.model_copy(update={"metadata": metadata, "spec": copy.deepcopy(obj.spec)})


def _check_deleting_update(current: Resource, finalizers: list[str], *, spec_changed: bool) -> None:
    """What an update may not do to an object being deleted (Kubernetes' rules)."""
    what = describe_object(current)
    since = current.metadata.deletion_timestamp
    added = [name for name in finalizers if name not in current.metadata.finalizers]
    if added:
        raise Invalid(
            f"{what} is being deleted (since {since}): no new finalizers may be added "
            f"({', '.join(added)}); only removing finalizers is allowed",
            field="metadata.finalizers",
        )
    if spec_changed:
        raise Conflict(
            f"{what} is being deleted (since {since}): its spec can no longer change; as in "
            "Kubernetes, a deleting object only waits for its finalizers to be removed",
            field="spec",
        )


def finalized(obj: Resource) -> bool:
    """Deletion was requested and no finalizer is left: the object is to be removed."""
    return obj.metadata.deletion_timestamp is not None and not obj.metadata.finalizers


def prepare_delete(current: R, *, now: datetime) -> R | None:
    """``current`` marked for deletion when finalizers hold it; None when it can go at once.

    A second delete of an object already marked returns it unchanged (the caller writes
    nothing)."""
    if not current.metadata.finalizers:
        return None
    if current.metadata.deletion_timestamp is not None:
        return current
    metadata = current.metadata.model_copy(update={"deletion_timestamp": now})
    return current.model_copy(update={"metadata": metadata})


def prepare_status_update(obj: R, current: R) -> R | None:
    """``current`` with ``obj``'s status; None if the status is unchanged."""
    check_version(current, obj.metadata.resource_version)
    if obj.status == current.status:
        return None
    # Shared, not copied: the caller does not mutate what it passed (module docstring), and a
    # deep copy of every status write was most of a run step's store cost.
    return current.model_copy(update={"status": obj.status})


def with_version(obj: R, resource_version: int) -> R:
    metadata = obj.metadata.model_copy(update={"resource_version": str(resource_version)})
    return obj.model_copy(update={"metadata": metadata})


class StaleCache(Exception):
    """The backend refused a write because the cached base was stale; the cache is refreshed."""


class ObjectCache:
    """Current objects by kind, the store-wide resource version, and the recent events.

    Every change goes through :meth:`record`, which gives it a store-wide version strictly
    greater than the previous one (and at least the backend's own index for the change), keeps
    it in a bounded history (each MODIFIED/DELETED event with the object it replaced) and wakes
    watchers. Watchers resuming from a version older than the history's floor get Gone.
    """

    def __init__(self, history_size: int = DEFAULT_HISTORY_SIZE) -> None:
        if history_size < 1:
            raise ValueError(f"history_size must be at least 1, got {history_size}")
        self._objects: dict[str, dict[tuple[str, str], Resource]] = {}
        self._history: deque[WatchEvent] = deque()
        self._history_size = history_size
        self.resource_version = 0
        # Every event after this version is still in the history.
        self._floor = 0
        self._changed = asyncio.Event()
        self._closed = False

    def get(self, kind: str, namespace: str, name: str) -> Resource | None:
        return self._objects.get(kind, {}).get((namespace, name))

    def count(self, kind: str) -> int:
        return len(self._objects.get(kind, {}))

    def replace_quietly(self, obj: Resource) -> None:
        """Swap in an equivalent object (same version) without an event (a re-parsed kind)."""
        self._objects.setdefault(obj.kind, {})[obj.key] = obj

    def load(self, objects: Iterable[Resource], resource_version: int) -> None:
        """Fill the cache without events; watches can start from ``resource_version``."""
        for obj in objects:
            self.replace_quietly(obj)
        self.resource_version = max(self.resource_version, resource_version)
        self._floor = self.resource_version

    def record(self, event_type: WatchEventType, obj: Resource, at_least: int = 0) -> WatchEvent:
        version = max(self.resource_version + 1, at_least)
        table = self._objects.setdefault(obj.kind, {})
        # The replaced object rides along with the event (a reference, not a copy), so a watch
        # replayed from the history still knows what each change changed from.
        previous: Resource | None
        if event_type == "DELETED":
            previous = table.pop(obj.key, None)
            # As in Kubernetes, a deleted object carries the version of its deletion.
            obj = with_version(obj, version)
        else:
            previous = table.get(obj.key) if event_type == "MODIFIED" else None
            table[obj.key] = obj
        event = WatchEvent(type=event_type, object=obj, resource_version=version, previous=previous)
        self.resource_version = version
        self._history.append(event)
        if len(self._history) > self._history_size:
            self._floor = self._history.popleft().resource_version
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return event

    def list(
        self,
        kind: type[R],
        namespace: str | None,
        selector: Mapping[str, str] | None,
    ) -> ListResult[R]:
        items: list[R] = []
        table = self._objects.get(kind.KIND, {})
        for key, obj in table.items():
            if namespace is not None and obj.metadata.namespace != namespace:
                continue
            if not matches_selector(obj.metadata.labels, selector):
                continue
            typed = as_kind(kind, obj)
            if typed is not obj:
                table[key] = typed
            items.append(typed)
        return ListResult(items=items, resource_version=self.resource_version)

    def close(self) -> None:
        self._closed = True
        self._changed.set()

    def watch(
        self,
        kind: type[Resource] | None,
        namespace: str | None,
        since: int,
    ) -> AsyncGenerator[WatchEvent, None]:
        """Events after ``since`` (0: after now, fixed at this call, not at first iteration).

        Gone is raised at once for a ``since`` older than the history, and later if the
        consumer falls so far behind that events it has not seen leave the history.
        """
        cursor = since if since > 0 else self.resource_version
        self._check_kept(cursor)
        return self._events(kind, namespace, cursor)

    def _check_kept(self, cursor: int) -> None:
        if cursor < self._floor:
            raise Gone(
                f"resource version {cursor} is too old (the oldest kept is {self._floor}), re-list"
            )

    async def _events(
        self,
        kind: type[Resource] | None,
        namespace: str | None,
        cursor: int,
    ) -> AsyncGenerator[WatchEvent, None]:
        while not self._closed:
            self._check_kept(cursor)
            changed = self._changed
            pending: list[WatchEvent] = []
            for event in reversed(self._history):
                if event.resource_version <= cursor:
                    break
                pending.append(event)
            if not pending:
                await changed.wait()
                continue
            for event in reversed(pending):
                cursor = event.resource_version
                obj = event.object
                if kind is not None and obj.kind != kind.KIND:
                    continue
                if namespace is not None and obj.metadata.namespace != namespace:
                    continue
                if kind is not None and not isinstance(obj, kind):
                    previous = event.previous
                    yield WatchEvent(
                        event.type,
                        as_kind(kind, obj),
                        event.resource_version,
                        None if previous is None else as_kind(kind, previous),
                    )
                else:
                    yield event


class CachingStore(ABC):
    """The Store protocol over an :class:`ObjectCache`; backends make writes durable.

    Reads never leave memory. Writes compute the new object from the cached current one, hand
    it to the backend (which returns its resource version), then record it, so a caller reads
    its own writes at once.
    """

    def __init__(
        self,
        *,
        history_size: int = DEFAULT_HISTORY_SIZE,
        clock: Clock = utc_now,
        kinds: Iterable[type[Resource]] = (),
    ) -> None:
        self._cache = ObjectCache(history_size)
        self._clock = clock
        # The classes callers asked for, by lower-case kind: objects read from outside (nomad-vars)
        # are parsed as these; others stay generic ``Resource`` models until asked for.
        self._kinds: dict[str, type[Resource]] = {kind.KIND.lower(): kind for kind in kinds}

    @property
    def resource_version(self) -> int:
        return self._cache.resource_version

    def count(self, kind: type[Resource]) -> int:
        """How many objects of ``kind`` are stored (for metrics)."""
        return self._cache.count(kind.KIND)

    # ---- backend hooks ---------------------------------------------------------------------

    @abstractmethod
    async def _persist(self, obj: Resource, current: Resource | None) -> int:
        """Make ``obj`` durable (``current`` None: create). Returns its new resource version.

        Raises AlreadyExists/Conflict, or StaleCache after refreshing the cache.
        """

    @abstractmethod
    async def _erase(self, current: Resource) -> int:
        """Delete ``current``; returns the version of the delete. May raise StaleCache."""

    # ---- reads -----------------------------------------------------------------------------

    def _current(self, kind: type[R], namespace: str, name: str) -> R | None:
        self._kinds.setdefault(kind.KIND.lower(), kind)
        obj = self._cache.get(kind.KIND, scoped_namespace(kind, namespace), name)
        if obj is None:
            return None
        typed = as_kind(kind, obj)
        if typed is not obj:
            self._cache.replace_quietly(typed)
        return typed

    def _require(self, kind: type[R], namespace: str, name: str) -> R:
        current = self._current(kind, namespace, name)
        if current is None:
            raise NotFound(
                f"{describe(kind.KIND, scoped_namespace(kind, namespace), name)} not found"
            )
        return current

    async def get(self, kind: type[R], namespace: str, name: str) -> R:
        return self._require(kind, namespace, name)

    async def list(
        self,
        kind: type[R],
        namespace: str | None = None,
        selector: Mapping[str, str] | None = None,
    ) -> ListResult[R]:
        self._kinds.setdefault(kind.KIND.lower(), kind)
        scope = None if namespace is None else scoped_namespace(kind, namespace)
        return self._cache.list(kind, scope, selector)

    def watch(
        self,
        kind: type[Resource] | None = None,
        namespace: str | None = None,
        since: int = 0,
    ) -> AsyncGenerator[WatchEvent, None]:
        if kind is not None:
            self._kinds.setdefault(kind.KIND.lower(), kind)
        return self._cache.watch(kind, namespace, since)

    # ---- writes ----------------------------------------------------------------------------

    async def create(self, obj: R) -> R:
        kind = type(obj)
        namespace = scoped_namespace(kind, obj.metadata.namespace)
        for _ in range(STALE_CACHE_RETRIES):
            if self._current(kind, namespace, obj.metadata.name) is not None:
                raise AlreadyExists(
                    f"{describe(obj.kind, namespace, obj.metadata.name)} already exists"
                )
            new = prepare_create(obj, namespace=namespace, now=self._clock())
            try:
                version = await self._persist(new, None)
            except StaleCache:
                continue
            return self._record("ADDED", with_version(new, version), version)
        raise self._contended(obj)

    async def update(self, obj: R) -> R:
        """:func:`prepare_update`; an update removing the last finalizer of an object being
        deleted removes it (a DELETED event carrying the object as last written)."""
        return await self._write(obj, prepare_update)

    async def update_status(self, obj: R) -> R:
        return await self._write(obj, prepare_status_update)

    async def _write(self, obj: R, prepare: Callable[[R, R], R | None]) -> R:
        kind = type(obj)
        for _ in range(STALE_CACHE_RETRIES):
            current = self._require(kind, obj.metadata.namespace, obj.metadata.name)
            new = prepare(obj, current)
            if new is None:
                return current
            try:
                if finalized(new):
                    version = await self._erase(current)
                    return self._record("DELETED", with_version(new, version), version)
                version = await self._persist(new, current)
            except StaleCache:
                continue
            return self._record("MODIFIED", with_version(new, version), version)
        raise self._contended(obj)

    async def delete(
        self,
        kind: type[R],
        namespace: str,
        name: str,
        resource_version: str | None = None,
    ) -> R:
        """Remove the object, or only mark it (:func:`prepare_delete`) while finalizers hold it."""
        for _ in range(STALE_CACHE_RETRIES):
            current = self._require(kind, namespace, name)
            check_version(current, resource_version)
            marked = prepare_delete(current, now=self._clock())
            if marked is current:
                return current
            try:
                if marked is not None:
                    version = await self._persist(marked, current)
                    return self._record("MODIFIED", with_version(marked, version), version)
                version = await self._erase(current)
            except StaleCache:
                continue
            return self._record("DELETED", with_version(current, version), version)
        raise Conflict(
            f"{describe(kind.KIND, scoped_namespace(kind, namespace), name)} kept changing "
            "while being deleted; retry"
        )

    def _record(self, event_type: WatchEventType, obj: R, version: int) -> R:
        # A backend that follows its own changes (nomad-vars) may have recorded this write
        # already, while the write call was still returning: record each change once.
        known = self._current(type(obj), obj.metadata.namespace, obj.metadata.name)
        if event_type == "DELETED":
            if known is not None and int(known.metadata.resource_version or 0) <= version:
                self._cache.record(event_type, obj, at_least=version)
            return obj
        if known is not None and int(known.metadata.resource_version or 0) >= version:
            return known
        self._cache.record(event_type, obj, at_least=version)
        return obj

    @staticmethod
    def _contended(obj: Resource) -> Conflict:
        return Conflict(f"{describe_object(obj)} kept changing while being written; retry")

    @abstractmethod
    async def start(self) -> None:
        """Fill the cache and start following the backend; returns once reads are served."""

    async def close(self) -> None:
        self._cache.close()


__all__ = [
    "DEFAULT_HISTORY_SIZE",
    "CachingStore",
    "Clock",
    "ObjectCache",
    "StaleCache",
    "as_kind",
    "check_version",
    "describe",
    "describe_object",
    "finalized",
    "from_storage_wire",
    "matches_selector",
    "prepare_create",
    "prepare_delete",
    "prepare_status_update",
    "prepare_update",
    "scoped_namespace",
    "storage_json",
    "storage_wire",
    "utc_now",
    "with_version",
]
