"""The composition root: configuration, start/stop, reconciler registration, the dev stack."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import pytest
from controller_api_helpers import API, inline_flow, namespace

from nomad_pipeline.app import (
    AppContext,
    ControllerApp,
    ControllerConfig,
    DevStack,
    JsonFormatter,
    parse_http_addr,
)
from nomad_pipeline.controller.manager import watch_store
from nomad_pipeline.controller.runnertoken import load_or_create_shared_secret, runner_token
from nomad_pipeline.controller.runtime import Controller, Request, Result, Runnable
from nomad_pipeline.devagent.server import DevAgent, DevAgentConfig
from nomad_pipeline.errors import Invalid
from nomad_pipeline.nomad.client import NomadClient
from nomad_pipeline.resources.kinds import Flow, Run, RunSpec
from nomad_pipeline.resources.meta import ObjectMeta
from nomad_pipeline.runner.protocol import RUNNER_API_PREFIX


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("http://0.0.0.0:9000", ("0.0.0.0", 9000)),
        ("http://localhost:8080/", ("localhost", 8080)),
        (":8080", ("0.0.0.0", 8080)),
        ("[::1]:0", ("::1", 0)),
    ],
)
def test_http_addr_forms(text: str, expected: tuple[str, int]) -> None:
    assert parse_http_addr(text) == expected


@pytest.mark.parametrize("text", ["8080", "localhost", "http://host:port", "host:99999"])
def test_bad_http_addr_is_refused(text: str) -> None:
    with pytest.raises(Invalid) as raised:
        parse_http_addr(text)
    assert raised.value.field == "http_addr"


def test_nomad_settings_default_from_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("NOMAD_ADDR", "http://nomad.example:4646")
    monkeypatch.setenv("NOMAD_TOKEN", "secret")
    config = ControllerConfig(data_dir=tmp_path)
    assert (config.nomad_addr, config.nomad_token) == ("http://nomad.example:4646", "secret")
    monkeypatch.delenv("NOMAD_ADDR")
    monkeypatch.delenv("NOMAD_TOKEN")
    config = ControllerConfig(data_dir=tmp_path)
    assert (config.nomad_addr, config.nomad_token) == ("http://127.0.0.1:4646", None)
    with pytest.raises(Invalid):
        ControllerConfig(data_dir=tmp_path, state_backend="etcd")  # type: ignore[arg-type]


def test_advertise_address_is_a_url_runners_can_reach(tmp_path: Path) -> None:
    given = ControllerConfig(data_dir=tmp_path, advertise_addr="10.0.0.5:8080")
    assert given.advertise_addr == "http://10.0.0.5:8080"
    kept = ControllerConfig(data_dir=tmp_path, advertise_addr="https://ci.example:443/")
    assert kept.advertise_addr == "https://ci.example:443"
    for unreachable in ("0.0.0.0:8080", "http://[::]:8080", "no-port"):
        with pytest.raises(Invalid) as refused:
            ControllerConfig(data_dir=tmp_path, advertise_addr=unreachable)
        assert refused.value.field == "advertise_addr"


class FlowCounter:
    """A reconciler recording which flows it saw, to show the wiring end to end."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.changed = asyncio.Event()

    async def reconcile(self, request: Request) -> Result:
        self.seen.add(request.name)
        self.changed.set()
        return Result()


async def test_controller_app_serves_and_runs_registered_reconcilers(tmp_path: Path) -> None:
    counter = FlowCounter()
    contexts: list[AppContext] = []

    def flows(context: AppContext) -> Sequence[Runnable]:
        contexts.append(context)
        controller = Controller("flows", counter, workers=2)
        return [controller, watch_store(context.store, Flow, controller.enqueue)]

    app = ControllerApp(
        ControllerConfig(data_dir=tmp_path, http_addr="127.0.0.1:0"),
        reconciler_factories=[flows],
        api_routes=[],
    )
    address = await app.start()
    try:
        assert contexts[0].log_root == tmp_path / "logs"
        assert (tmp_path / "logs").is_dir()
        async with aiohttp.ClientSession() as session:
            async with session.get(address + "/readyz") as response:
                assert response.status == 200
            async with session.get(f"{address}{API}/namespaces/default") as response:
                assert response.status == 200, "the default namespace exists from the start"
            body = {"items": [namespace("ci"), inline_flow("build", "ci")]}
            async with session.put(f"{address}{API}/apply", json=body) as response:
                assert response.status == 200, await response.text()
        async with asyncio.timeout(5):
            while "build" not in counter.seen:
                counter.changed.clear()
                await counter.changed.wait()
    finally:
        await app.stop()
    await app.stop()  # idempotent
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(address + "/healthz")


async def test_failed_start_releases_what_it_started(tmp_path: Path) -> None:
    def broken(context: AppContext) -> Sequence[Runnable]:
        raise RuntimeError("cannot build")

    app = ControllerApp(
        ControllerConfig(data_dir=tmp_path, http_addr="127.0.0.1:0"),
        reconciler_factories=[broken],
        api_routes=[],
    )
    with pytest.raises(RuntimeError, match="cannot build"):
        await app.start()
    with pytest.raises(RuntimeError):
        _ = app.store


def test_json_log_lines_carry_extra_fields() -> None:
    record = logging.LogRecord(
        "nomad_pipeline.x", logging.INFO, __file__, 1, "run started", None, None
    )
    record.run = "01j0"
    record.namespace = "default"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "run started"
    assert (line["run"], line["namespace"], line["level"]) == ("01j0", "default", "info")


async def test_dev_stack_keeps_objects_across_restarts(tmp_path: Path) -> None:
    """The dev stack runs the controller on the dev agent with the nomad-vars backend."""
    stack = DevStack(data_dir=tmp_path, port=0, nomad_port=0)
    address, nomad_address = await stack.start()
    try:
        async with aiohttp.ClientSession() as session:
            body = {"items": [namespace("ci"), inline_flow("build", "ci")]}
            async with session.put(f"{address}{API}/apply", json=body) as response:
                assert response.status == 200, await response.text()
            async with session.get(
                f"{nomad_address}/v1/vars", params={"prefix": "nomad-pipeline"}
            ) as response:
                paths = [variable["Path"] for variable in await response.json()]
            assert any("build" in path for path in paths), paths
    finally:
        await stack.stop()

    stack = DevStack(data_dir=tmp_path, port=0, nomad_port=0)
    address, _ = await stack.start()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{address}{API}/namespaces/ci/flows/build") as response,
        ):
            assert response.status == 200, await response.text()
            flow = await response.json()
        assert flow["spec"]["inline"]["steps"][0]["run"] == "echo hello"
    finally:
        await stack.stop()


async def test_readyz_answers_503_until_ready(tmp_path: Path) -> None:
    from nomad_pipeline.controller.api.app import build_api, start_api
    from nomad_pipeline.store.memory import MemoryStore

    ready = asyncio.Event()
    store = MemoryStore()
    server = await start_api(build_api(store, log_root=tmp_path, ready=ready))
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(server.address + "/readyz") as response:
                assert response.status == 503
            async with session.get(server.address + "/healthz") as response:
                assert response.status == 200
            await store.start()
            ready.set()
            async with session.get(server.address + "/readyz") as response:
                assert response.status == 200
    finally:
        await server.stop()
        await store.close()


async def test_controllers_on_one_nomad_accept_each_others_runner_tokens(tmp_path: Path) -> None:
    """With the nomad-vars backend the runner secret lives in Nomad: a runner started by one
    controller may report to another (a new leader, or any instance behind one address)."""
    agent = DevAgent(DevAgentConfig(port=0, data_dir=tmp_path / "nomad"))
    nomad_address = await agent.start()
    apps = [
        ControllerApp(
            ControllerConfig(
                data_dir=tmp_path / name,
                http_addr="127.0.0.1:0",
                nomad_addr=nomad_address,
                nomad_token="",
                state_backend="nomad-vars",
            ),
            reconciler_factories=[],
        )
        for name in ("first", "second")
    ]
    try:
        first, second = [await app.start() for app in apps]
        flow = Flow.model_validate(inline_flow("shared"))
        await apps[0].store.create(flow)
        run = await apps[0].store.create(
            Run(metadata=ObjectMeta(name="r1"), spec=RunSpec(flow="shared", flow_spec=flow.spec))
        )
        # The second controller's store follows Nomad: wait until it holds the run too.
        async with asyncio.timeout(10):
            while not (await apps[1].store.list(Run, "default")).items:
                await asyncio.sleep(0.02)
        async with NomadClient(nomad_address) as nomad:
            secret = await load_or_create_shared_secret(nomad, "default")
        token = runner_token(secret, "default", run.metadata.name)
        async with aiohttp.ClientSession() as http:
            for address in (first, second):
                url = f"{address}{RUNNER_API_PREFIX}/default/r1"
                async with http.get(url, headers={"Authorization": f"Bearer {token}"}) as answer:
                    assert answer.status == 200, await answer.text()
                async with http.get(url, headers={"Authorization": "Bearer " + "0" * 64}) as bad:
                    assert bad.status == 401
    finally:
        for app in apps:
            await app.stop()
        await agent.stop()
