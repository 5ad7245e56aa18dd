"""The one object-store interface every backend implements.

Semantics follow the Kubernetes API server:
- ``resource_version`` is an opaque string (a decimal index here) that changes on every write of
  an object; list and watch use the store-wide version so a watch can resume after a list.
- ``create`` sets uid, generation=1, resource_version and creation_timestamp, and refuses a name
  that is taken (AlreadyExists).
- ``update`` replaces metadata (labels, annotations, finalizers) and spec; it bumps
  ``generation`` only when the spec changed and keeps the stored status. ``update_status``
  replaces status only. Both refuse a stale ``metadata.resource_version`` with Conflict (a None
  version means "unconditional").
- ``delete`` refuses a stale resource_version with Conflict, raises NotFound when absent.
- Finalizers (as in Kubernetes): ``delete`` of an object whose ``metadata.finalizers`` is not
  empty does not remove it: it sets ``metadata.deletion_timestamp`` (a MODIFIED event, a new
  resource_version) and returns the object; deleting it again returns it unchanged. An
  ``update`` that leaves ``finalizers`` empty on such an object removes it (a DELETED event; the
  update returns the object as last written). While it is being deleted, an update may not add
  finalizers (Invalid, field ``metadata.finalizers``) nor change the spec (Conflict); status
  writes go on as before. ``deletion_timestamp`` is server-owned: ``create`` clears it and
  ``update`` keeps the stored one.
- ``watch`` yields ADDED/MODIFIED/DELETED events after ``since``; a ``since`` older than what the
  backend keeps raises Gone ("expired, re-list"). MODIFIED and DELETED events carry the object as
  it was before the change in ``previous`` when the backend knows it (a label-selector watch
  needs it to tell an object leaving the selection from one that never was in it).
- An update that changes nothing (same spec, labels and annotations; or the same status) writes
  nothing and returns the stored object with its unchanged resource_version.

Models are immutable by convention. Objects returned by a store are shared with it, not copies:
never mutate them; derive a changed object with ``obj.model_copy(update=...)`` (``deep=True``
before editing nested values). Objects passed to ``create``/``update``/``update_status`` must not
be mutated afterwards either: ``create`` copies the whole object and ``update`` the spec it
takes, but ``update_status`` shares the given status with the stored object (no copy per write).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar

from nomad_pipeline.resources.meta import Resource

R = TypeVar("R", bound=Resource)

WatchEventType = Literal["ADDED", "MODIFIED", "DELETED"]


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: WatchEventType
    object: Resource
    # The store-wide resource version after this event; resume a watch from it.
    resource_version: int
    # MODIFIED/DELETED: the object as stored before this change (shared, not a copy); None for
    # ADDED, and when the backend did not hold the object before.
    previous: Resource | None = None


@dataclass(frozen=True, slots=True)
class ListResult(Generic[R]):
    items: list[R]
    resource_version: int


class Store(Protocol):
    async def get(self, kind: type[R], namespace: str, name: str) -> R: ...

    async def list(
        self,
        kind: type[R],
        namespace: str | None = None,
        selector: Mapping[str, str] | None = None,
    ) -> ListResult[R]:
        """``namespace=None`` lists every namespace; ``selector`` matches labels exactly."""
        ...

    async def create(self, obj: R) -> R: ...

    async def update(self, obj: R) -> R: ...

    async def update_status(self, obj: R) -> R: ...

    async def delete(
        self, kind: type[R], namespace: str, name: str, resource_version: str | None = None
    ) -> R:
        """The deleted object, or, when finalizers hold it, the object marked for deletion
        (``metadata.deletion_timestamp`` set; it is still stored)."""
        ...

    def watch(
        self,
        kind: type[Resource] | None = None,
        namespace: str | None = None,
        since: int = 0,
    ) -> AsyncGenerator[WatchEvent, None]:
        """Events after ``since`` (0 = from now, fixed when called).

        Raises Gone at once when ``since`` is older than the kept history, and during
        iteration when the consumer falls behind by more than the history holds.
        """
        ...

    async def start(self) -> None:
        """Fill caches and start background watches; returns once reads are served."""
        ...

    async def close(self) -> None: ...
