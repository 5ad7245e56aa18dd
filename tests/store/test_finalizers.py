"""Finalizers in the Store contract, over every backend (memory, and nomad-vars on the dev agent).

Deleting an object that has finalizers only marks it (``deletion_timestamp``); the update that
removes the last finalizer removes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import pytest

from nomad_pipeline.errors import Conflict, Invalid, NotFound
from nomad_pipeline.resources.kinds import Flow, Namespace
from nomad_pipeline.store.core import CachingStore
from nomad_pipeline.store.interface import WatchEvent

StoreFactory = Callable[..., Awaitable[CachingStore]]
WAIT_SECONDS = 10.0
CLEANUP = "example.com/cleanup"
AUDIT = "example.com/audit"


def make_flow(
    *,
    run: str = "make build",
    finalizers: list[str] | None = None,
    labels: dict[str, str] | None = None,
) -> Flow:
    return Flow.model_validate(
        {
            "metadata": {
                "name": "build",
                "namespace": "default",
                "finalizers": finalizers or [],
                "labels": labels or {},
            },
            "spec": {"inline": {"steps": [{"name": "build", "run": run}]}},
        }
    )


def without_finalizers(flow: Flow, *removed: str) -> Flow:
    kept = [name for name in flow.metadata.finalizers if name not in removed]
    return flow.model_copy(
        update={"metadata": flow.metadata.model_copy(update={"finalizers": kept})}
    )


async def take(events: AsyncIterator[WatchEvent], count: int) -> list[WatchEvent]:
    async with asyncio.timeout(WAIT_SECONDS):
        return [await anext(events) for _ in range(count)]


async def test_delete_of_an_object_with_finalizers_marks_it_once(store: CachingStore) -> None:
    created = await store.create(make_flow(finalizers=[CLEANUP]))
    assert created.metadata.finalizers == [CLEANUP]
    assert created.metadata.deletion_timestamp is None

    marked = await store.delete(Flow, "default", "build", created.metadata.resource_version)

    assert marked.metadata.deletion_timestamp is not None
    assert marked.metadata.deleting
    assert int(marked.metadata.resource_version or 0) > int(created.metadata.resource_version or 0)
    assert marked.metadata.finalizers == [CLEANUP]
    stored = await store.get(Flow, "default", "build")
    assert stored.to_wire() == marked.to_wire()
    assert stored.to_wire()["metadata"]["deletion_timestamp"]
    # A second delete changes nothing (same time, same version); a stale one is still refused.
    again = await store.delete(Flow, "default", "build")
    assert again.to_wire() == marked.to_wire()
    with pytest.raises(Conflict, match="stale"):
        await store.delete(Flow, "default", "build", created.metadata.resource_version)


async def test_removing_the_last_finalizer_deletes_the_object(store: CachingStore) -> None:
    await store.create(make_flow(finalizers=[CLEANUP, AUDIT]))
    marked = await store.delete(Flow, "default", "build")

    # One finalizer left: still stored, still being deleted.
    partly = await store.update(without_finalizers(marked, CLEANUP))
    assert partly.metadata.finalizers == [AUDIT]
    assert partly.metadata.deletion_timestamp == marked.metadata.deletion_timestamp
    assert (await store.get(Flow, "default", "build")).metadata.finalizers == [AUDIT]

    removed = await store.update(without_finalizers(partly, AUDIT))

    assert removed.metadata.finalizers == []
    assert removed.metadata.deletion_timestamp == marked.metadata.deletion_timestamp
    with pytest.raises(NotFound):
        await store.get(Flow, "default", "build")
    assert (await store.list(Flow)).items == []
    recreated = await store.create(make_flow())
    assert recreated.metadata.uid != marked.metadata.uid
    assert recreated.metadata.deletion_timestamp is None


async def test_removing_finalizers_before_a_delete_only_updates(store: CachingStore) -> None:
    created = await store.create(make_flow(finalizers=[CLEANUP]))

    updated = await store.update(without_finalizers(created, CLEANUP))

    assert updated.metadata.finalizers == []
    assert (await store.get(Flow, "default", "build")).metadata.finalizers == []
    deleted = await store.delete(Flow, "default", "build")
    assert deleted.metadata.deletion_timestamp is None
    with pytest.raises(NotFound):
        await store.get(Flow, "default", "build")


async def test_a_deleting_object_takes_no_new_finalizers_and_no_spec_change(
    store: CachingStore,
) -> None:
    await store.create(make_flow(finalizers=[CLEANUP]))
    marked = await store.delete(Flow, "default", "build")

    added = marked.model_copy(
        update={"metadata": marked.metadata.model_copy(update={"finalizers": [CLEANUP, AUDIT]})}
    )
    with pytest.raises(
        Invalid, match=r"being deleted .*no new finalizers .*example.com/audit"
    ) as raised:
        await store.update(added)
    assert raised.value.field == "metadata.finalizers"
    respecced = make_flow(run="make v2", finalizers=[CLEANUP])
    with pytest.raises(Conflict, match=r"being deleted .*spec can no longer change") as refused:
        await store.update(respecced)
    assert refused.value.field == "spec"

    # Status writes and label edits go on; the deletion mark cannot be cleared by an update.
    status = marked.status.model_copy(update={"observed_generation": 1})
    with_status = await store.update_status(marked.model_copy(update={"status": status}))
    assert with_status.metadata.deleting
    cleared = with_status.metadata.model_copy(
        update={"deletion_timestamp": None, "labels": {"team": "a"}}
    )
    relabelled = await store.update(with_status.model_copy(update={"metadata": cleared}))
    assert relabelled.metadata.labels == {"team": "a"}
    assert relabelled.metadata.deletion_timestamp == marked.metadata.deletion_timestamp
    stored = await store.get(Flow, "default", "build")
    assert stored.spec.inline is not None
    assert stored.spec.inline.steps[0].run == "make build"
    assert stored.metadata.finalizers == [CLEANUP]


async def test_create_ignores_a_deletion_timestamp_from_the_caller(store: CachingStore) -> None:
    flow = make_flow(finalizers=[CLEANUP])
    flow = flow.model_copy(
        update={
            "metadata": flow.metadata.model_copy(
                update={"deletion_timestamp": datetime(2020, 1, 1, tzinfo=UTC)}
            )
        }
    )

    created = await store.create(flow)

    assert created.metadata.deletion_timestamp is None
    assert (await store.get(Flow, "default", "build")).metadata.deletion_timestamp is None


async def test_watch_sees_the_mark_then_the_removal(store: CachingStore) -> None:
    # Another kind's write first: ``since=0`` would mean "from now", not "from the start".
    await store.create(Namespace.model_validate({"metadata": {"name": "ci"}}))
    before = store.resource_version
    live = store.watch(Flow, since=before)
    created = await store.create(make_flow(finalizers=[CLEANUP]))
    marked = await store.delete(Flow, "default", "build")
    await store.update(without_finalizers(marked, CLEANUP))

    for events in (await take(live, 3), await take(store.watch(Flow, since=before), 3)):
        assert [event.type for event in events] == ["ADDED", "MODIFIED", "DELETED"]
        assert events[1].previous is created
        assert events[1].object.metadata.deletion_timestamp is not None
        assert events[2].object.metadata.finalizers == []
        assert events[2].object.metadata.deletion_timestamp == marked.metadata.deletion_timestamp
        assert int(events[2].object.metadata.resource_version or 0) == events[2].resource_version
