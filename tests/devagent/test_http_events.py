"""The event stream over real HTTP: NDJSON framing, heartbeats, topics, namespaces, resumption."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from devagent_http_support import Api, batch_job, python_nomad, running_agent

from nomad_pipeline.devagent.server import DevAgent


@pytest.fixture
async def agent() -> AsyncIterator[DevAgent]:
    async with running_agent(event_heartbeat=0.2) as started:
        yield started


class Stream:
    """Reads NDJSON lines from an open event stream."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def line(self, timeout: float = 10.0) -> Any:
        async with asyncio.timeout(timeout):
            raw = await self.response.content.readline()
        assert raw.endswith(b"\n"), raw
        return json.loads(raw)

    async def batch(self, timeout: float = 10.0) -> Any:
        """The next batch, skipping heartbeats."""
        while True:
            line = await self.line(timeout)
            if line != {}:
                return line


async def open_stream(api: Api, **params: Any) -> tuple[aiohttp.ClientResponse, Stream]:
    response = await api.session.get(
        api.address + "/v1/event/stream", params=params, timeout=aiohttp.ClientTimeout(total=60)
    )
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/json")
    return response, Stream(response)


async def test_heartbeat_at_connect_and_while_idle(api: Api) -> None:
    _, headers, _ = await api.get("/v1/nodes")
    # From the current index: the node's registration is not replayed.
    response, stream = await open_stream(api, index=headers["X-Nomad-Index"])
    async with response:
        assert await stream.line() == {}
        # the fixture's agent beats every 0.2 s (Nomad: 30 s)
        assert await stream.line(timeout=5) == {}


async def test_variable_events_with_topic_and_key_filters(api: Api) -> None:
    response, stream = await open_stream(api, topic="Variable:wanted")
    async with response:
        assert await stream.line() == {}
        await api.ok("PUT", "/v1/var/ignored", json_body={"Items": {"a": "1"}})
        written = await api.ok("PUT", "/v1/var/wanted", json_body={"Items": {"a": "1"}})
        batch = await stream.batch()
        assert batch["Index"] == written["ModifyIndex"]
        (event,) = batch["Events"]
        assert event["Topic"] == "Variable"
        assert event["Type"] == "VariableUpserted"
        assert event["Key"] == "wanted"
        assert event["Namespace"] == "default"
        assert event["Index"] == written["ModifyIndex"]
        assert "Items" not in event["Payload"]["Variable"]


async def test_resume_from_an_index(api: Api) -> None:
    indexes = []
    for n in range(3):
        written = await api.ok("PUT", f"/v1/var/seq{n}", json_body={"Items": {"n": str(n)}})
        indexes.append(written["ModifyIndex"])
    response, stream = await open_stream(api, topic="Variable", index=str(indexes[0]))
    async with response:
        assert await stream.line() == {}
        first = await stream.batch()
        second = await stream.batch()
        assert [first["Index"], second["Index"]] == indexes[1:]
        assert [first["Events"][0]["Key"], second["Events"][0]["Key"]] == ["seq1", "seq2"]


async def test_namespace_filter(api: Api) -> None:
    await api.ok("PUT", "/v1/namespace/ci", json_body={"Name": "ci"})
    response, stream = await open_stream(api, topic="Variable", namespace="ci")
    async with response:
        assert await stream.line() == {}
        await api.ok("PUT", "/v1/var/x", json_body={"Items": {"a": "1"}})
        await api.ok(
            "PUT", "/v1/var/x", params={"namespace": "ci"}, json_body={"Items": {"a": "1"}}
        )
        batch = await stream.batch()
        assert batch["Events"][0]["Namespace"] == "ci"
    response, stream = await open_stream(api, topic="Variable", namespace="*", index="1")
    async with response:
        assert await stream.line() == {}
        namespaces = {(await stream.batch())["Events"][0]["Namespace"] for _ in range(2)}
        assert namespaces == {"default", "ci"}


async def test_bad_parameters(api: Api) -> None:
    status, _, text = await api.get("/v1/event/stream", params={"index": "x"})
    assert (status, text) == (400, "Unable to parse index")
    status, _, text = await api.get("/v1/event/stream", params={"topic": "Job:"})
    assert status == 400
    assert text.startswith("Invalid topic query")


async def test_job_lifecycle_events_filtered_by_job_id(api: Api) -> None:
    response, stream = await open_stream(
        api, topic=["Job:ev-job", "Allocation:ev-job", "Evaluation:ev-job"]
    )
    async with response:
        assert await stream.line() == {}
        await api.ok("PUT", "/v1/jobs", json_body={"Job": batch_job("other", "exit 0")})
        await api.ok("PUT", "/v1/jobs", json_body={"Job": batch_job("ev-job", "exit 0")})
        seen: dict[str, set[str]] = {}
        last_index = 0
        while not _alloc_completed(seen):
            batch = await stream.batch(timeout=20)
            assert batch["Index"] > last_index
            last_index = batch["Index"]
            for event in batch["Events"]:
                job_id = event["Key"] if event["Topic"] == "Job" else event["FilterKeys"][0]
                assert job_id == "ev-job"
                seen.setdefault(event["Topic"], set()).add(event["Type"])
                if event["Topic"] == "Allocation":
                    allocation = event["Payload"]["Allocation"]
                    seen.setdefault("AllocationStatus", set()).add(allocation["ClientStatus"])
        assert "JobRegistered" in seen["Job"]
        assert seen["Evaluation"]
        assert "AllocationUpdated" in seen["Allocation"]


def _alloc_completed(seen: dict[str, set[str]]) -> bool:
    return "complete" in seen.get("AllocationStatus", set())


async def test_python_nomad_resumes_the_stream_by_index(agent: DevAgent, api: Api) -> None:
    indexes = []
    for n in range(3):
        written = await api.ok("PUT", f"/v1/var/py{n}", json_body={"Items": {"n": str(n)}})
        indexes.append(written["ModifyIndex"])
    client = python_nomad(agent)
    thread, stop, events = client.event.stream.get_stream(index=indexes[0], topic=["Variable"])
    thread.start()
    try:
        first = await asyncio.to_thread(events.get, True, 10)
        second = await asyncio.to_thread(events.get, True, 10)
        assert [first["Index"], second["Index"]] == indexes[1:]
        assert second["Events"][0]["Key"] == "py2"
    finally:
        stop.set()
        # the fixture's 0.2 s heartbeats let the reader thread notice the stop
        await asyncio.to_thread(thread.join, 10)
    assert not thread.is_alive()
