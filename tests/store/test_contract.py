"""The Store contract, run over every backend (memory, and nomad-vars on the dev agent)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from nomad_pipeline.errors import AlreadyExists, Conflict, Gone, NotFound
from nomad_pipeline.resources.kinds import Flow, Namespace, Run
from nomad_pipeline.store.core import CachingStore
from nomad_pipeline.store.interface import WatchEvent

StoreFactory = Callable[..., Awaitable[CachingStore]]
WAIT_SECONDS = 10.0


def make_flow(
    name: str = "build",
    namespace: str = "default",
    *,
    run: str = "make build",
    labels: dict[str, str] | None = None,
) -> Flow:
    return Flow.model_validate(
        {
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
            "spec": {"inline": {"steps": [{"name": "build", "run": run}]}},
        }
    )


def make_run(name: str, flow: Flow, namespace: str = "default") -> Run:
    return Run.model_validate(
        {
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"flow": flow.metadata.name, "flow_spec": flow.spec.model_dump()},
        }
    )


async def take(events: AsyncIterator[WatchEvent], count: int) -> list[WatchEvent]:
    async with asyncio.timeout(WAIT_SECONDS):
        return [await anext(events) for _ in range(count)]


def summary(events: list[WatchEvent]) -> list[tuple[str, str, str]]:
    return [(e.type, e.object.kind, e.object.metadata.name) for e in events]


async def test_create_sets_server_fields_and_round_trips(store: CachingStore) -> None:
    created = await store.create(make_flow(labels={"team": "a"}))

    assert created.metadata.uid
    assert created.metadata.generation == 1
    assert created.metadata.creation_timestamp is not None
    assert int(created.metadata.resource_version or 0) > 0
    fetched = await store.get(Flow, "default", "build")
    assert isinstance(fetched, Flow)
    assert fetched.to_wire() == created.to_wire()
    assert fetched.spec.inline is not None
    assert fetched.spec.inline.steps[0].run == "make build"


async def test_create_of_a_taken_name_is_already_exists(store: CachingStore) -> None:
    await store.create(make_flow())

    with pytest.raises(AlreadyExists, match="Flow default/build already exists"):
        await store.create(make_flow(run="other"))


async def test_get_of_a_missing_object_is_not_found(store: CachingStore) -> None:
    with pytest.raises(NotFound, match="Flow default/nope not found"):
        await store.get(Flow, "default", "nope")


async def test_generation_bumps_on_spec_change_only(store: CachingStore) -> None:
    created = await store.create(make_flow())

    relabelled = await store.update(
        created.model_copy(
            update={"metadata": created.metadata.model_copy(update={"labels": {"team": "b"}})}
        )
    )
    assert relabelled.metadata.generation == 1
    assert relabelled.metadata.labels == {"team": "b"}
    assert int(relabelled.metadata.resource_version or 0) > int(
        created.metadata.resource_version or 0
    )

    respecced = await store.update(
        make_flow(run="make all", labels={"team": "b"}).model_copy(
            update={"metadata": relabelled.metadata}
        )
    )
    assert respecced.metadata.generation == 2
    assert respecced.metadata.uid == created.metadata.uid
    assert respecced.metadata.creation_timestamp == created.metadata.creation_timestamp
    assert (await store.get(Flow, "default", "build")).to_wire() == respecced.to_wire()


async def test_an_unchanged_update_writes_nothing(store: CachingStore) -> None:
    created = await store.create(make_flow())

    same = await store.update(make_flow())

    assert same.metadata.resource_version == created.metadata.resource_version
    assert store.resource_version == int(created.metadata.resource_version or 0)


async def test_update_keeps_status_and_update_status_keeps_spec(store: CachingStore) -> None:
    created = await store.create(make_flow())
    status = created.status.model_copy(update={"observed_generation": 1})

    with_status = await store.update_status(created.model_copy(update={"status": status}))
    assert with_status.status.observed_generation == 1
    assert with_status.metadata.generation == 1

    # An update carrying an empty status (as apply sends) keeps the stored status.
    updated = await store.update(make_flow(run="make all"))
    assert updated.status.observed_generation == 1
    assert updated.metadata.generation == 2

    # A status write carrying another spec changes only the status.
    stray = make_flow(run="ignored").model_copy(update={"status": created.status})
    status_only = await store.update_status(stray)
    assert status_only.status.observed_generation == 0
    assert status_only.spec == updated.spec


async def test_stale_resource_version_is_a_conflict(store: CachingStore) -> None:
    created = await store.create(make_flow())
    await store.update(make_flow(run="make v2"))
    stale = make_flow(run="make v3").model_copy(update={"metadata": created.metadata})

    with pytest.raises(Conflict, match=r"Flow default/build: resource_version .* is stale"):
        await store.update(stale)
    with pytest.raises(Conflict, match="stale"):
        await store.update_status(stale)
    with pytest.raises(Conflict, match="stale"):
        await store.delete(Flow, "default", "build", created.metadata.resource_version)
    assert (await store.get(Flow, "default", "build")).spec.inline.steps[0].run == "make v2"  # type: ignore[union-attr]


async def test_update_and_delete_of_missing_objects_are_not_found(store: CachingStore) -> None:
    with pytest.raises(NotFound):
        await store.update(make_flow())
    with pytest.raises(NotFound):
        await store.delete(Flow, "default", "build")


async def test_delete_removes_and_returns_the_object(store: CachingStore) -> None:
    created = await store.create(make_flow())

    deleted = await store.delete(Flow, "default", "build", created.metadata.resource_version)

    assert deleted.metadata.uid == created.metadata.uid
    with pytest.raises(NotFound):
        await store.get(Flow, "default", "build")
    assert (await store.list(Flow)).items == []
    recreated = await store.create(make_flow())
    assert recreated.metadata.uid != created.metadata.uid


async def test_list_by_namespace_and_label_selector(store: CachingStore) -> None:
    await store.create(make_flow("a", labels={"team": "x", "tier": "1"}))
    await store.create(make_flow("b", labels={"team": "y"}))
    await store.create(make_flow("c", "ci", labels={"team": "x"}))

    def names(items: list[Flow]) -> set[str]:
        return {f"{f.metadata.namespace}/{f.metadata.name}" for f in items}

    assert names((await store.list(Flow)).items) == {"default/a", "default/b", "ci/c"}
    assert names((await store.list(Flow, "default")).items) == {"default/a", "default/b"}
    assert names((await store.list(Flow, None, {"team": "x"})).items) == {"default/a", "ci/c"}
    assert names((await store.list(Flow, None, {"team": "x", "tier": "1"})).items) == {"default/a"}
    assert (await store.list(Flow, "default", {"team": "z"})).items == []
    listed = await store.list(Flow)
    assert listed.resource_version == store.resource_version


async def test_cluster_scoped_kinds_live_in_the_empty_namespace(store: CachingStore) -> None:
    created = await store.create(
        Namespace.model_validate({"metadata": {"name": "ci"}, "spec": {"description": "CI"}})
    )

    assert created.metadata.namespace == ""
    fetched = await store.get(Namespace, "whatever", "ci")
    assert fetched.spec.description == "CI"
    assert fetched.metadata.namespace == ""
    assert [n.metadata.name for n in (await store.list(Namespace)).items] == ["ci"]
    await store.delete(Namespace, "", "ci")
    assert (await store.list(Namespace)).items == []


async def test_kinds_are_kept_apart(store: CachingStore) -> None:
    flow = await store.create(make_flow("same"))
    run = await store.create(make_run("same", flow))

    assert isinstance(await store.get(Flow, "default", "same"), Flow)
    fetched_run = await store.get(Run, "default", "same")
    assert isinstance(fetched_run, Run)
    assert fetched_run.metadata.uid == run.metadata.uid
    assert [r.metadata.name for r in (await store.list(Run)).items] == ["same"]


async def test_names_with_dots_and_long_names_round_trip(store: CachingStore) -> None:
    dotted = "release.v1.2"
    long_name = "n" + "-x" * 120
    await store.create(make_flow(dotted))
    await store.create(make_flow(long_name))

    assert (await store.get(Flow, "default", dotted)).metadata.name == dotted
    assert (await store.get(Flow, "default", long_name)).metadata.name == long_name
    await store.delete(Flow, "default", long_name)
    assert {f.metadata.name for f in (await store.list(Flow)).items} == {dotted}


async def test_the_caller_keeps_its_object_and_the_store_keeps_its_own(
    store: CachingStore,
) -> None:
    flow = make_flow(labels={"team": "a"})
    await store.create(flow)

    flow.metadata.labels["team"] = "changed by the caller"
    assert flow.spec.inline is not None
    flow.spec.inline.steps[0].run = "changed by the caller"

    stored = await store.get(Flow, "default", "build")
    assert stored.metadata.labels == {"team": "a"}
    assert stored.spec.inline is not None
    assert stored.spec.inline.steps[0].run == "make build"


async def test_watch_resumes_from_a_listed_version(store: CachingStore) -> None:
    await store.create(make_flow("a"))
    listed = await store.list(Flow)
    await store.create(make_flow("b"))
    await store.update(make_flow("a", run="make v2"))
    await store.delete(Flow, "default", "b")

    events = await take(store.watch(Flow, since=listed.resource_version), 3)

    assert summary(events) == [
        ("ADDED", "Flow", "b"),
        ("MODIFIED", "Flow", "a"),
        ("DELETED", "Flow", "b"),
    ]
    versions = [e.resource_version for e in events]
    assert versions == sorted(versions)
    assert events[2].object.metadata.resource_version == str(versions[2])
    assert versions[0] > listed.resource_version
    # Resuming after the second event yields the third only.
    resumed = await take(store.watch(Flow, since=versions[1]), 1)
    assert summary(resumed) == [("DELETED", "Flow", "b")]


async def test_watch_events_carry_the_object_they_replaced(store: CachingStore) -> None:
    # Another kind's write first: ``since=0`` would mean "from now", not "from the start".
    await store.create(Namespace.model_validate({"metadata": {"name": "ci"}}))
    before = store.resource_version
    live = store.watch(Flow, since=before)
    created = await store.create(make_flow("a", labels={"team": "x"}))
    relabelled = await store.update(make_flow("a", labels={"team": "y"}))
    with_status = await store.update_status(
        relabelled.model_copy(
            update={"status": relabelled.status.model_copy(update={"observed_generation": 1})}
        )
    )
    await store.delete(Flow, "default", "a")

    replayed = store.watch(Flow, since=before)
    for events in (await take(live, 4), await take(replayed, 4)):
        assert summary(events) == [
            ("ADDED", "Flow", "a"),
            ("MODIFIED", "Flow", "a"),
            ("MODIFIED", "Flow", "a"),
            ("DELETED", "Flow", "a"),
        ]
        # The stored objects themselves, shared rather than copied; an ADDED has none.
        assert [event.previous for event in events] == [None, created, relabelled, with_status]
        assert events[1].previous is created
        assert events[3].previous is with_status
        assert [event.object.metadata.labels["team"] for event in events] == ["x", "y", "y", "y"]


async def test_watch_from_now_sees_later_changes_filtered(store: CachingStore) -> None:
    await store.create(make_flow("before"))
    flows = store.watch(Flow, namespace="ci")
    everything = store.watch()

    flow = await store.create(make_flow("other-ns", "default"))
    await store.create(make_run("r1", flow, "ci"))
    await store.create(make_flow("wanted", "ci"))

    assert summary(await take(flows, 1)) == [("ADDED", "Flow", "wanted")]
    assert summary(await take(everything, 2)) == [
        ("ADDED", "Flow", "other-ns"),
        ("ADDED", "Run", "r1"),
    ]


async def test_watch_from_a_version_older_than_the_history_is_gone(
    make_store: StoreFactory,
) -> None:
    store = await make_store(history_size=3)
    first = await store.create(make_flow("a"))
    for name in ("b", "c", "d", "e"):
        await store.create(make_flow(name))

    with pytest.raises(Gone, match=r"too old.*re-list"):
        store.watch(since=int(first.metadata.resource_version or 0))
    # The newest history is still served.
    recent = await take(store.watch(since=store.resource_version - 1), 1)
    assert summary(recent) == [("ADDED", "Flow", "e")]


async def test_a_watcher_that_falls_behind_the_history_is_gone(
    make_store: StoreFactory,
) -> None:
    store = await make_store(history_size=2)
    slow = store.watch()
    for name in ("a", "b", "c"):
        await store.create(make_flow(name))

    with pytest.raises(Gone):
        await take(slow, 1)


async def test_a_watch_ends_when_the_store_closes(store: CachingStore) -> None:
    events = store.watch()
    pending = asyncio.ensure_future(take(events, 1))

    await store.close()

    with pytest.raises(StopAsyncIteration):
        await pending


def _status_with(run: Run, **changes: Any) -> Run:
    return run.model_copy(update={"status": run.status.model_copy(update=changes)})


async def test_status_updates_from_two_writers_are_ordered(store: CachingStore) -> None:
    flow = await store.create(make_flow())
    run = await store.create(make_run("r1", flow))

    running = await store.update_status(_status_with(run, phase="running"))
    with pytest.raises(Conflict):
        await store.update_status(_status_with(run, phase="failed"))
    done = await store.update_status(_status_with(running, phase="success"))

    assert (await store.get(Run, "default", "r1")).status.phase == "success"
    assert int(done.metadata.resource_version or 0) > int(running.metadata.resource_version or 0)
