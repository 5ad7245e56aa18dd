"""Nomad Variables and locks over real HTTP (aiohttp and python-nomad)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nomad.api.exceptions as nomad_errors
import pytest
from devagent_http_support import Api, api_client, python_nomad, running_agent

from nomad_pipeline.devagent.server import DevAgent


async def test_write_read_list_delete(api: Api) -> None:
    status, headers, written = await api.put(
        "/v1/var/app/config", json_body={"Path": "ignored", "Items": {"k": "v"}}
    )
    assert status == 200
    assert written["Path"] == "app/config"
    assert written["Namespace"] == "default"
    assert written["Items"] == {"k": "v"}
    assert written["CreateIndex"] == written["ModifyIndex"] == int(headers["X-Nomad-Index"])
    assert written["CreateTime"] == written["ModifyTime"] > 0

    status, headers, read = await api.get("/v1/var/app/config")
    assert status == 200
    assert read == written
    assert int(headers["X-Nomad-Index"]) == written["ModifyIndex"]

    await api.ok("PUT", "/v1/var/app/other", json_body={"Items": {"a": "b"}})
    await api.ok("PUT", "/v1/var/zzz", json_body={"Items": {"a": "b"}})
    listed = await api.ok("GET", "/v1/vars", params={"prefix": "app/"})
    assert [v["Path"] for v in listed] == ["app/config", "app/other"]
    assert all("Items" not in v for v in listed)
    assert set(listed[0]) == {
        "Namespace",
        "Path",
        "CreateIndex",
        "ModifyIndex",
        "CreateTime",
        "ModifyTime",
    }

    status, headers, text = await api.call("DELETE", "/v1/var/app/config")
    assert (status, text) == (204, "")
    assert int(headers["X-Nomad-Index"]) > written["ModifyIndex"]
    status, _, text = await api.get("/v1/var/app/config")
    assert (status, text) == (404, "variable not found")
    # Deleting what is already gone (without cas) succeeds.
    assert (await api.call("DELETE", "/v1/var/app/config"))[0] == 204


async def test_list_pagination_and_all_namespaces(api: Api) -> None:
    await api.ok("PUT", "/v1/namespace/ci", json_body={"Name": "ci"})
    for path in ("a", "b", "c"):
        await api.ok("PUT", f"/v1/var/{path}", json_body={"Items": {"x": "1"}})
    await api.ok("PUT", "/v1/var/d", params={"namespace": "ci"}, json_body={"Items": {"x": "1"}})
    _, headers, page = await api.get("/v1/vars", params={"per_page": "2"})
    assert [v["Path"] for v in page] == ["a", "b"]
    token = headers["X-Nomad-NextToken"]
    _, headers, page = await api.get("/v1/vars", params={"per_page": "2", "next_token": token})
    assert [v["Path"] for v in page] == ["c"]
    assert "X-Nomad-NextToken" not in headers
    everywhere = await api.ok("GET", "/v1/vars", params={"namespace": "*"})
    assert sorted((v["Namespace"], v["Path"]) for v in everywhere) == [
        ("ci", "d"),
        ("default", "a"),
        ("default", "b"),
        ("default", "c"),
    ]
    only_ci = await api.ok("GET", "/v1/vars", params={"namespace": "ci"})
    assert [v["Path"] for v in only_ci] == ["d"]


async def test_cas_conflicts_answer_409_with_the_current_variable(api: Api) -> None:
    created = await api.ok(
        "PUT", "/v1/var/cas", params={"cas": "0"}, json_body={"Items": {"v": "1"}}
    )
    status, headers, body = await api.put(
        "/v1/var/cas", params={"cas": "0"}, json_body={"Items": {"v": "2"}}
    )
    assert status == 409
    assert body == created
    assert int(headers["X-Nomad-Index"]) == created["ModifyIndex"]
    updated = await api.ok(
        "PUT",
        "/v1/var/cas",
        params={"cas": str(created["ModifyIndex"])},
        json_body={"Items": {"v": "2"}},
    )
    assert updated["CreateIndex"] == created["CreateIndex"]
    assert updated["ModifyIndex"] > created["ModifyIndex"]
    status, _, body = await api.call(
        "DELETE", "/v1/var/cas", params={"cas": str(created["ModifyIndex"])}
    )
    assert status == 409
    assert body["Items"] == {"v": "2"}
    # A cas on a variable that does not exist: the zero-value stub.
    status, _, body = await api.put(
        "/v1/var/missing", params={"cas": "7"}, json_body={"Items": {"v": "1"}}
    )
    assert status == 409
    assert body["ModifyIndex"] == 0
    assert body["Path"] == "missing"
    assert body["Items"] is None
    status, _, text = await api.put("/v1/var/x", params={"cas": "abc"}, json_body={"Items": {}})
    assert status == 400
    assert text.startswith("can not parse cas")


async def test_python_nomad_cas_conflict(agent: DevAgent) -> None:
    client = python_nomad(agent)
    created = await asyncio.to_thread(
        client.variable.create_variable, "py/var", {"Items": {"a": "1"}}, None, 0
    )
    assert created["Items"] == {"a": "1"}
    with pytest.raises(nomad_errors.VariableConflict):
        await asyncio.to_thread(
            client.variable.create_variable, "py/var", {"Items": {"a": "2"}}, None, 0
        )
    read = await asyncio.to_thread(client.variable.get_variable, "py/var")
    assert read["Items"] == {"a": "1"}
    listed = await asyncio.to_thread(client.variables.get_variables, "py/")
    assert [v["Path"] for v in listed] == ["py/var"]
    await asyncio.to_thread(client.variable.delete_variable, "py/var")
    with pytest.raises(nomad_errors.URLNotFoundNomadException):
        await asyncio.to_thread(client.variable.get_variable, "py/var")


@pytest.mark.parametrize(
    ("path", "items", "text"),
    [
        ("a.b", {"k": "v"}, 'invalid path "a.b"'),
        ("nomad", {"k": "v"}, '"nomad" is a reserved top-level directory path'),
        ("nomad/other", {"k": "v"}, 'only paths at "nomad/jobs"'),
        ("ok", {}, "variable missing required Items object"),
        ("big", {"k": "x" * (64 * 1024)}, "variables are limited to 64KiB in total size"),
    ],
)
async def test_write_validation(api: Api, path: str, items: dict[str, str], text: str) -> None:
    status, _, body = await api.put(f"/v1/var/{path}", json_body={"Items": items})
    assert status == 400
    assert body.startswith(text)


async def test_reserved_paths_that_are_allowed(api: Api) -> None:
    for path in ("nomad/jobs", "nomad/jobs/x/y", "nomad/job-templates/t"):
        await api.ok("PUT", f"/v1/var/{path}", json_body={"Items": {"k": "v"}})


async def test_lock_acquire_renew_release(api: Api) -> None:
    await api.ok("PUT", "/v1/var/locks/run", json_body={"Items": {"keep": "me"}})
    lock_body = {"Lock": {"TTL": "15s", "LockDelay": "5s"}, "Items": {"owner": "a"}}
    acquired = await api.ok(
        "PUT", "/v1/var/locks/run", params={"lock-acquire": ""}, json_body=lock_body
    )
    lock_id = acquired["Lock"]["ID"]
    assert acquired["Lock"]["TTL"] == "15s"
    assert acquired["Lock"]["LockDelay"] == "5s"
    assert acquired["Items"] == {"owner": "a"}

    status, _, body = await api.put(
        "/v1/var/locks/run", params={"lock-acquire": ""}, json_body=lock_body
    )
    assert status == 409
    assert body["ModifyIndex"] == 0
    assert body["Lock"] is None
    # Writing a locked variable without its lock ID conflicts; with it, succeeds.
    status, _, _ = await api.put("/v1/var/locks/run", json_body={"Items": {"x": "y"}})
    assert status == 409
    written = await api.ok(
        "PUT", "/v1/var/locks/run", json_body={"Items": {"x": "y"}, "Lock": {"ID": lock_id}}
    )
    assert written["Lock"]["ID"] == lock_id
    assert (await api.call("DELETE", "/v1/var/locks/run"))[0] == 409

    renewed = await api.ok(
        "PUT", "/v1/var/locks/run", params={"lock-renew": ""}, json_body={"Lock": {"ID": lock_id}}
    )
    assert "Items" not in renewed
    assert renewed["Lock"]["ID"] == lock_id
    status, _, text = await api.put(
        "/v1/var/locks/run", params={"lock-renew": ""}, json_body={"Lock": {"ID": "other"}}
    )
    assert (status, text) == (409, "attempting to modify locked variable")

    status, _, text = await api.put(
        "/v1/var/locks/run",
        params={"lock-release": ""},
        json_body={"Lock": {"ID": lock_id}, "Items": {"a": "b"}},
    )
    assert (status, text) == (400, "lock release operation doesn't take variable items")
    status, _, body = await api.put(
        "/v1/var/locks/run", params={"lock-release": ""}, json_body={"Lock": {"ID": "other"}}
    )
    assert status == 409
    assert body["Lock"] == {}
    released = await api.ok(
        "PUT", "/v1/var/locks/run", params={"lock-release": ""}, json_body={"Lock": {"ID": lock_id}}
    )
    assert "Lock" not in released
    assert (await api.ok("GET", "/v1/var/locks/run"))["Items"] == {"x": "y"}
    status, _, text = await api.put(
        "/v1/var/locks/run", params={"lock-renew": ""}, json_body={"Lock": {"ID": lock_id}}
    )
    assert (status, text) == (409, "variable doesn't hold a lock")
    # Released without expiry: no lock delay, another holder gets it at once.
    await api.ok("PUT", "/v1/var/locks/run", params={"lock-acquire": ""}, json_body=lock_body)


async def test_lock_operation_errors(api: Api) -> None:
    status, _, text = await api.put(
        "/v1/var/l", params={"lock-acquire": "", "lock-renew": ""}, json_body={}
    )
    assert (status, text) == (400, "multiple lock operations")
    status, _, text = await api.put(
        "/v1/var/l", params={"lock-acquire": "", "cas": "0"}, json_body={}
    )
    assert (status, text) == (400, "CAS can't be used with lock operations")
    status, _, text = await api.put(
        "/v1/var/l", params={"lock-acquire": ""}, json_body={"Lock": {"TTL": "1s"}}
    )
    assert (status, text) == (400, "TTL must be between 10 seconds and 24 hours")
    status, _, text = await api.put(
        "/v1/var/nolock", params={"lock-renew": ""}, json_body={"Lock": {"ID": "x"}}
    )
    assert (status, text) == (404, "variable doesn't exist")
    status, _, text = await api.put("/v1/var/l", params={"lock-release": ""}, json_body={})
    assert (status, text) == (400, "missing lock information")


@pytest.mark.timeout(60)
async def test_lock_expires_after_twice_the_ttl_then_the_lock_delay(api: Api) -> None:
    """Nomad's minimum TTL is 10s, so this test waits out the real 2 x 10s (about 21 s)."""
    acquired = await api.ok(
        "PUT",
        "/v1/var/expiring",
        params={"lock-acquire": ""},
        json_body={"Lock": {"TTL": "10s", "LockDelay": "1s"}},
    )
    lock_id = acquired["Lock"]["ID"]
    started = time.monotonic()
    index = acquired["ModifyIndex"]
    # A blocking query wakes when the expired lock is removed from the variable.
    while True:
        status, headers, body = await api.get(
            "/v1/var/expiring", params={"index": str(index), "wait": "30s"}
        )
        assert status == 200
        index = int(headers["X-Nomad-Index"])
        if not body.get("Lock"):
            break
        assert time.monotonic() - started < 40
    elapsed = time.monotonic() - started
    assert 20.0 <= elapsed < 30.0
    status, _, text = await api.put(
        "/v1/var/expiring", params={"lock-renew": ""}, json_body={"Lock": {"ID": lock_id}}
    )
    assert (status, text) == (409, "variable doesn't hold a lock")
    await api.ok(
        "PUT",
        "/v1/var/expiring",
        params={"lock-acquire": ""},
        json_body={"Lock": {"TTL": "10s"}},
    )


async def test_variables_survive_a_restart_with_a_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with running_agent(data_dir=data_dir) as agent, api_client(agent) as api:
        written = await api.ok("PUT", "/v1/var/durable", json_body={"Items": {"k": "v"}})
    async with running_agent(data_dir=data_dir) as agent, api_client(agent) as api:
        read = await api.ok("GET", "/v1/var/durable")
        assert read == written
        _, headers, _ = await api.get("/v1/vars")
        assert int(headers["X-Nomad-Index"]) >= written["ModifyIndex"]
