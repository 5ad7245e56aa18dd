"""The nomad-vars store: one Nomad Variable per object, an in-memory cache, blocking-query sync.

Layout: ``<prefix>/<kind-lower>/<namespace or _cluster>/<name>`` in one Nomad namespace, with
``Items = {"object": <the object's JSON>}``. A variable path allows neither ``.`` nor more than
128 bytes, so dots in names are written as ``~`` and a segment that would not fit is replaced by
``~<hash>`` (names never contain ``~``, so neither form collides with a real name). The key of an
object is always read back from its JSON, never from the path.

``ModifyIndex`` is the object's resource_version. Creates write with ``cas=0``, updates and
deletes with ``cas=<cached ModifyIndex>``; a 409 refreshes the cached object, after which a
conditional write reports Conflict and an unconditional one is recomputed from the fresh copy.

``start()`` lists every variable under the prefix and fetches them concurrently, then one task
follows ``/v1/vars?prefix=`` with blocking queries: when a path's ModifyIndex moved past the
cached one it fetches that one variable; when a path vanished it records the deletion. Reads and
lists never reach Nomad; our own writes update the cache from the write's answer at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Iterable, Sequence

from pydantic import ValidationError

from nomad_pipeline.errors import Invalid, NomadPipelineError, NotFound, TooLarge
from nomad_pipeline.nomad.client import JSON, NomadClient, VariableConflict
from nomad_pipeline.resources.meta import Resource
from nomad_pipeline.resources.registry import KINDS
from nomad_pipeline.store.core import (
    DEFAULT_HISTORY_SIZE,
    CachingStore,
    Clock,
    StaleCache,
    describe_object,
    from_storage_json,
    storage_json,
    utc_now,
)

logger = logging.getLogger(__name__)

OBJECT_ITEM = "object"
CLUSTER_SEGMENT = "_cluster"
# Nomad's limits: a variable's keys plus values, and a variable path.
MAX_VARIABLE_BYTES = 64 * 1024
MAX_PATH_BYTES = 128
_PATH_PATTERN = re.compile(r"^[a-zA-Z0-9_~/-]{1,128}$")
_HASH_LENGTH = 32

DEFAULT_FETCH_CONCURRENCY = 32
DEFAULT_POLL_WAIT = "5m"
# Each sync pass lists every variable under the prefix (10,000 objects: ~1.5 MB). Under a
# stream of writes the blocking query would return at once every time; spacing passes at least
# this far apart coalesces bursts. Our own writes reach the cache at once regardless; only other
# writers' changes wait up to this long.
DEFAULT_MIN_SYNC_INTERVAL = 0.2
RETRY_DELAY_SECONDS = 0.2
RETRY_DELAY_MAX_SECONDS = 5.0


def _hashed(value: str) -> str:
    return "~" + hashlib.sha256(value.encode()).hexdigest()[:_HASH_LENGTH]


class NomadVarsStore(CachingStore):
    """Objects as Nomad Variables in ``namespace`` under ``prefix``.

    ``kinds`` are the classes objects read from Nomad are parsed as (default: every registered
    kind); an object of another kind is held as a generic ``Resource`` until the first call that
    names its class. ``wait_synced(index)`` returns once other writers' changes up to ``index``
    are in the cache.
    """

    def __init__(
        self,
        client: NomadClient,
        *,
        namespace: str = "default",
        prefix: str = "nomad-pipeline",
        kinds: Iterable[type[Resource]] = KINDS.values(),
        history_size: int = DEFAULT_HISTORY_SIZE,
        clock: Clock = utc_now,
        fetch_concurrency: int = DEFAULT_FETCH_CONCURRENCY,
        poll_wait: str = DEFAULT_POLL_WAIT,
        min_sync_interval: float = DEFAULT_MIN_SYNC_INTERVAL,
    ) -> None:
        super().__init__(history_size=history_size, clock=clock, kinds=kinds)
        prefix = prefix.strip("/")
        if not _PATH_PATTERN.match(prefix) or prefix == "nomad" or prefix.startswith("nomad/"):
            raise Invalid(
                f"nomad-vars prefix {prefix!r} must be a Nomad variable path (letters, digits, "
                "'-', '_', '~', '/') outside the reserved 'nomad/' tree"
            )
        if fetch_concurrency < 1:
            raise Invalid(f"fetch_concurrency must be at least 1, got {fetch_concurrency}")
        self._client = client
        self._namespace = namespace
        self._prefix = prefix
        self._fetch_concurrency = fetch_concurrency
        self._poll_wait = poll_wait
        self._min_sync_interval = min_sync_interval
        # Variable path → (kind, namespace, name) of the cached object it holds.
        self._keys: dict[str, tuple[str, str, str]] = {}
        # Paths we deleted, with the delete's index: an older copy fetched by a sync that raced
        # the delete must not bring the object back.
        self._tombstones: dict[str, int] = {}
        # Paths with one of our writes in flight: a sync pass that lists such a write before its
        # answer is recorded must not fetch and re-parse it (the writer records it at once; a
        # write that lost to another writer's gets a 409, which refreshes the path).
        self._writing: dict[str, int] = {}
        self._follower: asyncio.Task[None] | None = None
        # Signalled after every sync pass, so callers (tests, readiness) can wait for the cache.
        self.synced_index = 0
        self._synced = asyncio.Condition()

    # ---- layout ----------------------------------------------------------------------------

    def variable_path(self, obj: Resource) -> str:
        """Where ``obj`` is stored (raises Invalid if even the hashed form is too long)."""
        namespace, name = obj.metadata.namespace, obj.metadata.name
        head = f"{self._prefix}/{obj.kind.lower()}"
        namespace_segment = namespace.replace(".", "~") if namespace else CLUSTER_SEGMENT
        path = f"{head}/{namespace_segment}/{name.replace('.', '~')}"
        if len(path) > MAX_PATH_BYTES:
            path = f"{head}/{namespace_segment}/{_hashed(name)}"
        if len(path) > MAX_PATH_BYTES and namespace:
            path = f"{head}/{_hashed(namespace)}/{_hashed(name)}"
        if len(path) > MAX_PATH_BYTES:
            raise Invalid(
                f"{describe_object(obj)} cannot be stored: its Nomad variable path {path!r} is "
                f"longer than {MAX_PATH_BYTES} bytes (shorten the store prefix {self._prefix!r})"
            )
        return path

    def _items(self, obj: Resource) -> dict[str, str]:
        text = storage_json(obj)
        size = len(OBJECT_ITEM) + len(text.encode())
        if size > MAX_VARIABLE_BYTES:
            raise TooLarge(
                f"{describe_object(obj)} is {size} bytes as JSON, more than the "
                f"{MAX_VARIABLE_BYTES} bytes a Nomad variable holds; it was not stored"
            )
        return {OBJECT_ITEM: text}

    def _kind_of(self, variable: JSON) -> type[Resource]:
        """The class for a variable's path (``<prefix>/flow/...`` → Flow), generic if unknown."""
        segment = str(variable.get("Path", ""))[len(self._prefix) + 1 :].split("/", 1)[0]
        return self._kinds.get(segment, Resource)

    def _decode(self, variable: JSON) -> Resource | None:
        """The object a variable holds, or None (logged) when it is not one of ours."""
        path = variable.get("Path", "")
        try:
            text = (variable.get("Items") or {})[OBJECT_ITEM]
            kind = self._kind_of(variable)
            obj: Resource = from_storage_json(kind, text, int(variable["ModifyIndex"]))
        except (KeyError, TypeError, ValueError, AttributeError, ValidationError) as error:
            logger.warning(
                "skipping a Nomad variable that does not hold a valid object",
                extra={"path": path, "namespace": self._namespace, "error": str(error)},
            )
            return None
        return obj

    # ---- CachingStore hooks ----------------------------------------------------------------

    async def _persist(self, obj: Resource, current: Resource | None) -> int:
        path = self.variable_path(obj)
        items = self._items(obj)
        cas = 0 if current is None else int(current.metadata.resource_version or 0)
        self._writing[path] = self._writing.get(path, 0) + 1
        try:
            variable = await self._client.put_variable(
                path, items, namespace=self._namespace, cas=cas
            )
        except VariableConflict as conflict:
            self._done_writing(path)
            await self._refresh(path, conflict.current)
            raise StaleCache(path) from conflict
        except BaseException:
            self._done_writing(path)
            raise
        # The caller records the write as soon as this returns, without awaiting in between.
        self._done_writing(path)
        self._keys[path] = (obj.kind, obj.metadata.namespace, obj.metadata.name)
        return int(variable["ModifyIndex"])

    def _done_writing(self, path: str) -> None:
        remaining = self._writing.pop(path, 1) - 1
        if remaining:
            self._writing[path] = remaining

    async def _erase(self, current: Resource) -> int:
        path = self.variable_path(current)
        cas = int(current.metadata.resource_version or 0)
        try:
            index = await self._client.delete_variable(path, namespace=self._namespace, cas=cas)
        except VariableConflict as conflict:
            await self._refresh(path, conflict.current)
            raise StaleCache(path) from conflict
        self._tombstones[path] = index
        self._keys.pop(path, None)
        return index

    async def _refresh(self, path: str, current: JSON) -> None:
        """Bring one path's cached object up to what Nomad holds after a refused write."""
        variable: JSON | None = current
        if int(current.get("ModifyIndex", 0)) == 0:
            variable = None
        elif not current.get("Items"):
            # The conflict body leaves Items out when the token may not read them.
            variable = await self._fetch(path)
        if variable is None:
            self._forget(path, at_least=0)
        else:
            self._apply(variable)

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load every object under the prefix, then follow changes in the background."""
        if self._follower is not None:
            return
        metadata, index = await self._client.list_variables(
            f"{self._prefix}/", namespace=self._namespace
        )
        variables = await self._fetch_all([str(item["Path"]) for item in metadata])
        objects: list[Resource] = []
        highest = index
        for variable in variables:
            obj = self._decode(variable)
            if obj is None:
                continue
            objects.append(obj)
            self._keys[variable["Path"]] = (obj.kind, obj.metadata.namespace, obj.metadata.name)
            highest = max(highest, int(variable["ModifyIndex"]))
        self._cache.load(objects, highest)
        self.synced_index = index
        self._follower = asyncio.create_task(self._follow(index), name="nomad-vars-store-follow")
        logger.info(
            "nomad-vars store loaded",
            extra={"objects": len(objects), "index": index, "prefix": self._prefix},
        )

    async def close(self) -> None:
        follower, self._follower = self._follower, None
        if follower is not None:
            follower.cancel()
            try:
                await follower
            except asyncio.CancelledError:
                # The follower's own cancellation ends here; ours (close() cancelled) goes on.
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        await super().close()

    async def wait_synced(self, index: int) -> None:
        """Return once a sync pass has covered Nomad index ``index`` (e.g. another's write)."""
        async with self._synced:
            await self._synced.wait_for(lambda: self.synced_index >= index)

    # ---- following Nomad -------------------------------------------------------------------

    async def _follow(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        delay = RETRY_DELAY_SECONDS
        last_pass = loop.time()
        while True:
            remaining = self._min_sync_interval - (loop.time() - last_pass)
            if remaining > 0:
                await asyncio.sleep(remaining)
            last_pass = loop.time()
            try:
                metadata, new_index = await self._client.list_variables(
                    f"{self._prefix}/",
                    namespace=self._namespace,
                    index=index,
                    wait=self._poll_wait,
                )
                await self._sync(metadata, new_index)
            except NomadPipelineError as error:
                logger.warning(
                    "nomad-vars store could not follow Nomad; retrying",
                    extra={"error": str(error), "retry_in": delay},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_DELAY_MAX_SECONDS)
                continue
            except (KeyError, TypeError, ValueError):
                # A malformed answer must not end the follower: the cache would silently freeze.
                logger.exception(
                    "nomad-vars store got an unexpected answer from Nomad; retrying",
                    extra={"retry_in": delay},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_DELAY_MAX_SECONDS)
                continue
            delay = RETRY_DELAY_SECONDS
            # An index that went backwards (a restarted or replaced cluster) starts over.
            index = new_index if new_index >= index else 0

    async def _sync(self, metadata: Sequence[JSON], index: int) -> None:
        listed = {str(item["Path"]): int(item["ModifyIndex"]) for item in metadata}
        changed = [
            path
            for path, modify_index in listed.items()
            if modify_index > self._cached_version(path)
            and modify_index > self._tombstones.get(path, 0)
            and path not in self._writing
        ]
        for variable in await self._fetch_all(changed):
            self._apply(variable)
        for path in [path for path in self._keys if path not in listed]:
            # Only objects this list could have seen: a write newer than the list stays.
            if self._cached_version(path) <= index:
                self._forget(path, at_least=index)
        self._tombstones = {
            path: deleted_at for path, deleted_at in self._tombstones.items() if deleted_at > index
        }
        async with self._synced:
            self.synced_index = max(self.synced_index, index)
            self._synced.notify_all()

    def _cached_version(self, path: str) -> int:
        key = self._keys.get(path)
        obj = None if key is None else self._cache.get(*key)
        return 0 if obj is None else int(obj.metadata.resource_version or 0)

    def _apply(self, variable: JSON) -> None:
        path = str(variable.get("Path", ""))
        modify_index = int(variable.get("ModifyIndex", 0))
        if modify_index <= self._tombstones.get(path, 0):
            return
        obj = self._decode(variable)
        if obj is None:
            return
        known = self._cache.get(obj.kind, obj.metadata.namespace, obj.metadata.name)
        if known is not None and int(known.metadata.resource_version or 0) >= modify_index:
            return
        self._keys[path] = (obj.kind, obj.metadata.namespace, obj.metadata.name)
        self._cache.record("ADDED" if known is None else "MODIFIED", obj, at_least=modify_index)

    def _forget(self, path: str, *, at_least: int) -> None:
        key = self._keys.pop(path, None)
        known = None if key is None else self._cache.get(*key)
        if known is None:
            return
        version = int(known.metadata.resource_version or 0)
        self._tombstones[path] = max(self._tombstones.get(path, 0), version)
        self._cache.record("DELETED", known, at_least=at_least)

    async def _fetch(self, path: str) -> JSON | None:
        try:
            return await self._client.get_variable(path, namespace=self._namespace)
        except NotFound:
            return None

    async def _fetch_all(self, paths: Sequence[str]) -> list[JSON]:
        """Fetch variables with at most ``fetch_concurrency`` requests in flight."""
        results: list[JSON | None] = [None] * len(paths)
        positions = iter(range(len(paths)))

        async def worker() -> None:
            for position in positions:
                results[position] = await self._fetch(paths[position])

        async with asyncio.TaskGroup() as group:
            for number in range(min(self._fetch_concurrency, len(paths))):
                group.create_task(worker(), name=f"nomad-vars-fetch-{number}")
        return [variable for variable in results if variable is not None]


__all__ = ["MAX_VARIABLE_BYTES", "NomadVarsStore"]
