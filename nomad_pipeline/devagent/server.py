"""The dev agent: one Nomad server + client node in one process, speaking Nomad's HTTP API.

``DevAgent`` wires the state, the engine (scheduler and task runner) and the HTTP routes, and
owns their lifecycle: ``start`` binds the HTTP port (0 = ephemeral) and returns the address;
``stop`` closes HTTP, kills every task through the engine and closes the state. ``serve`` runs
an agent until SIGINT/SIGTERM; ``main`` is its command line (``nomad-pipeline dev-nomad`` and
``python -m nomad_pipeline.devagent``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from aiohttp import web
from aiohttp.typedefs import Middleware

from nomad_pipeline.devagent import events, fs, variables
from nomad_pipeline.devagent import gc as garbage
from nomad_pipeline.devagent.acl import acl_middleware
from nomad_pipeline.devagent.engine import Engine
from nomad_pipeline.devagent.http import STATE_KEY, error_middleware, parse_go_duration
from nomad_pipeline.devagent.routes import cluster, jobs
from nomad_pipeline.devagent.state import DEFAULT_EVENT_BUFFER, StateStore, now_ns

logger = logging.getLogger(__name__)

# Streams (followed logs, the event stream) never end by themselves: on stop, give in-flight
# requests this long before their handlers are cancelled.
SHUTDOWN_GRACE = 0.5
# Container allocations between young-generation collections in ``serve`` (Python's default:
# 700); see ``_tune_garbage_collector``.
YOUNG_GENERATION_THRESHOLD = 20_000


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
    # Server and client garbage collection (Nomad's defaults).
    gc: garbage.GCConfig = field(default_factory=garbage.GCConfig)
    # Wall clock (ns) garbage collection measures thresholds with; tests move it forward.
    gc_clock: garbage.Clock = now_ns


def _format_address(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class DevAgent:
    """A local Nomad-compatible agent; ``async with DevAgent(config) as agent`` starts it."""

    def __init__(self, config: DevAgentConfig) -> None:
        self.config = config
        self._state: StateStore | None = None
        self._engine: Engine | None = None
        self._variables: variables.Variables | None = None
        self._collector: garbage.GarbageCollector | None = None
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

    @property
    def garbage_collector(self) -> garbage.GarbageCollector:
        if self._collector is None:
            raise RuntimeError("the dev agent is not started")
        return self._collector

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
        # Bound first: the engine hands the real (possibly ephemeral) address to its tasks.
        sock = _bind(config.bind, config.port)
        port = sock.getsockname()[1]
        if config.data_dir is None:
            # In-memory mode: allocation directories live in a temp dir removed on stop.
            data_dir = self._temp_dir = Path(tempfile.mkdtemp(prefix="nomad-devagent-"))
        else:
            data_dir = config.data_dir
        info = cluster.AgentInfo(
            bind=config.bind,
            http_port=port,
            node_name=node_name,
            data_dir=str(data_dir),
            dev_mode=config.data_dir is None,
            acl_enabled=config.acl_token is not None,
        )
        self._address = _format_address(info.advertise, port)
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            state = StateStore(config.data_dir, event_buffer=config.event_buffer)
            self._state = state
            await state.open()
            self._engine = Engine(
                state,
                alloc_root=data_dir / "alloc",
                node_name=node_name,
                http_addr=self._address,
            )
            await self._engine.start()
            self._variables = variables.Variables(state)
            await self._variables.start()
            self._collector = garbage.GarbageCollector(
                self._engine, config.gc, clock=config.gc_clock
            )
            await self._collector.start()
            app = self._build_app(state, self._engine, self._variables, self._collector, info)
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
        collector: garbage.GarbageCollector,
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
        app[garbage.GC_KEY] = collector
        cluster.add_routes(app)
        jobs.add_routes(app)
        variables.add_routes(app)
        fs.add_routes(app)
        events.add_routes(app, heartbeat=self.config.event_heartbeat)
        garbage.add_routes(app)
        return app

    async def stop(self) -> None:
        """Stop serving, kill every task, close the state; safe to call more than once."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        collector, self._collector = self._collector, None
        if collector is not None:
            await collector.stop()
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
        _tune_garbage_collector()
        print(address, flush=True)
        await stop_requested.wait()
    finally:
        await agent.stop()
        for signum in handled:
            loop.remove_signal_handler(signum)


def _tune_garbage_collector() -> None:
    """Make the cyclic collector cheap for a process that serves this agent and nothing else.

    Every request allocates thousands of short-lived dicts (decoded JSON, Nomad's objects), so
    the default thresholds start a young collection every few hundred of them and a full one
    that walks every module, class and function object imported at start-up. Those start-up
    objects live as long as the process: freezing them keeps them out of every collection,
    and a larger young generation collects less often while refcounting still frees almost
    everything the moment a request ends. Only ``serve`` owns its process; an agent embedded
    in another program (the tests) leaves that program's collector alone.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, older, oldest)


def build_parser(prog: str = "nomad-pipeline dev-nomad") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a local Nomad-compatible agent (one server + one raw_exec client).",
    )
    parser.add_argument("--bind", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=4646, help="HTTP port (0: any free port)")
    storage = parser.add_mutually_exclusive_group()
    storage.add_argument(
        "--data-dir", type=Path, help="keep jobs, allocations and variables under DIR"
    )
    storage.add_argument(
        "--in-memory", action="store_true", help="keep nothing across restarts (the default)"
    )
    parser.add_argument("--node-name", help="the client node's name (Nomad's -node)")
    parser.add_argument(
        "--acl-token", help="require this token (X-Nomad-Token) on every endpoint but status/*"
    )
    collection = parser.add_argument_group(
        "garbage collection", "durations are Go durations (90s, 5m, 4h); Nomad's defaults"
    )
    collection.add_argument(
        "--job-gc-interval",
        default="5m",
        help="how often the server collects jobs and evaluations (default 5m)",
    )
    collection.add_argument(
        "--job-gc-threshold",
        default="4h",
        help="how long a job must be dead before it is purged (default 4h)",
    )
    collection.add_argument(
        "--eval-gc-threshold",
        default="1h",
        help="age at which terminal evaluations are collected (default 1h)",
    )
    collection.add_argument(
        "--batch-eval-gc-threshold",
        default="24h",
        help="the same for batch jobs' evaluations (default 24h)",
    )
    collection.add_argument(
        "--client-gc-interval",
        default="1m",
        help="how often the client collects allocation directories (default 1m)",
    )
    collection.add_argument(
        "--gc-max-allocs",
        type=int,
        default=garbage.DEFAULT_GC_MAX_ALLOCS,
        help="allocations the client tracks before removing terminal ones' directories"
        " (default 50)",
    )
    return parser


def _duration_flag(args: argparse.Namespace, name: str) -> float:
    text = getattr(args, name)
    flag = "--" + name.replace("_", "-")
    try:
        return parse_go_duration(text)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None


def gc_config_from_args(args: argparse.Namespace) -> garbage.GCConfig:
    """The garbage-collection flags as a config; ValueError names the flag that is wrong."""
    durations = {
        name: _duration_flag(args, name)
        for name in (
            "job_gc_interval",
            "job_gc_threshold",
            "eval_gc_threshold",
            "batch_eval_gc_threshold",
            "client_gc_interval",
        )
    }
    try:
        return garbage.GCConfig(**durations, gc_max_allocs=args.gc_max_allocs)
    except ValueError as exc:
        flag, _, problem = str(exc).partition(": ")
        raise ValueError(f"--{flag.replace('_', '-')}: {problem}") from None


def config_from_args(args: argparse.Namespace) -> DevAgentConfig:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port: {args.port} is not a TCP port (0-65535)")
    return DevAgentConfig(
        bind=args.bind,
        port=args.port,
        data_dir=args.data_dir,
        node_name=args.node_name,
        acl_token=args.acl_token,
        gc=gc_config_from_args(args),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        asyncio.run(serve(config))
    except OSError as exc:
        print(f"error: could not start the dev agent: {exc}", file=sys.stderr)
        return 1
    return 0
