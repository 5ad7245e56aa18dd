"""The in-memory store (the seed's ``--state-backend=dev``): nothing survives the process.

Objects are kept as parsed models and handed out shared (see :mod:`nomad_pipeline.store.core`
for the immutability rule), so a list of 10,000 objects costs one pass over a dict. Resource
versions come from one store-wide counter.
"""

from __future__ import annotations

from nomad_pipeline.resources.meta import Resource
from nomad_pipeline.store.core import DEFAULT_HISTORY_SIZE, CachingStore, Clock, utc_now


class MemoryStore(CachingStore):
    def __init__(self, *, history_size: int = DEFAULT_HISTORY_SIZE, clock: Clock = utc_now) -> None:
        super().__init__(history_size=history_size, clock=clock)

    async def start(self) -> None:
        """Nothing to load: the cache is the only copy."""

    async def _persist(self, obj: Resource, current: Resource | None) -> int:
        # The cache is the only copy: a write is durable once recorded with the next version,
        # and nothing can interleave between the caller's checks and the record (no await).
        return self.resource_version + 1

    async def _erase(self, current: Resource) -> int:
        return self.resource_version + 1
