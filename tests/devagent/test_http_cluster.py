"""Status, agent, nodes, namespaces, wire conventions, blocking queries and ACL over real HTTP."""

from __future__ import annotations

import asyncio
import time

import nomad.api.exceptions as nomad_errors
import pytest
from devagent_http_support import Api, api_client, python_nomad, running_agent

from nomad_pipeline.devagent.server import DevAgent


async def test_status_leader_and_peers_answer_the_rpc_address(api: Api) -> None:
    status, headers, leader = await api.get("/v1/status/leader")
    assert status == 200
    assert leader == "127.0.0.1:4647"
    assert headers["Content-Type"].startswith("application/json")
    assert await api.ok("GET", "/v1/status/peers") == ["127.0.0.1:4647"]


async def test_every_get_carries_the_query_meta_headers(api: Api) -> None:
    for path in ("/v1/status/leader", "/v1/nodes", "/v1/namespaces", "/v1/jobs", "/v1/vars"):
        status, headers, _ = await api.get(path)
        assert status == 200, path
        assert int(headers["X-Nomad-Index"]) >= 1
        assert headers["X-Nomad-KnownLeader"] == "true"
        assert headers["X-Nomad-LastContact"] == "0"


async def test_agent_self_health_members_and_regions(agent: DevAgent, api: Api) -> None:
    body = await api.ok("GET", "/v1/agent/self")
    assert set(body) == {"config", "member", "stats"}
    assert body["config"]["NodeName"] == "test-node"
    assert body["config"]["Region"] == "global"
    assert body["config"]["Datacenter"] == "dc1"
    assert body["config"]["Ports"]["HTTP"] == int(agent.address.rsplit(":", 1)[1])
    assert body["config"]["Version"]["Version"]
    assert body["member"]["Status"] == "alive"
    assert body["stats"]["nomad"]["leader"] == "true"
    assert await api.ok("GET", "/v1/agent/health") == {
        "client": {"ok": True, "message": "ok"},
        "server": {"ok": True, "message": "ok"},
    }
    members = await api.ok("GET", "/v1/agent/members")
    assert members["Members"][0]["Status"] == "alive"
    assert await api.ok("GET", "/v1/regions") == ["global"]


async def test_one_ready_node_with_only_raw_exec(api: Api) -> None:
    nodes = await api.ok("GET", "/v1/nodes")
    assert len(nodes) == 1
    stub = nodes[0]
    assert stub["Status"] == "ready"
    assert stub["SchedulingEligibility"] == "eligible"
    assert stub["Datacenter"] == "dc1"
    assert stub["NodePool"] == "default"
    assert stub["Drivers"]["raw_exec"]["Detected"] is True
    assert stub["Drivers"]["raw_exec"]["Healthy"] is True
    assert "docker" not in stub["Drivers"]
    node = await api.ok("GET", f"/v1/node/{stub['ID']}")
    assert node["ID"] == stub["ID"]
    assert node["Name"] == "test-node"
    assert await api.ok("GET", f"/v1/node/{stub['ID']}/allocations") == []
    status, _, text = await api.get("/v1/node/00000000-0000-0000-0000-000000000000")
    assert (status, text) == (404, "node not found")


async def test_python_nomad_reads_the_cluster(agent: DevAgent) -> None:
    client = python_nomad(agent)
    leader = await asyncio.to_thread(client.status.leader.get_leader)
    assert leader == "127.0.0.1:4647"
    nodes = await asyncio.to_thread(client.nodes.get_nodes)
    assert nodes[0]["Name"] == "test-node"
    namespaces = await asyncio.to_thread(client.namespaces.get_namespaces)
    assert [n["Name"] for n in namespaces] == ["default"]


async def test_namespace_create_read_update_delete(api: Api) -> None:
    body = {"Name": "ci", "Description": "pipelines", "Meta": {"team": "a"}}
    status, headers, text = await api.put("/v1/namespace/ci", json_body=body)
    assert (status, text) == (200, "")
    created_index = int(headers["X-Nomad-Index"])
    namespace = await api.ok("GET", "/v1/namespace/ci")
    assert namespace["Name"] == "ci"
    assert namespace["Description"] == "pipelines"
    assert namespace["Meta"] == {"team": "a"}
    assert namespace["CreateIndex"] == namespace["ModifyIndex"] == created_index
    names = [n["Name"] for n in await api.ok("GET", "/v1/namespaces")]
    assert names == ["ci", "default"]
    assert [n["Name"] for n in await api.ok("GET", "/v1/namespaces", params={"prefix": "c"})] == [
        "ci"
    ]
    # An identical upsert changes nothing.
    status, headers, _ = await api.put("/v1/namespace/ci", json_body=body)
    assert status == 200
    assert (await api.ok("GET", "/v1/namespace/ci"))["ModifyIndex"] == created_index
    status, _, _ = await api.call("DELETE", "/v1/namespace/ci")
    assert status == 200
    status, _, text = await api.get("/v1/namespace/ci")
    assert (status, text) == (404, "Namespace not found")


async def test_namespace_errors_are_nomads(api: Api) -> None:
    status, _, text = await api.put("/v1/namespace/ci", json_body={"Name": "other"})
    assert (status, text) == (400, "Namespace name does not match request path")
    status, _, text = await api.put("/v1/namespace/bad.name", json_body={})
    assert status == 500
    assert "invalid name" in text
    status, _, text = await api.call("DELETE", "/v1/namespace/default")
    assert (status, text) == (500, "default namespace can not be deleted")
    await api.ok("PUT", "/v1/namespace/holder", json_body={"Name": "holder"})
    await api.ok(
        "PUT", "/v1/var/keep", params={"namespace": "holder"}, json_body={"Items": {"a": "b"}}
    )
    status, _, text = await api.call("DELETE", "/v1/namespace/holder")
    assert (status, text) == (500, 'namespace "holder" has variables in regions: [global]')


async def test_wire_errors(api: Api) -> None:
    status, headers, text = await api.put("/v1/namespace/ci", data=b"{not json")
    assert status == 400
    assert headers["Content-Type"].startswith("text/plain")
    assert text.startswith("Failed to decode request body")
    status, _, text = await api.put("/v1/namespace/ci", data=b"")
    assert (status, text) == (400, "Request body is empty")
    status, _, text = await api.call("DELETE", "/v1/status/leader")
    assert (status, text) == (405, "Invalid method")
    status, _, _ = await api.get("/v1/no/such/endpoint")
    assert status == 404
    status, _, text = await api.get("/v1/job/missing")
    assert (status, text) == (404, "job not found")
    status, _, text = await api.get("/v1/allocation/missing")
    assert (status, text) == (404, "alloc not found")
    status, _, text = await api.get("/v1/evaluation/missing")
    assert (status, text) == (404, "eval not found")


async def test_pretty_indents_json(api: Api) -> None:
    async with api.session.get(api.address + "/v1/agent/health?pretty") as response:
        text = await response.text()
    assert text.startswith('{\n    "client"')


async def test_bad_blocking_parameters_are_400(api: Api) -> None:
    status, _, text = await api.get("/v1/namespaces", params={"index": "x"})
    assert (status, text) == (400, "Invalid index")
    status, _, text = await api.get("/v1/namespaces", params={"index": "1", "wait": "30"})
    assert (status, text) == (400, "Invalid wait time")
    status, _, text = await api.get("/v1/jobs", params={"per_page": "x"})
    assert (status, text) == (400, "Expect a number for `per_page` query string parameter")


async def test_blocking_query_wakes_on_change(api: Api) -> None:
    _, headers, _ = await api.get("/v1/namespaces")
    index = int(headers["X-Nomad-Index"])
    waiter = asyncio.create_task(
        api.get("/v1/namespaces", params={"index": str(index), "wait": "30s"})
    )
    await asyncio.sleep(0)
    assert not waiter.done()
    started = time.monotonic()
    await api.ok("PUT", "/v1/namespace/woken", json_body={"Name": "woken"})
    status, headers, body = await asyncio.wait_for(waiter, 10)
    assert status == 200
    assert time.monotonic() - started < 5
    assert int(headers["X-Nomad-Index"]) > index
    assert "woken" in [n["Name"] for n in body]


async def test_blocking_query_returns_after_wait(api: Api) -> None:
    _, headers, _ = await api.get("/v1/namespaces")
    index = int(headers["X-Nomad-Index"])
    started = time.monotonic()
    status, headers, _ = await api.get(
        "/v1/namespaces", params={"index": str(index), "wait": "300ms"}
    )
    elapsed = time.monotonic() - started
    assert status == 200
    assert int(headers["X-Nomad-Index"]) == index
    # wait plus at most wait/16 of jitter (and some scheduling slack)
    assert 0.3 <= elapsed < 2.0


async def test_blocking_get_of_one_object_waits_for_that_object(api: Api) -> None:
    await api.ok("PUT", "/v1/var/watched", json_body={"Items": {"v": "1"}})
    _, headers, _ = await api.get("/v1/var/watched")
    index = int(headers["X-Nomad-Index"])
    waiter = asyncio.create_task(
        api.get("/v1/var/watched", params={"index": str(index), "wait": "20s"})
    )
    # A change elsewhere in the table does not answer the query...
    await api.ok("PUT", "/v1/var/other", json_body={"Items": {"v": "1"}})
    await asyncio.sleep(0.2)
    assert not waiter.done()
    # ...a change to the variable does.
    await api.ok("PUT", "/v1/var/watched", json_body={"Items": {"v": "2"}})
    status, _, body = await asyncio.wait_for(waiter, 10)
    assert status == 200
    assert body["Items"] == {"v": "2"}


async def test_acl_token_guards_everything_but_status_and_health() -> None:
    async with running_agent(acl_token="s3cret") as agent, api_client(agent) as api:
        assert (await api.get("/v1/status/leader"))[0] == 200
        assert (await api.get("/v1/agent/health"))[0] == 200
        status, _, text = await api.get("/v1/jobs")
        assert (status, text) == (403, "Permission denied")
        status, _, text = await api.get("/v1/jobs", headers={"X-Nomad-Token": "wrong"})
        assert (status, text) == (403, "ACL token not found")
        assert (await api.get("/v1/jobs", headers={"X-Nomad-Token": "s3cret"}))[0] == 200
        bearer = {"Authorization": "Bearer s3cret"}
        assert (await api.get("/v1/agent/self", headers=bearer))[0] == 200
        # X-Nomad-Token wins over Authorization.
        both = {"X-Nomad-Token": "wrong", "Authorization": "Bearer s3cret"}
        assert (await api.get("/v1/jobs", headers=both))[0] == 403
        body = await api.ok("GET", "/v1/agent/self", headers={"X-Nomad-Token": "s3cret"})
        assert body["config"]["ACL"]["Enabled"] is True

        anonymous = python_nomad(agent)
        with pytest.raises(nomad_errors.URLNotAuthorizedNomadException):
            await asyncio.to_thread(anonymous.jobs.get_jobs)
        management = python_nomad(agent, token="s3cret")
        assert await asyncio.to_thread(management.jobs.get_jobs) == []
