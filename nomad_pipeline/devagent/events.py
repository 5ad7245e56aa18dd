"""``GET /v1/event/stream``: Nomad's NDJSON event stream.

One line per batch (``{"Index": N, "Events": [...]}``), a ``{}`` heartbeat at connect and then
every 30 s, each line flushed as written. Topics are ``Topic:FilterKey`` (a missing key is
``*``); an event matches when its Key or one of its FilterKeys equals the filter key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Final

from aiohttp import web

from nomad_pipeline.devagent.http import STATE_KEY, query_meta_headers, query_namespace
from nomad_pipeline.devagent.state import EventBatch, NomadHTTPError, Obj, StateStore

HEARTBEAT_INTERVAL = 30.0
HEARTBEAT_KEY: Final = web.AppKey("devagent_event_heartbeat", float)

TopicFilter = dict[str, set[str]]


def parse_topics(values: list[str]) -> TopicFilter:
    """``Topic:Key`` query values into {topic: keys}; no value at all means every topic."""
    if not values:
        return {"*": {"*"}}
    topics: TopicFilter = {}
    for value in values:
        topic, separator, key = value.partition(":")
        if not topic or (separator and not key) or ":" in key:
            raise NomadHTTPError(400, f"Invalid topic query: invalid topic format {value!r}")
        topics.setdefault(topic, set()).add(key or "*")
    return topics


def event_matches(event: Obj, topics: TopicFilter, namespace: str) -> bool:
    event_ns = event.get("Namespace") or ""
    if namespace != "*" and event_ns and event_ns != namespace:
        return False
    keys = topics.get(event["Topic"], set()) | topics.get("*", set())
    if not keys:
        return False
    if "*" in keys or event["Key"] in keys:
        return True
    return any(key in keys for key in event.get("FilterKeys") or ())


async def _pump(
    state: StateStore, after_index: int, queue: asyncio.Queue[EventBatch | None]
) -> None:
    """Forward subscription batches to ``queue``; None marks the end of the subscription."""
    try:
        async for batch in state.subscribe(after_index):
            await queue.put(batch)
    finally:
        with contextlib.suppress(asyncio.QueueFull):
            queue.put_nowait(None)


async def _batches(
    state: StateStore, after_index: int, heartbeat: float
) -> AsyncIterator[EventBatch | None]:
    """Batches as they come, with None whenever ``heartbeat`` seconds pass without one."""
    queue: asyncio.Queue[EventBatch | None] = asyncio.Queue(maxsize=1)
    pump = asyncio.create_task(_pump(state, after_index, queue), name="devagent-event-pump")
    try:
        while True:
            try:
                async with asyncio.timeout(heartbeat):
                    batch = await queue.get()
            except TimeoutError:
                yield None
                continue
            if batch is None:
                return
            yield batch
    finally:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump


async def event_stream(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    topics = parse_topics(request.query.getall("topic", []))
    namespace = query_namespace(request)
    raw_index = request.query.get("index", "") or "0"
    try:
        after_index = int(raw_index)
    except ValueError:
        raise NomadHTTPError(400, "Unable to parse index") from None
    response = web.StreamResponse(
        headers={"Content-Type": "application/json", **query_meta_headers(state.index)}
    )
    await response.prepare(request)
    await response.write(b"{}\n")
    async for batch in _batches(state, after_index, request.app[HEARTBEAT_KEY]):
        if batch is None:
            await response.write(b"{}\n")
            continue
        events = [e for e in batch.events if event_matches(e, topics, namespace)]
        if events:
            line = json.dumps({"Index": batch.index, "Events": events}, separators=(",", ":"))
            await response.write(line.encode() + b"\n")
    return response


def add_routes(app: web.Application, *, heartbeat: float = HEARTBEAT_INTERVAL) -> None:
    app[HEARTBEAT_KEY] = heartbeat
    app.router.add_get("/v1/event/stream", event_stream)
