"""Deleting objects held by finalizers over the native API: 202 Accepted, watch events, apply.

These tests run the API alone (no reconcilers): ``Api.finish_deletion`` removes the finalizers
as the reconciler would once it cleaned up.
"""

from __future__ import annotations

import asyncio
import json

from controller_api_helpers import API, Api, git_repository, inline_flow, run

from nomad_pipeline.controller.api.runs import create_run
from nomad_pipeline.resources.kinds import Flow, GitRepository, Run

RUNS = f"{API}/namespaces/default/runs"
WAIT_SECONDS = 10.0


async def test_created_runs_and_repositories_carry_their_finalizer(api: Api) -> None:
    status, body = await api.apply(
        inline_flow("hello"), run("01j0000000000000000000000a"), git_repository("pipelines")
    )
    assert status == 200, body
    finalizers = [result["object"]["metadata"]["finalizers"] for result in body["results"]]
    assert finalizers == [[], ["nomad-pipeline.io/stop-jobs"], ["nomad-pipeline.io/prune"]]

    # A run started by the run route or a trigger (``create_run``) gets it in its create.
    flow = await api.store.get(Flow, "default", "hello")
    started = await create_run(api.store, flow, {})
    assert started.metadata.finalizers == ["nomad-pipeline.io/stop-jobs"]
    stored = await api.store.get(Run, "default", started.metadata.name)
    assert stored.metadata.finalizers == ["nomad-pipeline.io/stop-jobs"]

    # Applying the object again keeps the finalizer (apply manages spec, labels, annotations).
    status, body = await api.apply(git_repository("pipelines") | {"spec": {"url": "file:///x"}})
    assert body["results"][0]["action"] == "configured"
    assert body["results"][0]["object"]["metadata"]["finalizers"] == ["nomad-pipeline.io/prune"]


async def test_delete_held_by_a_finalizer_answers_202_until_the_finalizer_goes(api: Api) -> None:
    await api.apply(run("01j0000000000000000000000a"))
    path = f"{RUNS}/01j0000000000000000000000a"
    _, stored = await api.call("GET", path)

    status, stale = await api.call("DELETE", path, resource_version="1")
    assert status == 409, stale
    status, marked = await api.call(
        "DELETE", path, resource_version=stored["metadata"]["resource_version"]
    )
    assert status == 202, marked
    assert marked["metadata"]["deletion_timestamp"]
    assert marked["metadata"]["finalizers"] == ["nomad-pipeline.io/stop-jobs"]
    # Deleting again is accepted and changes nothing.
    status, again = await api.call("DELETE", path)
    assert (status, again) == (202, marked)
    # While being deleted, the spec is frozen: apply says why.
    changed = run("01j0000000000000000000000a")
    changed["spec"]["variables"] = {"greeting": "bye"}
    status, refused = await api.apply(changed)
    assert status == 409, refused
    assert "being deleted" in refused["error"]["message"]

    await api.finish_deletion(Run, "default", "01j0000000000000000000000a")
    status, missing = await api.call("GET", path)
    assert status == 404, missing
    status, gone = await api.call("DELETE", path)
    assert status == 404, gone


async def test_a_watch_sees_the_deletion_mark_then_the_deletion(api: Api) -> None:
    await api.apply(git_repository("pipelines"))
    _, listed = await api.call("GET", f"{API}/namespaces/default/gitrepositories")
    version = listed["metadata"]["resource_version"]
    events: list[dict[str, object]] = []

    async def follow() -> None:
        async with api.session.get(
            f"{api.address}{API}/namespaces/default/gitrepositories",
            params={"watch": "true", "resource_version": version},
        ) as response:
            async for line in response.content:
                events.append(json.loads(line))
                if len(events) == 2:
                    return

    async with asyncio.timeout(WAIT_SECONDS), asyncio.TaskGroup() as group:
        group.create_task(follow(), name="watch-gitrepositories")
        status, _ = await api.call("DELETE", f"{API}/namespaces/default/gitrepositories/pipelines")
        assert status == 202
        await api.finish_deletion(GitRepository, "default", "pipelines")

    assert [event["type"] for event in events] == ["MODIFIED", "DELETED"]
    marked, deleted = (event["object"] for event in events)
    assert isinstance(marked, dict) and isinstance(deleted, dict)
    assert marked["metadata"]["deletion_timestamp"]
    assert deleted["metadata"]["finalizers"] == []


async def test_openapi_mentions_the_accepted_delete(api: Api) -> None:
    status, document = await api.call("GET", "/v1/openapi.json")
    assert status == 200
    delete = document["paths"][f"{API}/namespaces/{{namespace}}/{{plural}}/{{name}}"]["delete"]
    assert "202" in delete["responses"]
    metadata = document["components"]["schemas"]["ObjectMeta"]["properties"]
    assert {"finalizers", "deletion_timestamp"} <= set(metadata)
