"""What only the nomad-vars store does: layout, size limit, restarts, several instances."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nomad_pipeline.devagent.server import DevAgent, DevAgentConfig
from nomad_pipeline.errors import Conflict, NomadUnavailable, NotFound, TooLarge
from nomad_pipeline.nomad.client import NomadClient
from nomad_pipeline.resources.kinds import Flow, Namespace, Run
from nomad_pipeline.store.interface import WatchEvent
from nomad_pipeline.store.nomadvars import NomadVarsStore

WAIT_SECONDS = 10.0


def make_flow(name: str = "build", *, run: str = "make build") -> Flow:
    return Flow.model_validate(
        {
            "metadata": {"name": name, "namespace": "default", "labels": {"team": "a"}},
            "spec": {"inline": {"steps": [{"name": "build", "run": run}]}},
        }
    )


def make_run(name: str, flow: Flow) -> Run:
    return Run.model_validate(
        {
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"flow": flow.metadata.name, "flow_spec": flow.spec.model_dump()},
        }
    )


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[DevAgent]:
    dev_agent = DevAgent(DevAgentConfig(port=0, data_dir=tmp_path / "agent"))
    await dev_agent.start()
    try:
        yield dev_agent
    finally:
        await dev_agent.stop()


@pytest.fixture
async def client(agent: DevAgent) -> AsyncIterator[NomadClient]:
    async with NomadClient(agent.address) as nomad:
        yield nomad


@pytest.fixture
async def stores(client: NomadClient) -> AsyncIterator[tuple[NomadVarsStore, NomadVarsStore]]:
    first = NomadVarsStore(client, poll_wait="10s")
    second = NomadVarsStore(client, poll_wait="10s")
    await first.start()
    await second.start()
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


async def take(events: AsyncIterator[WatchEvent], count: int) -> list[WatchEvent]:
    async with asyncio.timeout(WAIT_SECONDS):
        return [await anext(events) for _ in range(count)]


async def test_one_variable_per_object_at_the_documented_path(client: NomadClient) -> None:
    async with asyncio.timeout(WAIT_SECONDS):
        store = NomadVarsStore(client, prefix="np-test")
        await store.start()
        try:
            flow = await store.create(make_flow())
            await store.create(Namespace.model_validate({"metadata": {"name": "ci"}}))
        finally:
            await store.close()

    variable = await client.get_variable("np-test/flow/default/build")
    assert str(variable["ModifyIndex"]) == flow.metadata.resource_version
    stored = json.loads(variable["Items"]["object"])
    assert stored["kind"] == "Flow"
    assert stored["metadata"]["uid"] == flow.metadata.uid
    assert "resource_version" not in stored["metadata"]
    cluster = await client.get_variable("np-test/namespace/_cluster/ci")
    assert "namespace" not in json.loads(cluster["Items"]["object"])["metadata"]


async def test_an_object_over_the_variable_limit_is_refused_whole(client: NomadClient) -> None:
    store = NomadVarsStore(client)
    await store.start()
    try:
        with pytest.raises(TooLarge, match=r"Flow default/huge is \d+ bytes as JSON.*65536"):
            await store.create(make_flow("huge", run="x" * 70_000))
        with pytest.raises(NotFound):
            await store.get(Flow, "default", "huge")
        await store.create(make_flow("small"))
        with pytest.raises(TooLarge):
            await store.update(make_flow("small", run="x" * 70_000))
        assert (await store.get(Flow, "default", "small")).metadata.generation == 1
    finally:
        await store.close()
    assert [m["Path"] for m in (await client.list_variables("nomad-pipeline/"))[0]] == [
        "nomad-pipeline/flow/default/small"
    ]


async def test_a_restarted_agent_and_store_lose_nothing(tmp_path: Path) -> None:
    config = DevAgentConfig(port=0, data_dir=tmp_path / "agent")
    first_agent = DevAgent(config)
    address = await first_agent.start()
    try:
        async with NomadClient(address) as nomad:
            store = NomadVarsStore(nomad)
            await store.start()
            flow = await store.create(make_flow())
            namespace = await store.create(
                Namespace.model_validate({"metadata": {"name": "ci"}, "spec": {}})
            )
            run = await store.create(make_run("01j9zk3q", flow))
            run = await store.update_status(
                run.model_copy(
                    update={"status": run.status.model_copy(update={"phase": "running"})}
                )
            )
            await store.create(make_flow("gone"))
            await store.delete(Flow, "default", "gone")
            await store.close()
    finally:
        await first_agent.stop()

    second_agent = DevAgent(config)
    address = await second_agent.start()
    try:
        async with NomadClient(address) as nomad:
            restarted = NomadVarsStore(nomad)
            await restarted.start()
            try:
                assert (await restarted.get(Flow, "default", "build")).to_wire() == flow.to_wire()
                assert (await restarted.get(Namespace, "", "ci")).to_wire() == namespace.to_wire()
                restored_run = await restarted.get(Run, "default", "01j9zk3q")
                assert restored_run.to_wire() == run.to_wire()
                assert restored_run.status.phase == "running"
                assert [f.metadata.name for f in (await restarted.list(Flow)).items] == ["build"]
                # Writes continue from the restored versions.
                updated = await restarted.update(make_flow(run="make v2"))
                assert updated.metadata.generation == 2
            finally:
                await restarted.close()
    finally:
        await second_agent.stop()


async def test_a_second_store_follows_the_first(
    stores: tuple[NomadVarsStore, NomadVarsStore],
) -> None:
    first, second = stores
    events = second.watch(Flow, since=second.resource_version)

    async def synced(obj: Flow) -> Flow:
        # The follower sees states, not every write: changes made between two of its blocking
        # queries arrive as one. Waiting after each write makes every step visible.
        await second.wait_synced(int(obj.metadata.resource_version or 0))
        return obj

    created = await synced(await first.create(make_flow()))
    updated = await synced(await first.update(make_flow(run="make v2")))
    await synced(await first.create(make_flow("temp")))
    await synced(await first.delete(Flow, "default", "temp"))

    seen = await take(events, 4)
    assert [(e.type, e.object.metadata.name) for e in seen] == [
        ("ADDED", "build"),
        ("MODIFIED", "build"),
        ("ADDED", "temp"),
        ("DELETED", "temp"),
    ]
    assert isinstance(seen[0].object, Flow)
    assert seen[0].object.metadata.uid == created.metadata.uid
    assert (await second.get(Flow, "default", "build")).to_wire() == updated.to_wire()
    with pytest.raises(NotFound):
        await second.get(Flow, "default", "temp")


async def test_changes_followed_from_another_store_carry_the_previous_object(
    stores: tuple[NomadVarsStore, NomadVarsStore],
) -> None:
    first, second = stores
    created = await first.create(make_flow())
    async with asyncio.timeout(WAIT_SECONDS):
        await second.wait_synced(int(created.metadata.resource_version or 0))
        since = second.resource_version
        followed = await second.get(Flow, "default", "build")
        labels = {"team": "b"}
        relabelled = await first.update(
            created.model_copy(
                update={"metadata": created.metadata.model_copy(update={"labels": labels})}
            )
        )
        await second.wait_synced(int(relabelled.metadata.resource_version or 0))
        followed_relabelled = await second.get(Flow, "default", "build")
        deleted = await first.delete(Flow, "default", "build")
        await second.wait_synced(int(deleted.metadata.resource_version or 0))

    # Replayed from the second store's history: both changes came from its follower.
    events = await take(second.watch(Flow, since=since), 2)
    assert [(e.type, e.object.metadata.labels) for e in events] == [
        ("MODIFIED", {"team": "b"}),
        ("DELETED", {"team": "b"}),
    ]
    assert events[0].previous is followed
    assert events[0].previous.metadata.labels == {"team": "a"}
    assert events[1].previous is followed_relabelled


async def test_changes_between_two_syncs_converge(
    stores: tuple[NomadVarsStore, NomadVarsStore],
) -> None:
    first, second = stores
    await first.create(make_flow("a"))
    await first.update(make_flow("a", run="make v2"))
    await first.create(make_flow("b"))
    deleted = await first.delete(Flow, "default", "b")

    async with asyncio.timeout(WAIT_SECONDS):
        await second.wait_synced(int(deleted.metadata.resource_version or 0))
    assert [f.to_wire() for f in (await second.list(Flow)).items] == [
        f.to_wire() for f in (await first.list(Flow)).items
    ]


async def test_writes_from_two_stores_never_overwrite_each_other(
    stores: tuple[NomadVarsStore, NomadVarsStore],
) -> None:
    first, second = stores
    flow = await first.create(make_flow())
    run = await first.create(make_run("r1", flow))
    await second.wait_synced(int(run.metadata.resource_version or 0))
    seen_by_second = await second.get(Run, "default", "r1")

    await first.update_status(
        run.model_copy(update={"status": run.status.model_copy(update={"phase": "running"})})
    )
    # A write based on what the second store read before is refused, synced or not.
    with pytest.raises(Conflict):
        await second.update_status(
            seen_by_second.model_copy(
                update={"status": seen_by_second.status.model_copy(update={"phase": "failed"})}
            )
        )
    # An unconditional spec update is recomputed on the current object: the status survives.
    unconditional = make_run("r1", flow).model_copy(
        update={"spec": run.spec.model_copy(update={"cancel": True})}
    )
    updated = await second.update(unconditional)
    assert updated.spec.cancel is True
    assert updated.status.phase == "running"
    await first.wait_synced(int(updated.metadata.resource_version or 0))
    assert (await first.get(Run, "default", "r1")).to_wire() == updated.to_wire()


async def test_a_create_racing_another_store_is_already_exists(
    stores: tuple[NomadVarsStore, NomadVarsStore],
) -> None:
    first, second = stores
    results = await asyncio.gather(
        first.create(make_flow(run="first")),
        second.create(make_flow(run="second")),
        return_exceptions=True,
    )

    assert sum(isinstance(r, Flow) for r in results) == 1
    assert sum(isinstance(r, Conflict) for r in results) == 1


async def test_variables_that_are_not_objects_are_skipped(client: NomadClient) -> None:
    await client.put_variable("nomad-pipeline/flow/default/junk", {"object": "{not json"})
    await client.put_variable("nomad-pipeline/flow/default/other", {"unrelated": "x"})
    store = NomadVarsStore(client)
    await store.start()
    try:
        await store.create(make_flow())
        assert [f.metadata.name for f in (await store.list(Flow)).items] == ["build"]
    finally:
        await store.close()


async def test_start_loads_many_objects(client: NomadClient) -> None:
    writer = NomadVarsStore(client)
    await writer.start()
    try:
        await asyncio.gather(*(writer.create(make_flow(f"f{n}")) for n in range(300)))
    finally:
        await writer.close()

    reader = NomadVarsStore(client, kinds=[Flow])
    await reader.start()
    try:
        listed = await reader.list(Flow)
        assert len(listed.items) == 300
        assert all(isinstance(f, Flow) for f in listed.items)
    finally:
        await reader.close()


async def test_the_follower_survives_a_nomad_restart(tmp_path: Path) -> None:
    first_agent = DevAgent(DevAgentConfig(port=0, data_dir=tmp_path / "agent"))
    address = await first_agent.start()
    port = int(address.rsplit(":", 1)[1])
    async with NomadClient(address) as nomad:
        store = NomadVarsStore(nomad)
        await store.start()
        second_agent: DevAgent | None = None
        first_running = True
        try:
            await store.create(make_flow("before"))
            await first_agent.stop()
            first_running = False
            with pytest.raises(NomadUnavailable):
                await store.create(make_flow("during"))

            second_agent = DevAgent(DevAgentConfig(port=port, data_dir=tmp_path / "agent"))
            await second_agent.start()
            async with NomadClient(address) as other:
                writer = NomadVarsStore(other)
                await writer.start()
                try:
                    written = await writer.create(make_flow("after"))
                finally:
                    await writer.close()
            async with asyncio.timeout(WAIT_SECONDS):
                await store.wait_synced(int(written.metadata.resource_version or 0))
            assert {f.metadata.name for f in (await store.list(Flow)).items} == {
                "before",
                "after",
            }
        finally:
            await store.close()
            if first_running:
                await first_agent.stop()
            if second_agent is not None:
                await second_agent.stop()


async def test_another_store_sees_a_deletion_mark_and_finishes_the_deletion(
    stores: tuple[NomadVarsStore, NomadVarsStore],
) -> None:
    writer, reader = stores
    cleanup = "example.com/cleanup"
    flow = make_flow()
    held = flow.model_copy(
        update={"metadata": flow.metadata.model_copy(update={"finalizers": [cleanup]})}
    )
    await writer.create(held)
    marked = await writer.delete(Flow, "default", "build")
    await reader.wait_synced(int(marked.metadata.resource_version or 0))
    loaded = await reader.get(Flow, "default", "build")
    assert loaded.metadata.finalizers == [cleanup]
    assert loaded.metadata.deletion_timestamp == marked.metadata.deletion_timestamp

    # The reader finishes the deletion; the writer's cache follows Nomad to the removal.
    follow = writer.watch(Flow, since=writer.resource_version)
    released = loaded.model_copy(
        update={"metadata": loaded.metadata.model_copy(update={"finalizers": []})}
    )
    await reader.update(released)
    events = await take(follow, 1)
    assert events[0].type == "DELETED"
    with pytest.raises(NotFound):
        await writer.get(Flow, "default", "build")
