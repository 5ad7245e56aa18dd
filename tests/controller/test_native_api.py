"""The native resource API over real HTTP: apply, get, list, watch, delete and admission."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from controller_api_helpers import (
    API,
    Api,
    git_repository,
    inline_flow,
    namespace,
    run,
    spec_flow,
    trigger,
)

from nomad_pipeline.resources.registry import KINDS


async def test_every_kind_round_trips_through_apply_get_list_delete(api: Api) -> None:
    objects = [
        namespace("team-a", "the A team"),
        inline_flow("hello", "team-a", labels={"tier": "gold"}),
        trigger("nightly", "hello", "team-a"),
        run("01j0000000000000000000000a", "hello", "team-a"),
        git_repository("pipelines", "team-a"),
    ]
    status, body = await api.apply(*objects)
    assert status == 200, body
    assert [r["action"] for r in body["results"]] == ["created"] * 5
    assert [r["kind"] for r in body["results"]] == [
        "Namespace",
        "Flow",
        "Trigger",
        "Run",
        "GitRepository",
    ]

    for sent, result in zip(objects, body["results"], strict=True):
        kind_plural = {
            "Namespace": "namespaces",
            "Flow": "flows",
            "Trigger": "triggers",
            "Run": "runs",
            "GitRepository": "gitrepositories",
        }[sent["kind"]]
        name = sent["metadata"]["name"]
        if sent["kind"] == "Namespace":
            path = f"{API}/namespaces/{name}"
        else:
            path = f"{API}/namespaces/team-a/{kind_plural}/{name}"
        status, got = await api.call("GET", path)
        assert status == 200, got
        assert got == result["object"]
        assert got["metadata"]["generation"] == 1
        assert got["metadata"]["uid"]
        assert got["metadata"]["resource_version"]
        for field, value in sent["spec"].items():
            if isinstance(value, str):
                assert got["spec"][field] == value

        listed_status, listed = await api.call("GET", f"{API}/{kind_plural}")
        assert listed_status == 200
        assert listed["apiVersion"] == "nomad-pipeline.io/v1"
        assert listed["kind"] == "List"
        assert int(listed["metadata"]["resource_version"]) >= int(
            got["metadata"]["resource_version"]
        )
        assert name in [item["metadata"]["name"] for item in listed["items"]]

    finalizers = {
        "Run": ["nomad-pipeline.io/stop-jobs"],
        "GitRepository": ["nomad-pipeline.io/prune"],
    }
    for sent in reversed(objects[1:]):
        plural = {"Flow": "flows", "Trigger": "triggers", "Run": "runs"}.get(
            sent["kind"], "gitrepositories"
        )
        name = sent["metadata"]["name"]
        path = f"{API}/namespaces/team-a/{plural}/{name}"
        status, deleted = await api.call("DELETE", path)
        assert deleted["metadata"]["name"] == name
        assert deleted["metadata"]["finalizers"] == finalizers.get(sent["kind"], [])
        if sent["kind"] in finalizers:
            # Accepted: the object stays, marked, until its reconciler removes the finalizer.
            assert status == 202, deleted
            assert deleted["metadata"]["deletion_timestamp"]
            status, marked = await api.call("GET", path)
            assert (status, marked) == (200, deleted)
            await api.finish_deletion(KINDS[sent["kind"]], "team-a", name)
        else:
            assert status == 200, deleted
            assert "deletion_timestamp" not in deleted["metadata"]
        status, missing = await api.call("GET", path)
        assert status == 404
        assert missing["error"]["reason"] == "NotFound"
    status, _ = await api.call("DELETE", f"{API}/namespaces/team-a")
    assert status == 200


async def test_apply_reports_created_unchanged_configured_and_dry_run_writes_nothing(
    api: Api,
) -> None:
    status, body = await api.apply(inline_flow("hello"), dry_run=True)
    assert status == 200, body
    assert body["results"][0]["action"] == "created"
    status, _ = await api.call("GET", f"{API}/namespaces/default/flows/hello")
    assert status == 404, "a dry run must not write"

    status, body = await api.apply(inline_flow("hello"))
    assert body["results"][0]["action"] == "created"
    created = body["results"][0]["object"]

    status, body = await api.apply(inline_flow("hello"))
    assert body["results"][0]["action"] == "unchanged"
    assert (
        body["results"][0]["object"]["metadata"]["resource_version"]
        == (created["metadata"]["resource_version"])
    )

    status, body = await api.apply(inline_flow("hello", run="echo changed"), dry_run=True)
    assert body["results"][0]["action"] == "configured"
    assert body["results"][0]["object"]["metadata"]["generation"] == 2
    status, stored = await api.call("GET", f"{API}/namespaces/default/flows/hello")
    assert stored["spec"]["inline"]["steps"][0]["run"] == "echo hello"

    status, body = await api.apply(inline_flow("hello", run="echo changed"))
    assert body["results"][0]["action"] == "configured"
    assert body["results"][0]["object"]["metadata"]["generation"] == 2

    # A label change configures without bumping generation (the spec is the same).
    status, body = await api.apply(inline_flow("hello", run="echo changed", labels={"team": "a"}))
    assert body["results"][0]["action"] == "configured"
    assert body["results"][0]["object"]["metadata"]["generation"] == 2
    assert body["results"][0]["object"]["metadata"]["labels"] == {"team": "a"}


async def test_status_in_the_input_is_ignored(api: Api) -> None:
    flow = inline_flow("hello")
    flow["status"] = {"observed_generation": 7}
    status, body = await api.apply(flow)
    assert status == 200, body
    assert body["results"][0]["object"]["status"]["observed_generation"] == 0


async def test_stale_resource_version_is_a_conflict(api: Api) -> None:
    _, body = await api.apply(inline_flow("hello"))
    first_version = body["results"][0]["object"]["metadata"]["resource_version"]
    _, body = await api.apply(inline_flow("hello", run="echo two"))
    current = body["results"][0]["object"]["metadata"]["resource_version"]

    stale = inline_flow("hello", run="echo three")
    stale["metadata"]["resource_version"] = first_version
    status, body = await api.apply(stale)
    assert status == 409, body
    assert body["error"]["reason"] == "Conflict"
    assert body["error"]["field"] == "metadata.resource_version"

    fresh = inline_flow("hello", run="echo three")
    fresh["metadata"]["resource_version"] = current
    status, body = await api.apply(fresh)
    assert status == 200, body
    assert body["results"][0]["action"] == "configured"

    status, body = await api.call(
        "DELETE", f"{API}/namespaces/default/flows/hello", resource_version=first_version
    )
    assert status == 409, body
    status, _ = await api.call("GET", f"{API}/namespaces/default/flows/hello")
    assert status == 200


async def test_label_selector_filters_lists(api: Api) -> None:
    await api.apply(
        inline_flow("a", labels={"team": "x", "tier": "1"}),
        inline_flow("b", labels={"team": "x", "tier": "2"}),
        inline_flow("c", labels={"team": "y"}),
    )
    _, body = await api.call("GET", f"{API}/namespaces/default/flows", labelSelector="team=x")
    assert sorted(item["metadata"]["name"] for item in body["items"]) == ["a", "b"]
    _, body = await api.call(
        "GET", f"{API}/namespaces/default/flows", labelSelector="team=x,tier=2"
    )
    assert [item["metadata"]["name"] for item in body["items"]] == ["b"]
    status, body = await api.call("GET", f"{API}/flows", labelSelector="team")
    assert status == 400
    assert body["error"]["field"] == "labelSelector"


async def test_unknown_field_is_refused_with_its_path(api: Api) -> None:
    flow = inline_flow("hello")
    flow["spec"]["inline"]["steps"][0]["comand"] = "typo"
    status, body = await api.apply(namespace("ok"), flow)
    assert status == 400, body
    assert body["error"]["reason"] == "Invalid"
    assert body["error"]["field"] == "items[1].spec.inline.steps[0].comand"
    assert "unknown field" in body["error"]["message"]
    status, _ = await api.call("GET", f"{API}/namespaces/ok")
    assert status == 404, "nothing is applied when any item is invalid"


async def test_every_invalid_item_is_reported(api: Api) -> None:
    bad_run = inline_flow("bad")
    del bad_run["spec"]["inline"]["steps"][0]["run"]
    status, body = await api.apply(
        inline_flow("good"), {"kind": "Nope", "metadata": {"name": "x"}}, bad_run
    )
    assert status == 400
    message = body["error"]["message"]
    assert "2 of 3 items are invalid" in message
    assert "items[1].kind" in message
    assert "items[2].spec.inline.steps[0].run: field required" in message
    assert body["error"]["field"] == "items[1].kind"


async def test_malformed_json_is_a_clear_400(api: Api) -> None:
    status, body = await api.call("PUT", f"{API}/apply", data=b'{"items": [')
    assert status == 400
    assert body["error"]["message"].startswith("request body is not valid JSON")
    status, body = await api.call("PUT", f"{API}/apply", json={"things": []})
    assert status == 400
    assert body["error"]["field"] == "things"


async def test_objects_in_a_missing_namespace_are_refused(api: Api) -> None:
    status, body = await api.apply(inline_flow("hello", "nowhere"))
    assert status == 400, body
    assert body["error"]["field"] == "metadata.namespace"
    assert "'nowhere'" in body["error"]["message"]

    # A namespace applied in the same request counts, even in a dry run, whatever the order.
    status, body = await api.apply(inline_flow("hello", "fresh"), namespace("fresh"), dry_run=True)
    assert status == 200, body
    status, body = await api.apply(inline_flow("hello", "fresh"), namespace("fresh"))
    assert status == 200, body
    assert [r["action"] for r in body["results"]] == ["created", "created"]


async def test_namespace_with_objects_is_not_deleted(api: Api) -> None:
    await api.apply(namespace("busy"), inline_flow("hello", "busy"))
    status, body = await api.call("DELETE", f"{API}/namespaces/busy")
    assert status == 409, body
    assert "1 flows" in body["error"]["message"]
    status, body = await api.call("DELETE", f"{API}/namespaces/default")
    assert status == 400
    await api.call("DELETE", f"{API}/namespaces/busy/flows/hello")
    status, _ = await api.call("DELETE", f"{API}/namespaces/busy")
    assert status == 200


async def test_flow_with_unloaded_jobspec_path_is_refused(api: Api) -> None:
    status, body = await api.apply(spec_flow("deploy", {"path": "jobs/deploy.nomad.hcl"}))
    assert status == 400, body
    assert body["error"]["field"] == "spec.specification.steps[0].job.path"
    status, body = await api.apply(
        spec_flow("deploy", {"path": "jobs/deploy.nomad.hcl", "source": 'job "x" {}'})
    )
    assert status == 200, body


async def test_bad_condition_is_refused_at_apply(api: Api) -> None:
    flow = inline_flow("hello")
    flow["spec"]["inline"]["steps"].append(
        {"name": "notify", "run": "echo x", "condition": 'steps.nope.status == "failed"'}
    )
    status, body = await api.apply(flow)
    assert status == 400, body
    assert body["error"]["field"] == "items[0].spec.inline.steps[1].condition"


async def test_unknown_plural_and_wrong_scope_answer_clearly(api: Api) -> None:
    status, body = await api.call("GET", f"{API}/namespaces/default/flowz")
    assert status == 404
    assert "flowz" in body["error"]["message"]
    status, body = await api.call("GET", f"{API}/flows/hello")
    assert status == 400
    assert "namespaced" in body["error"]["message"]
    status, body = await api.call("GET", f"{API}/namespaces/default/namespaces")
    assert status == 400
    status, body = await api.call("POST", f"{API}/apply")
    assert status == 405
    assert body["error"]["reason"] == "MethodNotAllowed"


class WatchStream:
    """Reads NDJSON watch events from a streaming response."""

    def __init__(self, lines: AsyncIterator[bytes]) -> None:
        self._lines = lines

    async def next(self, timeout: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            line = await anext(self._lines)
        return json.loads(line)


async def test_watch_lists_then_streams_changes(api: Api) -> None:
    await api.apply(inline_flow("one"))
    url = f"{api.address}{API}/namespaces/default/flows"
    async with api.session.get(url, params={"watch": "true"}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/x-ndjson")
        stream = WatchStream(response.content.__aiter__())
        first = await stream.next()
        assert (first["type"], first["object"]["metadata"]["name"]) == ("ADDED", "one")

        await api.apply(inline_flow("two"))
        event = await stream.next()
        assert (event["type"], event["object"]["metadata"]["name"]) == ("ADDED", "two")

        await api.apply(inline_flow("two", run="echo again"))
        event = await stream.next()
        assert event["type"] == "MODIFIED"
        assert event["object"]["spec"]["inline"]["steps"][0]["run"] == "echo again"

        # Another namespace's objects do not show in this namespace's watch.
        await api.apply(namespace("elsewhere"), inline_flow("three", "elsewhere"))
        await api.call("DELETE", f"{API}/namespaces/default/flows/one")
        event = await stream.next()
        assert (event["type"], event["object"]["metadata"]["name"]) == ("DELETED", "one")


async def test_watch_resumes_from_a_resource_version(api: Api) -> None:
    _, body = await api.apply(inline_flow("one"))
    version = body["results"][0]["object"]["metadata"]["resource_version"]
    await api.apply(inline_flow("two"))
    await api.apply(inline_flow("one", run="echo changed"))
    url = f"{api.address}{API}/flows"
    params = {"watch": "true", "resource_version": version}
    async with api.session.get(url, params=params) as response:
        stream = WatchStream(response.content.__aiter__())
        first, second = await stream.next(), await stream.next()
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in (first, second)] == [
        ("ADDED", "two"),
        ("MODIFIED", "one"),
    ]


async def test_watch_from_a_too_old_version_ends_with_410(tmp_path: Any) -> None:
    import aiohttp

    from nomad_pipeline.controller.admission import ensure_default_namespace
    from nomad_pipeline.controller.api.app import build_api, start_api
    from nomad_pipeline.store.memory import MemoryStore

    store = MemoryStore(history_size=2)
    await store.start()
    await ensure_default_namespace(store)
    server = await start_api(build_api(store, log_root=tmp_path), shutdown_timeout=2.0)
    try:
        async with aiohttp.ClientSession() as session:
            small = Api(server.address, store, session)
            for name in ("a", "b", "c", "d"):
                await small.apply(inline_flow(name))
            params = {"watch": "true", "resource_version": "1"}
            async with session.get(f"{server.address}{API}/flows", params=params) as response:
                lines = [json.loads(line) async for line in response.content]
        assert len(lines) == 1
        assert lines[0]["type"] == "ERROR"
        assert lines[0]["object"]["code"] == 410
        assert lines[0]["object"]["reason"] == "Expired"
    finally:
        await server.stop()
        await store.close()


async def test_watch_filters_by_label_selector(api: Api) -> None:
    url = f"{api.address}{API}/flows"
    params = {"watch": "true", "labelSelector": "team=x"}
    async with api.session.get(url, params=params) as response:
        stream = WatchStream(response.content.__aiter__())
        await api.apply(inline_flow("other", labels={"team": "y"}))
        await api.apply(inline_flow("mine", labels={"team": "x"}))
        event = await stream.next()
    assert event["object"]["metadata"]["name"] == "mine"


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_health_endpoints(api: Api, path: str) -> None:
    status, body = await api.call("GET", path)
    assert status == 200, body


async def test_metrics_count_requests_and_objects(api: Api) -> None:
    await api.apply(inline_flow("one"), inline_flow("two"))
    await api.call("GET", f"{API}/namespaces/default/flows/one")
    await api.call("GET", f"{API}/namespaces/default/flows/missing")
    async with api.session.get(api.address + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    route = "/apis/nomad-pipeline.io/v1/namespaces/{namespace}/{plural}/{name}"
    assert (
        f'nomad_pipeline_http_requests_total{{method="GET",route="{route}",status="200"}} 1.0'
        in (text)
    )
    assert f'method="GET",route="{route}",status="404"' in text
    assert 'nomad_pipeline_store_objects{kind="Flow"} 2.0' in text
    assert 'nomad_pipeline_store_objects{kind="Namespace"} 1.0' in text
    assert "nomad_pipeline_http_request_duration_seconds_bucket" in text


async def test_openapi_document_lists_routes_and_kind_schemas(api: Api) -> None:
    status, document = await api.call("GET", "/v1/openapi.json")
    assert status == 200
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    assert set(paths["/apis/nomad-pipeline.io/v1/apply"]) == {"put"}
    assert {"get", "delete"} <= set(
        paths["/apis/nomad-pipeline.io/v1/namespaces/{namespace}/{plural}/{name}"]
    )
    assert {"get", "post"} <= set(paths["/v1/flows"])
    assert "/metrics" in paths
    schemas = document["components"]["schemas"]
    assert {"Flow", "Run", "Namespace", "Trigger", "GitRepository", "Error"} <= set(schemas)
    # Every reference points inside the document.
    text = json.dumps(document)
    for reference in set(part.split('"')[0] for part in text.split('"$ref": "')[1:]):
        name = reference.removeprefix("#/components/schemas/")
        assert name in schemas, reference


async def test_lists_show_current_objects_after_changes(api: Api) -> None:
    await api.apply(inline_flow("a"), inline_flow("b"))
    _, first = await api.call("GET", f"{API}/namespaces/default/flows")
    await api.apply(inline_flow("a", run="echo new"))
    await api.call("DELETE", f"{API}/namespaces/default/flows/b")
    _, second = await api.call("GET", f"{API}/namespaces/default/flows")
    assert [item["metadata"]["name"] for item in second["items"]] == ["a"]
    assert second["items"][0]["spec"]["inline"]["steps"][0]["run"] == "echo new"
    _, got = await api.call("GET", f"{API}/namespaces/default/flows/a")
    assert second["items"][0] == got
    assert int(second["metadata"]["resource_version"]) > int(first["metadata"]["resource_version"])


async def test_field_manager_is_recorded_and_kept(api: Api) -> None:
    status, body = await api.call(
        "PUT", f"{API}/apply", json={"items": [inline_flow("hello")]}, field_manager="gitops"
    )
    assert status == 200, body
    annotations = body["results"][0]["object"]["metadata"]["annotations"]
    assert annotations == {"nomad-pipeline.io/field-manager": "gitops"}
    # An apply naming no manager leaves the object unchanged and the manager recorded.
    _, body = await api.apply(inline_flow("hello"))
    assert body["results"][0]["action"] == "unchanged"
    _, body = await api.apply(inline_flow("hello", annotations={"note": "x"}))
    assert body["results"][0]["action"] == "configured"
    assert body["results"][0]["object"]["metadata"]["annotations"] == {
        "note": "x",
        "nomad-pipeline.io/field-manager": "gitops",
    }
