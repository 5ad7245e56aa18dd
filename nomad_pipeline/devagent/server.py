"""The dev agent: one Nomad server + client node in one process, speaking Nomad's HTTP API.

``DevAgent`` wires the state, the engine (scheduler and task runner) and the HTTP routes, and
owns their lifecycle: ``start`` binds the HTTP port (0 = ephemeral) and returns the address;
``stop`` closes HTTP, kills every task through the engine and closes the state. ``serve`` runs
an agent until SIGINT/SIGTERM (``nomad-pipeline dev-nomad`` and ``python -m
nomad_pipeline.devagent``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from aiohttp import web
from aiohttp.typedefs import Middleware

from nomad_pipeline.devagent import events, fs, variables
from nomad_pipeline.devagent.acl import acl_middleware
from nomad_pipeline.devagent.engine import Engine
from nomad_pipeline.devagent.http import STATE_KEY, error_middleware
from nomad_pipeline.devagent.routes import cluster, jobs
from nomad_pipeline.devagent.state import DEFAULT_EVENT_BUFFER, StateStore

logger = logging.getLogger(__name__)

# Streams (followed logs, the event stream) never end by themselves: on stop, give in-flight
# requests this long before their handlers are cancelled.
SHUTDOWN_GRACE = 0.5


@dataclass
class DevAgentConfig:
    bind: str = "127.0.0.1"
    port: int = 4646
    data_dir: Path | None = None
    node_name: str | None = None
    acl_token: str | None = None
    event_buffer: int = DEFAULT_EVENT_BUFFER
    # Seconds between ``{}`` heartbeats on the event stream (Nomad: 30 s).
    event_heartbeat: float = events.HEARTBEAT_INTERVAL


def _format_address(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class DevAgent:
    """A local Nomad-compatible agent; ``async with DevAgent(config) as agent`` starts it."""

    def __init__(self, config: DevAgentConfig) -> None:
        self.config = config
        self._state: StateStore | None = None
        self._engine: Engine | None = None
        self._variables: variables.Variables | None = None
        self._runner: web.AppRunner | None = None
        self._temp_dir: Path | None = None
        self._address = ""

    @property
    def address(self) -> str:
        if not self._address:
            raise RuntimeError("the dev agent is not started")
        return self._address

    @property
    def state(self) -> StateStore:
        if self._state is None:
            raise RuntimeError("the dev agent is not started")
        return self._state

    async def __aenter__(self) -> DevAgent:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> str:
        if self._runner is not None:
            return self._address
        config = self.config
        node_name = config.node_name or socket.gethostname()
        if config.data_dir is None:
            self._temp_dir = Path(tempfile.mkdtemp(prefix="nomad-devagent-"))
            alloc_root = self._temp_dir / "alloc"
        else:
            config.data_dir.mkdir(parents=True, exist_ok=True)
            alloc_root = config.data_dir / "alloc"
        sock = _bind(config.bind, config.port)
        port = sock.getsockname()[1]
        advertise = cluster.AgentInfo(config.bind, port, node_name, "", False, False).advertise
        self._address = _format_address(advertise, port)
        try:
            state = StateStore(config.data_dir, event_buffer=config.event_buffer)
            self._state = state
            await state.open()
            self._engine = Engine(
                state, alloc_root=alloc_root, node_name=node_name, http_addr=self._address
            )
            await self._engine.start()
            self._variables = variables.Variables(state)
            await self._variables.start()
            info = cluster.AgentInfo(
                bind=config.bind,
                http_port=port,
                node_name=node_name,
                data_dir=str(config.data_dir or self._temp_dir),
                dev_mode=config.data_dir is None,
                acl_enabled=config.acl_token is not None,
            )
            app = self._build_app(state, self._engine, self._variables, info)
            self._runner = web.AppRunner(
                app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_GRACE
            )
            await self._runner.setup()
            await web.SockSite(self._runner, sock).start()
        except BaseException:
            sock.close()
            await self.stop()
            raise
        logger.info("dev agent started", extra={"address": self._address})
        return self._address

    def _build_app(
        self,
        state: StateStore,
        engine: Engine,
        variable_store: variables.Variables,
        info: cluster.AgentInfo,
    ) -> web.Application:
        middlewares: list[Middleware] = [error_middleware]
        if self.config.acl_token is not None:
            middlewares.append(acl_middleware(self.config.acl_token))
        app = web.Application(middlewares=middlewares, client_max_size=16 * 1024 * 1024)
        app[STATE_KEY] = state
        app[jobs.ENGINE_KEY] = engine
        app[fs.FILES_KEY] = engine
        app[variables.VARIABLES_KEY] = variable_store
        app[cluster.AGENT_INFO_KEY] = info
        cluster.add_routes(app)
        jobs.add_routes(app)
        variables.add_routes(app)
        fs.add_routes(app)
        events.add_routes(app, heartbeat=self.config.event_heartbeat)
        return app

    async def stop(self) -> None:
        """Stop serving, kill every task, close the state; safe to call more than once."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.stop()
        store, self._variables = self._variables, None
        if store is not None:
            await store.stop()
        state, self._state = self._state, None
        if state is not None:
            await state.close()
        temp_dir, self._temp_dir = self._temp_dir, None
        if temp_dir is not None:
            await asyncio.to_thread(shutil.rmtree, temp_dir, True)
        self._address = ""


def _bind(host: str, port: int) -> socket.socket:
    """Bind before building the app so the engine knows the real (possibly ephemeral) port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def serve(config: DevAgentConfig) -> None:
    """Run a dev agent until SIGINT or SIGTERM, printing its address once it listens."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    handled: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop_requested.set)
            handled.append(signum)
    agent = DevAgent(config)
    try:
        address = await agent.start()
        print(address, flush=True)
        await stop_requested.wait()
    finally:
        await agent.stop()
        for signum in handled:
            loop.remove_signal_handler(signum)
