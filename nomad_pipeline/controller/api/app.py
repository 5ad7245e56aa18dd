"""The API application factory, its middlewares, health and metrics routes, and serving it."""

from __future__ import annotations

import asyncio
import contextlib
import platform
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from nomad_pipeline.controller.api import (
    BACKGROUND,
    LOG_ROOT,
    METRICS,
    READY,
    STORE,
    WATCHES,
)
from nomad_pipeline.controller.api.errors import Handler, error_middleware
from nomad_pipeline.controller.api.native import setup_native_routes
from nomad_pipeline.controller.api.openapi import openapi_document
from nomad_pipeline.controller.api.seed import setup_seed_routes
from nomad_pipeline.controller.api.watch import WATCH_STREAMS, WatchStreams
from nomad_pipeline.controller.metrics import ApiMetrics
from nomad_pipeline.resources.names import API_VERSION, package_version
from nomad_pipeline.resources.registry import KINDS
from nomad_pipeline.store.interface import Store

RouteSetup = Callable[[web.Application], None]

# Request bodies hold manifests with inline jobspecs; a Nomad variable holds at most 64 KiB per
# object, so 16 MiB leaves room for large apply batches while bounding memory per request.
MAX_BODY_BYTES = 16 * 1024 * 1024


def build_api(
    store: Store,
    *,
    log_root: Path,
    extra_routes: Sequence[RouteSetup] = (),
    ready: asyncio.Event | None = None,
) -> web.Application:
    """The API application. ``store`` is owned (started and closed) by the caller. ``ready``
    gates /readyz; without one the API counts as ready at once."""
    app = web.Application(
        middlewares=[metrics_middleware, error_middleware], client_max_size=MAX_BODY_BYTES
    )
    app[STORE] = store
    app[LOG_ROOT] = log_root
    app[METRICS] = ApiMetrics()
    if ready is None:
        ready = asyncio.Event()
        ready.set()
    app[READY] = ready
    app[WATCHES] = set()
    app[WATCH_STREAMS] = WatchStreams()
    app[BACKGROUND] = set()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/version", version)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/openapi.json", openapi)
    setup_native_routes(app)
    setup_seed_routes(app)
    for setup in extra_routes:
        setup(app)
    app.on_shutdown.append(_end_watches)
    app.cleanup_ctx.append(_finish_background_writes)
    return app


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as http_error:
        status = http_error.status
        raise
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        request.app[METRICS].observe_request(
            route, request.method, status, time.perf_counter() - started
        )


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers HTTP."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the store serves reads and the controllers run."""
    if request.app[READY].is_set():
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "starting"}, status=503)


async def version(request: web.Request) -> web.Response:
    """What is serving: nomad-pipeline's version, the API group version, Python's version."""
    return web.json_response(
        {
            "version": package_version(),
            "api_version": API_VERSION,
            "python": platform.python_version(),
        }
    )


async def metrics(request: web.Request) -> web.Response:
    """Prometheus metrics: requests, latencies and store sizes."""
    api_metrics = request.app[METRICS]
    if request.app[READY].is_set():
        store = request.app[STORE]
        for kind in KINDS.values():
            listed = await store.list(kind, None if kind.NAMESPACED else "")
            api_metrics.objects.labels(kind.KIND).set(len(listed.items))
    body = generate_latest(api_metrics.registry)
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def openapi(request: web.Request) -> web.Response:
    """This API as an OpenAPI 3 document."""
    return web.json_response(openapi_document(request.app))


async def _end_watches(app: web.Application) -> None:
    # Open streams never end on their own; without this, shutdown would wait its whole timeout.
    # Watch streams end cleanly (their clients re-watch from their last resource version); the
    # other streams registered in WATCHES (log follows) are cut.
    app[WATCH_STREAMS].end_all()
    streams = app[WATCHES]
    for task in list(streams):
        task.cancel()


async def _finish_background_writes(app: web.Application) -> AsyncIterator[None]:
    yield
    background = app[BACKGROUND]
    pending = list(background)
    if pending:
        await asyncio.wait(pending, timeout=30.0)


@dataclass
class ApiServer:
    """A running API: its address and how to stop it."""

    runner: web.AppRunner
    address: str

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_api(
    app: web.Application, host: str = "127.0.0.1", port: int = 0, *, shutdown_timeout: float = 10.0
) -> ApiServer:
    """Serve ``app`` on ``host:port`` (0 = ephemeral); returns the ``http://HOST:PORT`` address.

    A client that disconnects cancels its handler (watches end at once); writes are shielded by
    the handlers that make them.
    """
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await runner.cleanup()
        raise
    sockets = [address for address in runner.addresses if isinstance(address, tuple)]
    bound_host, bound_port = sockets[0][0], sockets[0][1]
    if ":" in bound_host:
        bound_host = f"[{bound_host}]"
    return ApiServer(runner=runner, address=f"http://{bound_host}:{bound_port}")
