"""The client file system API over real HTTP: logs (framed and plain), cat, ls, stat, readat."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import aiohttp
import nomad.api.exceptions as nomad_errors
import pytest
from devagent_http_support import (
    Api,
    batch_job,
    eventually,
    job_allocations,
    python_nomad,
    wait_job_status,
)

from nomad_pipeline.devagent.server import DevAgent

FILES_SCRIPT = (
    'echo \'{"ok": true}\' > "$NOMAD_ALLOC_DIR/data/out.json"; '
    'echo secret > "$NOMAD_SECRETS_DIR/token"; '
    'ln -s /etc "$NOMAD_ALLOC_DIR/data/escape"; '
    "echo out; echo err >&2"
)


@pytest.fixture
async def finished_alloc(api: Api) -> str:
    await api.ok("PUT", "/v1/jobs", json_body={"Job": batch_job("files", FILES_SCRIPT)})
    await wait_job_status(api, "files", "dead")
    (stub,) = await job_allocations(api, "files")
    assert stub["ClientStatus"] == "complete"
    return str(stub["ID"])


class FrameReader:
    """Decodes Nomad's framed stream: concatenated JSON objects without separators."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.buffer = ""
        self.decoder = json.JSONDecoder()

    async def frame(self, timeout: float = 10.0) -> dict[str, Any]:
        while True:
            text = self.buffer.lstrip()
            if text:
                try:
                    frame, end = self.decoder.raw_decode(text)
                except json.JSONDecodeError:
                    pass
                else:
                    self.buffer = text[end:]
                    assert isinstance(frame, dict)
                    return frame
            async with asyncio.timeout(timeout):
                chunk = await self.response.content.readany()
            assert chunk, "the stream ended"
            self.buffer += chunk.decode()


async def test_logs_followed_while_written(api: Api) -> None:
    script = "for i in 1 2 3; do echo line$i; sleep 0.3; done"
    await api.ok("PUT", "/v1/jobs", json_body={"Job": batch_job("talker", script)})

    async def started() -> dict[str, Any] | None:
        allocs = await job_allocations(api, "talker")
        if allocs and (allocs[0]["TaskStates"] or {}).get("main", {}).get("StartedAt"):
            return allocs[0]
        return None

    stub = await eventually(started)
    url = f"{api.address}/v1/client/fs/logs/{stub['ID']}"
    params = {"task": "main", "type": "stdout", "follow": "true"}
    async with api.session.get(url, params=params) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/json")
        reader = FrameReader(response)
        received = b""
        while received != b"line1\nline2\nline3\n":
            frame = await reader.frame()
            if frame == {}:
                continue
            assert frame["File"] == "alloc/logs/main.stdout.0"
            received += base64.b64decode(frame["Data"])
            assert frame["Offset"] == len(received)
        await wait_job_status(api, "talker", "dead")
        # The task is done but the followed stream stays open, beating every second.
        assert await reader.frame(timeout=5) == {}
        assert not response.content.at_eof()


async def test_logs_not_followed_end_at_eof_and_honour_origin(
    api: Api, finished_alloc: str
) -> None:
    url = f"/v1/client/fs/logs/{finished_alloc}"
    plain = await api.ok("GET", url, params={"task": "main", "type": "stderr", "plain": "true"})
    assert plain == "err\n"
    tail = await api.ok(
        "GET",
        url,
        params={"task": "main", "type": "stdout", "plain": "true", "origin": "end", "offset": "2"},
    )
    assert tail == "t\n"
    skipped = await api.ok(
        "GET", url, params={"task": "main", "type": "stdout", "plain": "true", "offset": "1"}
    )
    assert skipped == "ut\n"
    async with api.session.get(
        api.address + url, params={"task": "main", "type": "stdout"}
    ) as response:
        body = await response.text()
    frame, end = json.JSONDecoder().raw_decode(body)
    assert body[end:] == ""
    assert base64.b64decode(frame["Data"]) == b"out\n"
    assert frame == {"Offset": 4, "Data": frame["Data"], "File": "alloc/logs/main.stdout.0"}


async def test_logs_errors(api: Api, finished_alloc: str) -> None:
    url = f"/v1/client/fs/logs/{finished_alloc}"
    cases = [
        ({"type": "stdout"}, 400, "must provide task name"),
        ({"task": "nope", "type": "stdout"}, 400, 'unknown task name "nope"'),
        ({"task": "main", "type": "both"}, 400, "must provide log type (stdout/stderr)"),
        (
            {"task": "main", "type": "stdout", "origin": "middle"},
            400,
            "origin must be start or end",
        ),
    ]
    for params, expected_status, expected_text in cases:
        status, _, text = await api.get(url, params=params)
        assert (status, text) == (expected_status, expected_text), params
    status, _, text = await api.get(
        "/v1/client/fs/logs/00000000-0000-0000-0000-000000000000",
        params={"task": "main", "type": "stdout"},
    )
    assert (status, text) == (404, 'Unknown allocation "00000000-0000-0000-0000-000000000000"')


async def test_cat_ls_stat_readat(agent: DevAgent, api: Api, finished_alloc: str) -> None:
    cat = await api.ok(
        "GET", f"/v1/client/fs/cat/{finished_alloc}", params={"path": "alloc/data/out.json"}
    )
    assert cat == '{"ok": true}\n'
    part = await api.ok(
        "GET",
        f"/v1/client/fs/readat/{finished_alloc}",
        params={"path": "alloc/data/out.json", "offset": "1", "limit": "5"},
    )
    assert part == '"ok":'
    listing = await api.ok("GET", f"/v1/client/fs/ls/{finished_alloc}", params={"path": "/"})
    names = {entry["Name"]: entry for entry in listing}
    assert {"alloc", "main"} <= set(names)
    assert names["alloc"]["IsDir"] is True
    assert names["alloc"]["FileMode"].startswith("d")
    logs = await api.ok("GET", f"/v1/client/fs/ls/{finished_alloc}", params={"path": "alloc/logs"})
    assert {"main.stdout.0", "main.stderr.0"} <= {e["Name"] for e in logs}
    stat = await api.ok(
        "GET", f"/v1/client/fs/stat/{finished_alloc}", params={"path": "alloc/data/out.json"}
    )
    assert stat["Name"] == "out.json"
    assert stat["IsDir"] is False
    assert stat["Size"] == len('{"ok": true}\n')
    assert stat["ContentType"].startswith("text/plain")

    client = python_nomad(agent)
    text = await asyncio.to_thread(
        client.client.cat.read_file, finished_alloc, "alloc/data/out.json"
    )
    assert text == '{"ok": true}\n'
    entries = await asyncio.to_thread(client.client.ls.list_files, finished_alloc, "alloc")
    assert {"data", "logs", "tmp"} <= {e["Name"] for e in entries}


async def test_paths_never_leave_the_alloc_dir(api: Api, finished_alloc: str) -> None:
    cat = f"/v1/client/fs/cat/{finished_alloc}"
    for path in ("../../etc/passwd", "/../../etc/passwd", "alloc/data/escape/passwd"):
        status, _, text = await api.get(cat, params={"path": path})
        assert (status, text) == (400, "Path escapes the alloc directory"), path
    for endpoint in ("ls", "stat"):
        status, _, _ = await api.get(
            f"/v1/client/fs/{endpoint}/{finished_alloc}", params={"path": "../.."}
        )
        assert status == 400
    status, _, text = await api.get(cat, params={"path": "main/secrets/token"})
    assert (status, text) == (400, "Reading secret file prohibited: main/secrets/token")
    status, _, text = await api.get(
        f"/v1/client/fs/ls/{finished_alloc}", params={"path": "main/private"}
    )
    assert status == 400
    status, _, text = await api.get(cat, params={"path": "alloc/data/missing"})
    assert (status, text) == (400, "stat alloc/data/missing: no such file or directory")
    status, _, text = await api.get(cat, params={"path": "alloc/data"})
    assert (status, text) == (400, 'file "alloc/data" is a directory')
    status, _, text = await api.get(cat)
    assert (status, text) == (400, "must provide a file name")


async def test_python_nomad_cat_error_is_a_bad_request(
    agent: DevAgent, finished_alloc: str
) -> None:
    client = python_nomad(agent)
    with pytest.raises(nomad_errors.BadRequestNomadException):
        await asyncio.to_thread(client.client.cat.read_file, finished_alloc, "../../etc/passwd")


async def test_stream_a_file_without_following(api: Api, finished_alloc: str) -> None:
    async with api.session.get(
        f"{api.address}/v1/client/fs/stream/{finished_alloc}",
        params={"path": "alloc/data/out.json", "follow": "false", "offset": "2"},
    ) as response:
        assert response.status == 200
        body = await response.text()
    frame, end = json.JSONDecoder().raw_decode(body)
    assert body[end:] == ""
    assert frame["File"] == "alloc/data/out.json"
    assert base64.b64decode(frame["Data"]) == b'ok": true}\n'
    assert frame["Offset"] == len('{"ok": true}\n')


async def test_logs_continue_across_rotated_files(api: Api) -> None:
    job = batch_job("rotating", "head -c 1500000 /dev/zero | tr '\\0' a; echo END")
    job["TaskGroups"][0]["Tasks"][0]["LogConfig"] = {"MaxFiles": 3, "MaxFileSizeMB": 1}
    await api.ok("PUT", "/v1/jobs", json_body={"Job": job})
    await wait_job_status(api, "rotating", "dead")
    (stub,) = await job_allocations(api, "rotating")
    files = await api.ok("GET", f"/v1/client/fs/ls/{stub['ID']}", params={"path": "alloc/logs"})
    assert {"main.stdout.0", "main.stdout.1"} <= {f["Name"] for f in files}
    url = f"/v1/client/fs/logs/{stub['ID']}"
    everything = await api.ok(
        "GET", url, params={"task": "main", "type": "stdout", "plain": "true"}
    )
    assert len(everything) == 1_500_000 + len("END\n")
    assert everything.endswith("aaaEND\n")
    tail = await api.ok(
        "GET",
        url,
        params={"task": "main", "type": "stdout", "plain": "true", "origin": "end", "offset": "6"},
    )
    assert tail == "aaEND\n"


async def test_a_followed_log_moves_on_to_the_files_rotated_while_following(api: Api) -> None:
    # The follower waits on a quiet first file, then the task fills it and spills into the next.
    script = "sleep 1; head -c 1500000 /dev/zero | tr '\\0' a; echo END; sleep 30"
    job = batch_job("spilling", script)
    job["TaskGroups"][0]["Tasks"][0]["LogConfig"] = {"MaxFiles": 3, "MaxFileSizeMB": 1}
    await api.ok("PUT", "/v1/jobs", json_body={"Job": job})

    async def started() -> dict[str, Any] | None:
        allocs = await job_allocations(api, "spilling")
        if allocs and (allocs[0]["TaskStates"] or {}).get("main", {}).get("StartedAt"):
            return allocs[0]
        return None

    stub = await eventually(started)
    url = f"{api.address}/v1/client/fs/logs/{stub['ID']}"
    params = {"task": "main", "type": "stdout", "follow": "true", "plain": "true"}
    received = 0
    async with api.session.get(url, params=params) as response:
        assert response.status == 200
        tail = b""
        while not tail.endswith(b"aEND\n"):
            async with asyncio.timeout(20):
                chunk = await response.content.readany()
            assert chunk, "the stream ended"
            received += len(chunk)
            tail = (tail + chunk)[-16:]
    assert received == 1_500_000 + len("END\n")
    await api.ok("DELETE", "/v1/job/spilling")
