"""Wiring of the run controller: the reconciler, its work queue, and what wakes it.

``run_controller_factory`` is registered in ``app.RECONCILER_FACTORIES``. It returns, in start
order, the runnables the manager runs (stopped in reverse):

- ``run-logs``: owns the spec-step log copiers and closes them on stop;
- ``runs``: the controller (work queue + workers) around :class:`RunReconciler`;
- ``nomad-events``: Nomad's event stream feeding the job cache, waking runs;
- ``watch-run``: the store's Run watch (creations, cancels, runner reports).

Flow objects are not watched: a run carries a snapshot of its flow's spec, so editing or
deleting a flow never changes a run that exists.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiohttp

from nomad_pipeline.controller.logstore import LogStore
from nomad_pipeline.controller.manager import watch_store
from nomad_pipeline.controller.metrics import ControllerMetrics
from nomad_pipeline.controller.runtime import Controller, Request, Runnable
from nomad_pipeline.nomad.client import NomadClient, new_session
from nomad_pipeline.reconcilers.nomadwatch import (
    JobCache,
    JobObservation,
    NomadEventSource,
    RunKey,
)
from nomad_pipeline.reconcilers.run import RUN_KIND, RunReconciler, RunSettings
from nomad_pipeline.reconcilers.speclogs import LogCopier
from nomad_pipeline.resources.kinds import Run
from nomad_pipeline.store.interface import Store

# Runs reconciled at once. A reconcile mostly waits (a register, then a status write), so the
# bound is about how hard the controller may push Nomad and the store, not about CPU. It must
# exceed the runs whose steps can end together: with 100 runs ending a step at once, 64 workers
# left 36 reconciles queued behind the others' round trips and doubled the last ones' latency
# (bench/runs.py p99 ~600-1100 ms, ~270-660 ms with 256), as 16 had against 64 before.
RUN_WORKERS = 256


class _LogCopierOwner:
    """Keeps the log copier (and its HTTP session) for the manager's lifetime; closes them on
    stop."""

    def __init__(self, copier: LogCopier, session: aiohttp.ClientSession | None) -> None:
        self._copier = copier
        self._session = session

    @property
    def name(self) -> str:
        return "run-logs"

    async def run(self) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await self._copier.close()
            if self._session is not None:
                await self._session.close()


@dataclass(slots=True)
class RunController:
    """The parts of the run controller, for tests and benchmarks that look inside."""

    store: Store
    reconciler: RunReconciler
    controller: Controller
    cache: JobCache
    events: NomadEventSource
    copier: LogCopier
    logs: LogStore
    # The log streams' own HTTP session, closed with the copier.
    log_session: aiohttp.ClientSession | None = None

    @property
    def runnables(self) -> list[Runnable]:
        return [
            _LogCopierOwner(self.copier, self.log_session),
            self.controller,
            self.events,
            watch_store(
                self.store, Run, self.controller.enqueue, to_requests=self.reconciler.requests_for
            ),
        ]


class _ControllerConfig(Protocol):
    @property
    def data_dir(self) -> Path: ...

    @property
    def advertise_addr(self) -> str | None: ...

    @property
    def nomad_token(self) -> str | None: ...


class RunControllerContext(Protocol):
    """What the factory reads of ``app.AppContext`` (structurally: reconcilers do not import
    the composition root)."""

    @property
    def store(self) -> Store: ...

    @property
    def nomad(self) -> NomadClient: ...

    @property
    def log_root(self) -> Path: ...

    @property
    def config(self) -> _ControllerConfig: ...

    @property
    def api_address(self) -> Callable[[], str | None]: ...

    @property
    def runner_secret(self) -> bytes: ...

    @property
    def metrics(self) -> ControllerMetrics: ...


def advertised(address: str | None) -> str | None:
    """The API address as a runner on this host reaches it (a wildcard bind → loopback), when
    no ``advertise_addr`` is configured."""
    if address is None:
        return None
    for wildcard in ("0.0.0.0", "[::]"):
        address = address.replace(f"//{wildcard}:", "//127.0.0.1:")
    return address


def build_run_controller(
    store: Store,
    nomad: NomadClient,
    *,
    log_root: Path,
    settings: RunSettings,
    nomad_token: str | None = None,
    log_session: aiohttp.ClientSession | None = None,
    workers: int = RUN_WORKERS,
    metrics: ControllerMetrics | None = None,
) -> RunController:
    """The run controller's parts; call inside the running event loop (it opens a session for
    log streams unless given ``log_session``, which the caller then closes). With ``metrics``
    finished runs and steps, the event stream and the log copies are counted there (the
    controller and its queue are instrumented by whoever runs it: the app, for every
    controller)."""
    logs = LogStore(log_root)
    controllers: list[Controller] = []

    def enqueue(request: Request) -> None:
        controllers[0].enqueue(request)

    def wake(owner: RunKey) -> None:
        enqueue(Request(RUN_KIND, owner[0], owner[1]))

    reconcilers: list[RunReconciler] = []

    def started(owner: RunKey, observation: JobObservation) -> None:
        reconcilers[0].allocation_started(owner, observation)

    cache = JobCache(wake, started)
    # Followed log streams stay open for as long as their steps run: on the client's pooled
    # session they would take every connection (aiohttp's pool holds 100) and make registers
    # wait behind them, so they get a session of their own without a connection limit.
    owned_session = None
    if log_session is None:
        owned_session = log_session = new_session(aiohttp.TCPConnector(limit=0))
    log_nomad = NomadClient(nomad.address, nomad_token, session=log_session)
    copier = LogCopier(log_nomad, logs)
    reconciler = RunReconciler(
        store,
        nomad,
        cache=cache,
        logs=logs,
        copier=copier,
        settings=settings,
        enqueue=enqueue,
        metrics=metrics.runs if metrics is not None else None,
    )
    reconcilers.append(reconciler)
    controller = Controller("runs", reconciler, workers=workers)
    controllers.append(controller)
    events = NomadEventSource(nomad, cache, wake)
    if metrics is not None:
        metrics.watch_event_stream(events)
        metrics.watch_log_copies(copier.__len__)
    return RunController(store, reconciler, controller, cache, events, copier, logs, owned_session)


def run_controller_factory(context: RunControllerContext) -> Sequence[Runnable]:
    """``app.RECONCILER_FACTORIES`` entry: the run controller's runnables (module docstring)."""
    api_address = context.api_address
    configured = context.config.advertise_addr
    settings = RunSettings(
        controller_address=lambda: configured or advertised(api_address()),
        runner_secret=context.runner_secret,
    )
    built = build_run_controller(
        context.store,
        context.nomad,
        log_root=context.log_root,
        settings=settings,
        nomad_token=context.config.nomad_token,
        metrics=context.metrics,
    )
    return built.runnables
