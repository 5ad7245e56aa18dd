"""Composition root: builds the store, the Nomad client, the reconcilers and the API server.

Start order: Nomad client, store (its cache filled), the ``default`` namespace, the API (so its
address is known to runners and to the leader lock), then the controllers (under a
:class:`Manager`); /readyz answers 200 once all of that runs. Stop order: API, controllers,
store, Nomad client.

With ``leader_elect`` the controllers run inside a :class:`LeaderElector`: only the instance
holding the Nomad Variable lock reconciles, every instance serves the API.

Reconcilers register here, explicitly: append a factory to :data:`RECONCILER_FACTORIES` (it gets
an :class:`AppContext` and returns the runnables to run: controllers, their watch sources) and
a route setup to :data:`API_ROUTES` (``setup(app)`` adding routes to the API application).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from nomad_pipeline.controller.admission import ensure_default_namespace
from nomad_pipeline.controller.api import METRICS, gitsync, logs, runnerapi, runs, triggerhooks
from nomad_pipeline.controller.api.app import ApiServer, RouteSetup, build_api, start_api
from nomad_pipeline.controller.leaderelection import (
    DEFAULT_LEASE,
    LeaderElector,
    LeaderIdentity,
    parse_lease,
)
from nomad_pipeline.controller.manager import Manager
from nomad_pipeline.controller.metrics import ControllerMetrics
from nomad_pipeline.controller.runnertoken import (
    load_or_create_secret,
    load_or_create_shared_secret,
)
from nomad_pipeline.controller.runtime import Controller, Runnable
from nomad_pipeline.controller.secrets import SecretResolver
from nomad_pipeline.errors import Invalid
from nomad_pipeline.nomad.client import NomadClient
from nomad_pipeline.reconcilers.gitrepository import gitrepository_controller
from nomad_pipeline.reconcilers.gitsource import GitMirrors
from nomad_pipeline.reconcilers.runsetup import run_controller_factory
from nomad_pipeline.reconcilers.trigger import trigger_controller
from nomad_pipeline.resources.registry import KINDS
from nomad_pipeline.store.interface import Store
from nomad_pipeline.store.memory import MemoryStore
from nomad_pipeline.store.nomadvars import NomadVarsStore

logger = logging.getLogger(__name__)

DEFAULT_NOMAD_ADDR = "http://127.0.0.1:4646"
StateBackend = Literal["dev", "nomad-vars"]
LogFormat = Literal["text", "json"]


@dataclass
class ControllerConfig:
    """How to run the controller (the ``nomad-pipeline server`` flags)."""

    data_dir: Path
    # ``HOST:PORT`` or the seed's ``http://HOST:PORT``; port 0 picks a free one.
    http_addr: str = "127.0.0.1:8080"
    # None: the NOMAD_ADDR environment variable, else http://127.0.0.1:4646.
    nomad_addr: str | None = None
    # None: the NOMAD_TOKEN environment variable, else no token.
    nomad_token: str | None = None
    state_backend: StateBackend = "dev"
    # The Nomad namespace holding the nomad-vars backend's variables.
    nomad_vars_namespace: str = "default"
    log_format: LogFormat = "text"
    # The API's URL as runners in Nomad allocations reach it (inline flows); None: the bound
    # address, a wildcard bind as loopback (right when Nomad runs on this host only).
    advertise_addr: str | None = None
    # Several controllers on one Nomad (nomad-vars backend): only the holder of a Nomad
    # Variable lock runs the reconcilers. Off by default so a single controller starts at once.
    leader_elect: bool = False
    # The lock's TTL, a Go duration within Nomad's 10s-24h; renewals every 2/15 of it, and
    # leadership is given up after 2/3 of it without a renewal.
    leader_lease: str = DEFAULT_LEASE

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.advertise_addr is not None:
            self.advertise_addr = advertise_url(self.advertise_addr)
        if self.nomad_addr is None:
            self.nomad_addr = os.environ.get("NOMAD_ADDR") or DEFAULT_NOMAD_ADDR
        if self.nomad_token is None:
            self.nomad_token = os.environ.get("NOMAD_TOKEN") or None
        if self.state_backend not in ("dev", "nomad-vars"):
            raise Invalid(
                f"state backend {self.state_backend!r} is not one of dev, nomad-vars",
                field="state_backend",
            )
        if self.log_format not in ("text", "json"):
            raise Invalid(
                f"log format {self.log_format!r} is not one of text, json", field="log_format"
            )
        parse_http_addr(self.http_addr)
        parse_lease(self.leader_lease)
        if self.leader_elect and self.state_backend != "nomad-vars":
            raise Invalid(
                "leader election (--leader-elect) needs --state-backend nomad-vars: with the "
                f"{self.state_backend!r} backend controllers share no state to elect a leader in",
                field="leader_elect",
            )

    @property
    def leader_lease_seconds(self) -> float:
        return parse_lease(self.leader_lease)

    @property
    def log_root(self) -> Path:
        return self.data_dir / "logs"


def advertise_url(text: str) -> str:
    """``http(s)://HOST:PORT`` (a bare ``HOST:PORT`` gets ``http://``), checked like an
    ``http_addr``; a wildcard host is refused: runners elsewhere cannot reach it."""
    address = text.strip().rstrip("/")
    if not address.startswith(("http://", "https://")):
        address = f"http://{address}"
    try:
        host, _ = parse_http_addr(address)
    except Invalid as error:
        raise Invalid(error.message, field="advertise_addr") from None
    if host in ("", "0.0.0.0", "::"):
        raise Invalid(
            f"advertise address {text!r} names no host that runners could reach: give the "
            "address of this machine as Nomad clients see it",
            field="advertise_addr",
        )
    return address


def parse_http_addr(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT``, ``[::1]:PORT`` or ``http://HOST:PORT`` into (host, port)."""
    address = text.strip()
    for scheme in ("http://", "https://"):
        if address.startswith(scheme):
            address = address.removeprefix(scheme).rstrip("/")
    host, separator, port_text = address.rpartition(":")
    if not separator or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise Invalid(
            f"http address {text!r} must look like HOST:PORT or http://HOST:PORT",
            field="http_addr",
        )
    host = host.removeprefix("[").removesuffix("]") or "0.0.0.0"
    return host, int(port_text)


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class AppContext:
    """What reconciler factories may use to build their controllers."""

    store: Store
    nomad: NomadClient
    config: ControllerConfig
    # ``<data-dir>/logs``, the root of the step log layout.
    log_root: Path
    # What per-run runner tokens are derived from (``controller/runnertoken.py``).
    runner_secret: bytes
    # The controllers' metrics, in the API's registry (served by its /metrics).
    metrics: ControllerMetrics
    clock: Callable[[], datetime] = utc_now
    # The API's ``http://HOST:PORT`` once it serves (None before): runners call it back.
    api_address: Callable[[], str | None] = lambda: None


ReconcilerFactory = Callable[[AppContext], Sequence[Runnable]]


def git_controllers_factory(context: AppContext) -> Sequence[Runnable]:
    """The Trigger and GitRepository controllers; they share one set of git mirrors under
    ``<data-dir>/git`` (one fetch at a time per remote)."""
    mirrors = GitMirrors(context.config.data_dir / "git")
    return [
        *trigger_controller(context.store, mirrors=mirrors, clock=context.clock),
        *gitrepository_controller(
            context.store,
            mirrors=mirrors,
            secrets=SecretResolver(context.nomad),
            clock=context.clock,
        ),
    ]


# The controllers to run, in start order (stopped in reverse). Each factory builds one kind's
# controller with its watch sources.
RECONCILER_FACTORIES: list[ReconcilerFactory] = [run_controller_factory, git_controllers_factory]
# Route setups added to the API beside the native and seed routes (runs, logs, runner, webhooks).
API_ROUTES: list[RouteSetup] = [
    runs.setup,
    logs.setup,
    runnerapi.setup,
    triggerhooks.setup,
    gitsync.setup,
]


class ControllerApp:
    """The controller process: ``await start()`` → address; ``await stop()``."""

    def __init__(
        self,
        config: ControllerConfig,
        *,
        reconciler_factories: Sequence[ReconcilerFactory] | None = None,
        api_routes: Sequence[RouteSetup] | None = None,
    ) -> None:
        self.config = config
        self._reconciler_factories = (
            RECONCILER_FACTORIES if reconciler_factories is None else reconciler_factories
        )
        self._api_routes = API_ROUTES if api_routes is None else api_routes
        self._ready = asyncio.Event()
        self._nomad: NomadClient | None = None
        self._store: Store | None = None
        self._manager: Manager | None = None
        self._manager_task: asyncio.Task[None] | None = None
        self._elector: LeaderElector | None = None
        self._api: ApiServer | None = None
        self.address: str | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            raise RuntimeError("the controller is not started")
        return self._store

    @property
    def leading(self) -> bool:
        """True while this instance runs the reconcilers (always, without leader election)."""
        if self._elector is not None:
            return self._elector.leading
        return self._manager_task is not None

    async def start(self) -> str:
        """Start everything; returns the API's ``http://HOST:PORT``. Stops what started on
        failure."""
        config = self.config
        host, port = parse_http_addr(config.http_addr)
        try:
            config.data_dir.mkdir(parents=True, exist_ok=True)
            config.log_root.mkdir(parents=True, exist_ok=True)
            assert config.nomad_addr is not None
            self._nomad = NomadClient(config.nomad_addr, config.nomad_token)
            self._store = self._build_store(self._nomad)
            await self._store.start()
            await ensure_default_namespace(self._store)
            runner_secret = await self._runner_secret(self._nomad)
            api = build_api(
                self._store,
                log_root=config.log_root,
                # Webhook secrets stored in Nomad variables resolve through this client.
                extra_routes=[
                    triggerhooks.secret_resolver_setup(SecretResolver(self._nomad)),
                    runnerapi.secret_setup(runner_secret),
                    *self._api_routes,
                ],
                ready=self._ready,
            )
            metrics = api[METRICS]
            controller_metrics = ControllerMetrics(metrics.registry)
            context = AppContext(
                store=self._store,
                nomad=self._nomad,
                config=config,
                log_root=config.log_root,
                runner_secret=runner_secret,
                metrics=controller_metrics,
                api_address=lambda: self.address,
            )

            def reconciler_runnables() -> list[Runnable]:
                runnables = [
                    runnable
                    for factory in self._reconciler_factories
                    for runnable in factory(context)
                ]
                # Every controller is counted, whichever factory built it.
                for runnable in runnables:
                    if isinstance(runnable, Controller):
                        runnable.instrument(controller_metrics)
                return runnables

            self._api = await start_api(api, host, port)
            self.address = self._api.address
            if config.leader_elect:
                self._elector = LeaderElector(
                    self._nomad,
                    reconciler_runnables,
                    namespace=config.nomad_vars_namespace,
                    lease=config.leader_lease_seconds,
                    state_dir=config.data_dir,
                    identity=LeaderIdentity.of_this_process(lambda: self.address),
                    on_change=lambda leading: metrics.leader.set(1 if leading else 0),
                )
                self._manager = Manager([self._elector])
            else:
                self._manager = Manager(reconciler_runnables())
                metrics.leader.set(1)
            self._manager_task = asyncio.create_task(self._manager.run(), name="controller-manager")
        except BaseException:
            await self.stop()
            raise
        self._ready.set()
        logger.info(
            "controller started",
            extra={
                "address": self.address,
                "state_backend": config.state_backend,
                "nomad_addr": config.nomad_addr,
                "controllers": self._manager.names,
                "leader_elect": config.leader_elect,
            },
        )
        return self.address

    async def _runner_secret(self, nomad: NomadClient) -> bytes:
        """Shared through Nomad with the nomad-vars backend (every controller on that Nomad
        accepts the same runner tokens), else kept in the data directory."""
        if self.config.state_backend == "nomad-vars":
            return await load_or_create_shared_secret(nomad, self.config.nomad_vars_namespace)
        return await asyncio.to_thread(load_or_create_secret, self.config.data_dir)

    def _build_store(self, nomad: NomadClient) -> Store:
        if self.config.state_backend == "dev":
            return MemoryStore()
        return NomadVarsStore(
            nomad, namespace=self.config.nomad_vars_namespace, kinds=KINDS.values()
        )

    async def wait(self) -> None:
        """Return when the controllers stop by themselves (a runnable failed): re-raises."""
        if self._manager_task is None:
            raise RuntimeError("the controller is not started")
        await self._manager_task

    async def stop(self) -> None:
        """Graceful shutdown; safe to call more than once and after a failed start."""
        self._ready.clear()
        if self._api is not None:
            await self._api.stop()
            self._api = None
        if self._manager is not None and self._manager_task is not None:
            self._manager.stop()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._manager_task
        self._manager = None
        self._manager_task = None
        self._elector = None
        if self._store is not None:
            await self._store.close()
            self._store = None
        if self._nomad is not None:
            await self._nomad.close()
            self._nomad = None
        logger.info("controller stopped")


async def wait_for_signal(*stopping: asyncio.Task[Any]) -> None:
    """Return on SIGINT/SIGTERM, or when one of ``stopping`` ends (re-raising its error)."""
    loop = asyncio.get_running_loop()
    received = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, received.set)
    waiter = asyncio.create_task(received.wait(), name="signal-waiter")
    try:
        done, _ = await asyncio.wait({waiter, *stopping}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not waiter:
                task.result()
    finally:
        waiter.cancel()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


# Python's cyclic collector by default runs a young-generation pass every 700 net allocations.
# Decoding Nomad's events and answers allocates hundreds of thousands of short-lived, acyclic
# dicts a second (freed by reference counting anyway), so with the defaults every pass also
# walks the controller's caches: ~15% of its CPU under load (bench/runs.py). Rarer passes cost
# a little memory held a little longer, nothing else.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_garbage_collector() -> None:
    """For long-running processes (the servers, and benchmarks measuring them)."""
    gc.set_threshold(*GC_THRESHOLDS)


async def serve(config: ControllerConfig) -> None:
    """Run the controller until SIGINT/SIGTERM (``nomad-pipeline server``)."""
    configure_logging(config.log_format)
    tune_garbage_collector()
    app = ControllerApp(config)
    await app.start()
    watcher = asyncio.create_task(app.wait(), name="controller-watcher")
    try:
        await wait_for_signal(watcher)
    finally:
        watcher.cancel()
        await app.stop()


class DevStack:
    """``nomad-pipeline dev``: the dev agent, then the controller on it with nomad-vars."""

    def __init__(
        self,
        *,
        data_dir: Path,
        port: int = 8080,
        nomad_port: int = 4646,
        bind: str = "127.0.0.1",
        log_format: LogFormat = "text",
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.nomad_port = nomad_port
        self.bind = bind
        self.log_format: LogFormat = log_format
        self.nomad_address: str | None = None
        self.address: str | None = None
        self._agent: Any = None
        self._controller: ControllerApp | None = None

    async def start(self) -> tuple[str, str]:
        """Start both; returns (controller address, Nomad address)."""
        # Imported here: the dev agent is only needed by this command.
        from nomad_pipeline.devagent.server import DevAgent, DevAgentConfig

        try:
            self._agent = DevAgent(
                DevAgentConfig(
                    bind=self.bind, port=self.nomad_port, data_dir=self.data_dir / "nomad"
                )
            )
            self.nomad_address = await self._agent.start()
            self._controller = ControllerApp(
                ControllerConfig(
                    data_dir=self.data_dir,
                    http_addr=f"{self.bind}:{self.port}",
                    nomad_addr=self.nomad_address,
                    nomad_token="",
                    state_backend="nomad-vars",
                    log_format=self.log_format,
                )
            )
            self.address = await self._controller.start()
        except BaseException:
            await self.stop()
            raise
        logger.info(
            "dev stack started",
            extra={"address": self.address, "nomad_addr": self.nomad_address},
        )
        return self.address, self.nomad_address

    async def stop(self) -> None:
        if self._controller is not None:
            await self._controller.stop()
            self._controller = None
        if self._agent is not None:
            await self._agent.stop()
            self._agent = None

    async def serve(self) -> None:
        """Run both until SIGINT/SIGTERM."""
        configure_logging(self.log_format)
        tune_garbage_collector()
        await self.start()
        assert self._controller is not None
        watcher = asyncio.create_task(self._controller.wait(), name="controller-watcher")
        try:
            await wait_for_signal(watcher)
        finally:
            watcher.cancel()
            await self.stop()


# ---- logging ------------------------------------------------------------------------------

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_RECORD_FIELDS = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)).keys()
) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in vars(record).items() if key not in _RECORD_FIELDS}


class TextFormatter(logging.Formatter):
    """``2026-01-02T03:04:05Z INFO logger: message key=value ...``."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        extras = " ".join(f"{key}={value!r}" for key, value in _extras(record).items())
        line = f"{when}Z {record.levelname} {record.name}: {record.getMessage()}"
        if extras:
            line += " " + extras
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(log_format: LogFormat = "text", level: int = logging.INFO) -> None:
    """Send the root logger to stderr in ``text`` or ``json``; replaces earlier handlers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # aiohttp's access log repeats what the request metrics already count.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


__all__ = [
    "API_ROUTES",
    "RECONCILER_FACTORIES",
    "AppContext",
    "ControllerApp",
    "ControllerConfig",
    "DevStack",
    "configure_logging",
    "parse_http_addr",
    "serve",
]
