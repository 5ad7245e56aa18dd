"""The log routes over real HTTP: seed JSON lines, tail streams that end with the step."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from nomad_pipeline.controller.api import logs
from nomad_pipeline.controller.api.app import build_api, start_api
from nomad_pipeline.controller.logstore import LogStore
from nomad_pipeline.resources.kinds import FlowSpec, Namespace, Run, RunSpec, StepStatus
from nomad_pipeline.resources.meta import ObjectMeta
from nomad_pipeline.store.memory import MemoryStore

DEADLINE = 10.0


@dataclass
class Api:
    address: str
    store: MemoryStore
    log_store: LogStore
    session: aiohttp.ClientSession

    async def set_step_phase(self, step: str, phase: str) -> None:
        run = (await self.store.get(Run, "default", "01run")).model_copy(deep=True)
        run.status.steps = [
            StepStatus(name=s.name, phase=phase if s.name == step else s.phase)  # type: ignore[arg-type]
            for s in run.status.steps
        ]
        await self.store.update_status(run)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    store = MemoryStore()
    await store.start()
    await store.create(Namespace(metadata=ObjectMeta(name="default")))
    spec = FlowSpec.model_validate(
        {"inline": {"steps": [{"name": "build", "run": "make"}, {"name": "test", "run": "t"}]}}
    )
    run = await store.create(
        Run(
            metadata=ObjectMeta(name="01run", namespace="default"),
            spec=RunSpec(flow="flow", flow_spec=spec),
        )
    )
    running = run.model_copy(deep=True)
    running.status.phase = "running"
    running.status.steps = [StepStatus(name="build", phase="running"), StepStatus(name="test")]
    await store.update_status(running)
    log_store = LogStore(tmp_path / "logs")
    app = build_api(
        store,
        log_root=tmp_path / "logs",
        extra_routes=[logs.provide_log_store(log_store), logs.setup],
    )
    server = await start_api(app, shutdown_timeout=1.0)
    async with aiohttp.ClientSession(server.address) as session:
        yield Api(server.address, store, log_store, session)
    await server.stop()
    await store.close()


async def test_plain_read_answers_json_lines(api: Api) -> None:
    await api.log_store.append("default", "01run", "build", "stdout", b"one\ntwo \xe2\x9c\x93\n")
    await api.log_store.append("default", "01run", "build", "stderr", b"warn\n")

    async with api.session.get(
        "/v1/runs/01run/logs", params={"step_id": "build", "type": "stdout"}
    ) as response:
        assert response.status == 200
        assert response.content_type == "application/x-ndjson"
        lines = [json.loads(line) for line in (await response.text()).splitlines()]
    assert lines == [
        {"run_id": "01run", "step_id": "build", "type": "stdout", "line": "one"},
        {"run_id": "01run", "step_id": "build", "type": "stdout", "line": "two \u2713"},
    ]
    async with api.session.get(
        "/v1/runs/01run/logs", params={"namespace": "default", "step_id": "build", "type": "stderr"}
    ) as response:
        assert [json.loads(line)["line"] for line in (await response.text()).splitlines()] == [
            "warn"
        ]


async def test_tail_streams_new_lines_and_ends_when_the_step_ends(api: Api) -> None:
    await api.log_store.append("default", "01run", "build", "stdout", b"early\n")
    async with api.session.get(
        "/v1/runs/01run/logs", params={"step_id": "build", "tail": "true"}
    ) as response:
        assert response.status == 200
        assert await response.content.readline() == b"early\n"
        latencies = []
        for number in range(10):
            started = time.perf_counter()
            line = f"line {number}\n".encode()
            await api.log_store.append("default", "01run", "build", "stdout", line)
            async with asyncio.timeout(DEADLINE):
                assert await response.content.readline() == line
            latencies.append(time.perf_counter() - started)
        assert max(latencies) < 0.25

        await api.log_store.append("default", "01run", "build", "stdout", b"last\n")
        # Only the Run's status says the step ended: the stream drains and closes.
        await api.set_step_phase("build", "success")
        async with asyncio.timeout(DEADLINE):
            rest = await response.content.read()
    assert rest == b"last\n"


async def test_tail_of_a_finished_step_returns_its_log_and_closes(api: Api) -> None:
    await api.log_store.append("default", "01run", "build", "stdout", b"all\n")
    await api.set_step_phase("build", "failed")
    async with (
        asyncio.timeout(DEADLINE),
        api.session.get("/v1/runs/01run/logs", params={"step_id": "build", "tail": "true"}) as r,
    ):
        assert await r.read() == b"all\n"


async def test_native_route_is_plain_text_and_follows(api: Api) -> None:
    await api.log_store.append("default", "01run", "test", "stderr", b"e1\n")
    path = "/apis/nomad-pipeline.io/v1/namespaces/default/runs/01run/logs"
    async with api.session.get(path, params={"step": "test", "stream": "stderr"}) as response:
        assert response.content_type == "text/plain"
        assert await response.read() == b"e1\n"

    async with api.session.get(
        path, params={"step": "test", "stream": "stderr", "follow": "true"}
    ) as response:
        assert await response.content.readline() == b"e1\n"
        await api.log_store.append("default", "01run", "test", "stderr", b"e2\n")
        await api.log_store.mark_step_finished("default", "01run", "test")
        async with asyncio.timeout(DEADLINE):
            assert await response.content.read() == b"e2\n"


@pytest.mark.parametrize(
    ("path", "params", "status", "reason"),
    [
        ("/v1/runs/nope/logs", {"step_id": "build"}, 404, "NotFound"),
        ("/v1/runs/01run/logs", {"step_id": "deploy"}, 404, "NotFound"),
        ("/v1/runs/01run/logs", {"step_id": "../../../etc"}, 404, "NotFound"),
        ("/v1/runs/01run/logs", {"step_id": "build", "type": "stdin"}, 400, "Invalid"),
        ("/v1/runs/01run/logs", {}, 400, "Invalid"),
        ("/v1/runs/01run/logs", {"step_id": "build", "tail": "maybe"}, 400, "Invalid"),
        ("/v1/runs/01run/logs", {"step_id": "build", "namespace": "other"}, 404, "NotFound"),
        (
            "/apis/nomad-pipeline.io/v1/namespaces/default/runs/01run/logs",
            {"step": "x"},
            404,
            "NotFound",
        ),
    ],
)
async def test_bad_requests_are_answered_with_errors(
    api: Api, path: str, params: dict[str, str], status: int, reason: str
) -> None:
    async with api.session.get(path, params=params) as response:
        assert response.status == status
        body = await response.json()
    assert body["error"]["reason"] == reason
    assert body["error"]["message"]


async def test_a_log_larger_than_a_chunk_keeps_every_line_whole(api: Api) -> None:
    lines = [f"{number:06} " + "x" * (number % 97) for number in range(5000)]
    data = "\n".join(lines).encode()  # no final newline: the last line is still a line
    await api.log_store.append("default", "01run", "build", "stdout", data)
    async with api.session.get("/v1/runs/01run/logs", params={"step_id": "build"}) as response:
        received = [json.loads(line)["line"] for line in (await response.text()).splitlines()]
    assert received == lines
    path = "/apis/nomad-pipeline.io/v1/namespaces/default/runs/01run/logs"
    async with api.session.get(path, params={"step": "build"}) as response:
        assert await response.read() == data


async def test_tail_of_a_specification_step_waits_for_the_copied_output(api: Api) -> None:
    # A specification step's output is copied from Nomad and can land after the Run already
    # shows the step over: the stream must wait for the copier's finished mark.
    spec = FlowSpec.model_validate(
        {"specification": {"steps": [{"name": "build", "job": {"hcl": 'job "x" {}'}}]}}
    )
    run = await api.store.create(
        Run(
            metadata=ObjectMeta(name="01spec", namespace="default"),
            spec=RunSpec(flow="flow", flow_spec=spec),
        )
    )
    finished = run.model_copy(deep=True)
    finished.status.phase = "success"
    finished.status.steps = [StepStatus(name="build", phase="success")]
    await api.store.update_status(finished)
    await api.log_store.append("default", "01spec", "build", "stdout", b"copied early\n")
    async with (
        asyncio.timeout(DEADLINE),
        api.session.get("/v1/runs/01spec/logs", params={"step_id": "build", "tail": "true"}) as r,
    ):
        assert await r.content.readline() == b"copied early\n"
        await api.log_store.append("default", "01spec", "build", "stdout", b"copied late\n")
        await api.log_store.mark_step_finished("default", "01spec", "build")
        assert await r.read() == b"copied late\n"
