"""Watch streams over real HTTP: label-selector semantics (objects moving in and out of the
selection, live and replayed from the store's history) and a clean end on server shutdown."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from controller_api_helpers import API, Api, inline_flow

from nomad_pipeline.controller.admission import ensure_default_namespace
from nomad_pipeline.controller.api.app import ApiServer, build_api, start_api
from nomad_pipeline.controller.api.watch import WATCH_STREAMS
from nomad_pipeline.store.memory import MemoryStore

REPO_ROOT = Path(__file__).resolve().parents[2]
CLI_BINARY = REPO_ROOT / ".venv" / "bin" / "nomad-pipeline"
EVENT_DEADLINE = 10.0
# Far above what a clean end takes; a shutdown that waits for it proves the watch held it up.
SHUTDOWN_TIMEOUT = 30.0
PROMPT_SHUTDOWN = 5.0


def team_flow(name: str, team: str, *, run: str = "echo hello") -> dict[str, Any]:
    return inline_flow(name, run=run, labels={"team": team})


async def read_events_until(lines: AsyncIterator[bytes], name: str) -> list[tuple[str, str, str]]:
    """``(type, name, team label)`` of every event up to and including the first for ``name``."""
    seen: list[tuple[str, str, str]] = []
    async with asyncio.timeout(EVENT_DEADLINE):
        while not seen or seen[-1][1] != name:
            event = json.loads(await anext(lines))
            metadata = event["object"]["metadata"]
            seen.append((event["type"], metadata["name"], metadata["labels"].get("team", "")))
    return seen


async def change_labels_in_and_out_of_team_x(api: Api) -> None:
    """Every way a change can relate to the selector ``team=x``; ``marker`` comes last."""
    await api.apply(team_flow("a", "x", run="echo changed"))  # matched, still matches
    await api.apply(team_flow("a", "y", run="echo changed"))  # leaves the selection
    await api.apply(team_flow("b", "x"))  # enters the selection
    await api.apply(team_flow("a", "y", run="echo again"))  # matched neither before nor after
    await api.apply(team_flow("c", "y"))  # created outside the selection
    await api.apply(team_flow("c", "x"))  # enters the selection
    await api.call("DELETE", f"{API}/namespaces/default/flows/b")  # a matching one is deleted
    await api.call("DELETE", f"{API}/namespaces/default/flows/a")  # a non-matching one is
    await api.apply(team_flow("marker", "x"))


# What a ``team=x`` watch reports for those changes; DELETED for "a" carries its new labels.
EXPECTED_AFTER_CHANGES = [
    ("MODIFIED", "a", "x"),
    ("DELETED", "a", "y"),
    ("ADDED", "b", "x"),
    ("ADDED", "c", "x"),
    ("DELETED", "b", "x"),
    ("ADDED", "marker", "x"),
]


@pytest.mark.parametrize("start", ["listed", "from-version", "replayed"])
async def test_label_changes_move_objects_in_and_out_of_a_selected_watch(
    api: Api, start: str
) -> None:
    await api.apply(team_flow("a", "x"))
    await api.apply(team_flow("b", "y"))
    _, listed = await api.call("GET", f"{API}/flows", labelSelector="team=x")
    params = {"watch": "true", "labelSelector": "team=x"}
    if start != "listed":
        params["resource_version"] = listed["metadata"]["resource_version"]
    if start == "replayed":
        # Every change happens before the watch starts: they all come from the store's history.
        await change_labels_in_and_out_of_team_x(api)
    async with api.session.get(f"{api.address}{API}/flows", params=params) as response:
        assert response.status == 200
        lines = response.content.__aiter__()
        if start == "listed":
            # The watch lists first: the selected object, then the changes.
            assert await read_events_until(lines, "a") == [("ADDED", "a", "x")]
        if start != "replayed":
            await change_labels_in_and_out_of_team_x(api)
        assert await read_events_until(lines, "marker") == EXPECTED_AFTER_CHANGES


async def test_a_watch_without_selector_sees_every_change_as_it_is(api: Api) -> None:
    _, listed = await api.call("GET", f"{API}/flows")
    params = {"watch": "true", "resource_version": listed["metadata"]["resource_version"]}
    async with api.session.get(f"{api.address}{API}/flows", params=params) as response:
        lines = response.content.__aiter__()
        await api.apply(team_flow("a", "x"))
        await api.apply(team_flow("a", "y"))
        await api.call("DELETE", f"{API}/namespaces/default/flows/a")
        await api.apply(team_flow("marker", "x"))
        assert await read_events_until(lines, "marker") == [
            ("ADDED", "a", "x"),
            ("MODIFIED", "a", "y"),
            ("DELETED", "a", "y"),
            ("ADDED", "marker", "x"),
        ]


@dataclass
class Served:
    """An API server over a memory store, its application and an HTTP client session."""

    app: web.Application
    server: ApiServer
    api: Api

    async def wait_until_streams_wait(self, count: int) -> None:
        """Until ``count`` watch streams wait for their next event (the quiet state)."""
        async with asyncio.timeout(EVENT_DEADLINE):
            while self.app[WATCH_STREAMS].waiting < count:
                await asyncio.sleep(0.005)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    store = MemoryStore()
    await store.start()
    await ensure_default_namespace(store)
    app = build_api(store, log_root=tmp_path / "logs")
    server = await start_api(app, shutdown_timeout=SHUTDOWN_TIMEOUT)
    try:
        async with aiohttp.ClientSession() as session:
            yield Served(app, server, Api(server.address, store, session))
    finally:
        # Tests stop the server themselves; stop it here only when one failed before that.
        if server.runner.server is not None:
            await server.stop()
        await store.close()


async def test_shutdown_ends_open_watches_cleanly_and_promptly(served: Served) -> None:
    api = served.api
    await api.apply(team_flow("a", "x"))
    url = f"{api.address}{API}/flows"
    everything = await api.session.get(url, params={"watch": "true"})
    selected = await api.session.get(url, params={"watch": "true", "labelSelector": "team=x"})
    for response in (everything, selected):
        assert response.status == 200
        first = json.loads(await response.content.readline())
        assert (first["type"], first["object"]["metadata"]["name"]) == ("ADDED", "a")
    await api.apply(team_flow("b", "x"))
    for response in (everything, selected):
        event = json.loads(await response.content.readline())
        assert (event["type"], event["object"]["metadata"]["name"]) == ("ADDED", "b")
    await served.wait_until_streams_wait(2)

    loop = asyncio.get_running_loop()
    started = loop.time()
    await served.server.stop()
    assert loop.time() - started < PROMPT_SHUTDOWN, "shutdown waited for the open watches"
    for response in (everything, selected):
        # The chunked body ends properly: a cut stream raises ClientPayloadError here.
        async with asyncio.timeout(EVENT_DEADLINE):
            rest = await response.content.read()
        assert rest == b""
        assert response.content.at_eof()
        response.release()


async def test_a_watch_opened_during_shutdown_ends_after_its_list(served: Served) -> None:
    api = served.api
    await api.apply(team_flow("a", "x"))
    # As if shutdown began while this request was on its way in.
    served.app[WATCH_STREAMS].end_all()
    async with api.session.get(f"{api.address}{API}/flows", params={"watch": "true"}) as response:
        async with asyncio.timeout(EVENT_DEADLINE):
            lines = [json.loads(line) async for line in response.content]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in lines] == [("ADDED", "a")]
    await served.server.stop()


async def test_cli_watch_ends_with_a_note_when_the_server_goes_away(served: Served) -> None:
    await served.api.apply(team_flow("a", "x"))
    watcher = await asyncio.create_subprocess_exec(
        str(CLI_BINARY),
        *("get", "flows", "-w", "-o", "name", "--addr", served.api.address),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert watcher.stdout is not None
        async with asyncio.timeout(EVENT_DEADLINE):
            assert await watcher.stdout.readline() == b"flow.nomad-pipeline.io/a\n"
        await served.wait_until_streams_wait(1)

        await served.server.stop()
        async with asyncio.timeout(EVENT_DEADLINE):
            _, err = await watcher.communicate()
        assert watcher.returncode == 0
        assert err.decode() == "watch ended: the server closed the stream\n"
    finally:
        if watcher.returncode is None:
            watcher.terminate()
            await watcher.wait()
