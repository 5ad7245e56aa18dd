"""Step log routes: the seed's ``GET /v1/runs/{id}/logs`` and a native plain-text one.

- ``GET /v1/runs/{id}/logs?namespace=&step_id=&type=stdout|stderr&tail=true|false`` (seed
  parameters; ``namespace`` defaults to ``default``, ``type`` to ``stdout``). Without ``tail``
  the answer is JSON lines (``application/x-ndjson``), one object per log line:
  ``{"run_id", "step_id", "type", "line"}``. With ``tail=true`` it is the log itself as a
  ``text/plain`` stream, from the start, that follows new output and ends once the step ended.
- ``GET /apis/nomad-pipeline.io/v1/namespaces/{ns}/runs/{name}/logs?step=&stream=&follow=``:
  always ``text/plain``; ``follow=true`` streams until the step ends (``nomad-pipeline logs -f``).

Unknown runs and steps answer 404, a bad ``type``/``stream`` 400. A step is over when the Run's
status shows it (or the run) terminal, read from a store watch, or when the log store was told
so; the stream then hands out what is left and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from nomad_pipeline.controller.api import LOG_ROOT, STORE, WATCHES
from nomad_pipeline.controller.api.errors import query_flag
from nomad_pipeline.controller.logstore import READ_CHUNK, LogStore, LogStream, validate_stream
from nomad_pipeline.errors import Gone, Invalid, NotFound
from nomad_pipeline.resources.kinds import TERMINAL_PHASES, Run
from nomad_pipeline.store.interface import Store

LOG_STORE = web.AppKey("log_store", LogStore)
NATIVE_RUNS = "/apis/nomad-pipeline.io/v1/namespaces/{namespace}/runs/{name}"
# How long a follower of a finished specification step waits for the last copied output.
SPEC_LOG_DRAIN = 3.0


def setup(app: web.Application) -> None:
    """Add the log routes (``build_api(extra_routes=[logs.setup])``); without a provided log
    store, one over ``LOG_ROOT`` is made now (an app's state is frozen once it serves)."""
    ensure_log_store(app)
    app.router.add_get("/v1/runs/{name}/logs", seed_logs)
    app.router.add_get(f"{NATIVE_RUNS}/logs", native_logs)


def provide_log_store(log_store: LogStore) -> Callable[[web.Application], None]:
    """A route setup that makes ``log_store`` the API's log store; list it before the routes
    that use it so the API and the reconcilers (which append Nomad logs) share one instance
    and a follower is woken by every append."""

    def install(app: web.Application) -> None:
        app[LOG_STORE] = log_store

    return install


def ensure_log_store(app: web.Application) -> None:
    """Install a log store over ``LOG_ROOT`` unless one was provided (at build time)."""
    if LOG_STORE not in app:
        app[LOG_STORE] = LogStore(app[LOG_ROOT])


def log_store_of(app: web.Application) -> LogStore:
    """The API's log store (see :func:`setup`)."""
    return app[LOG_STORE]


async def seed_logs(request: web.Request) -> web.StreamResponse:
    namespace = request.query.get("namespace") or "default"
    name = request.match_info["name"]
    run, step, stream = await _requested_log(request, namespace, "step_id", "type")
    if query_flag(request, "tail"):
        return await _stream_log(request, run, step, stream)
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)

    def record(line: bytes) -> bytes:
        text = line.decode("utf-8", errors="replace")
        fields = {"run_id": name, "step_id": step, "type": stream, "line": text}
        return json.dumps(fields).encode() + b"\n"

    # The file is sent in pieces, so a large log never sits in memory whole.
    partial = b""
    async for chunk in _chunks(log_store_of(request.app), namespace, name, step, stream):
        *lines, partial = (partial + chunk).split(b"\n")
        if lines:
            await response.write(b"".join(record(line) for line in lines))
    if partial:
        await response.write(record(partial))
    await response.write_eof()
    return response


async def native_logs(request: web.Request) -> web.StreamResponse:
    namespace = request.match_info["namespace"]
    name = request.match_info["name"]
    run, step, stream = await _requested_log(request, namespace, "step", "stream")
    if query_flag(request, "follow"):
        return await _stream_log(request, run, step, stream)
    response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await response.prepare(request)
    async for chunk in _chunks(log_store_of(request.app), namespace, name, step, stream):
        await response.write(chunk)
    await response.write_eof()
    return response


async def _requested_log(
    request: web.Request, namespace: str, step_param: str, stream_param: str
) -> tuple[Run, str, LogStream]:
    """The run named in the path, and the step and stream the query names (stdout by default).

    The seed's route and ours name the query parameters differently, hence the parameters.
    """
    stream = validate_stream(request.query.get(stream_param) or "stdout")
    run = await request.app[STORE].get(Run, namespace, request.match_info["name"])
    step = _step_of(run, request.query.get(step_param), step_param)
    return run, step, stream


async def _chunks(
    log_store: LogStore, namespace: str, run: str, step: str, stream: LogStream
) -> AsyncIterator[bytes]:
    """The log as it is now, in READ_CHUNK pieces."""
    offset = 0
    while chunk := await log_store.read(
        namespace, run, step, stream, offset=offset, limit=READ_CHUNK
    ):
        offset += len(chunk)
        yield chunk


def _step_of(run: Run, step: str | None, parameter: str) -> str:
    """The step the request names; without one, the flow's only step (else 400)."""
    names = run.spec.flow_spec.step_names
    if not step:
        if len(names) == 1:
            return names[0]
        raise Invalid(
            f"query parameter {parameter!r} is required: run {run.metadata.name} has steps "
            f"{', '.join(names)}",
            field=parameter,
        )
    if step not in names:
        raise NotFound(
            f"run {run.metadata.namespace}/{run.metadata.name} has no step {step!r} "
            f"(steps: {', '.join(names)})"
        )
    return step


def step_over(run: Run, step: str) -> bool:
    """Whether the step (or the whole run) reached a terminal phase."""
    if run.status.phase in TERMINAL_PHASES:
        return True
    status = run.status.step(step)
    return status is not None and status.phase in TERMINAL_PHASES


async def _stream_log(
    request: web.Request, run: Run, step: str, stream: LogStream
) -> web.StreamResponse:
    app = request.app
    namespace, name = run.metadata.namespace, run.metadata.name
    ended = asyncio.Event()
    step_done = asyncio.Event()
    if step_over(run, step):
        step_done.set()
    watcher = asyncio.create_task(
        _watch_step(app[STORE], run, step, step_done), name=f"log follow {namespace}/{name}/{step}"
    )
    drainer = asyncio.create_task(
        _end_when_drained(log_store_of(app), run, step, step_done, ended),
        name=f"log drain {namespace}/{name}/{step}",
    )
    # Registered with the open watches, so a shutting-down server ends this stream at once.
    handler = asyncio.current_task()
    if handler is not None:
        app[WATCHES].add(handler)
    response = web.StreamResponse(
        headers={"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-cache"}
    )
    try:
        await response.prepare(request)
        follower = log_store_of(app).follow(namespace, name, step, stream, until=ended)
        async for chunk in follower:
            await response.write(chunk)
        await response.write_eof()
    finally:
        if handler is not None:
            app[WATCHES].discard(handler)
        for task in (watcher, drainer):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return response


async def _end_when_drained(
    log_store: LogStore, run: Run, step: str, step_done: asyncio.Event, ended: asyncio.Event
) -> None:
    """End the stream once the step is over and its log is complete.

    A specification step's output is copied from Nomad and may land shortly after the Run
    shows the step over; the copier marks the log finished once drained (which ends the
    follower by itself), so the stream waits up to ``SPEC_LOG_DRAIN`` for that mark. Inline
    steps' logs arrive with the runner's reports before the step's transition.
    """
    await step_done.wait()
    namespace, name = run.metadata.namespace, run.metadata.name
    if run.spec.flow_spec.specification is not None and not log_store.step_finished(
        namespace, name, step
    ):
        # The copier's finished mark usually ends the follower (and cancels this) well before.
        await asyncio.sleep(SPEC_LOG_DRAIN)
    ended.set()


async def _watch_step(store: Store, run: Run, step: str, ended: asyncio.Event) -> None:
    """Set ``ended`` once the Run shows the step over, or is deleted."""
    namespace, name = run.metadata.namespace, run.metadata.name
    since = int(run.metadata.resource_version or 0)
    while not ended.is_set():
        try:
            async for event in store.watch(Run, namespace, since):
                since = event.resource_version
                if event.object.metadata.name != name:
                    continue
                if event.type == "DELETED" or (
                    isinstance(event.object, Run) and step_over(event.object, step)
                ):
                    ended.set()
                    return
            # The store ended the watch (it is closing): end the stream, the client may retry.
            ended.set()
        except Gone:
            # Too far behind: re-read the run and watch from its current version.
            try:
                current = await store.get(Run, namespace, name)
            except NotFound:
                ended.set()
                return
            if step_over(current, step):
                ended.set()
                return
            since = int(current.metadata.resource_version or 0)
