"""``GET /v1/event/stream``: Nomad's NDJSON event stream.

One line per batch (``{"Index": N, "Events": [...]}``), a ``{}`` heartbeat at connect and then
every 30 s, each line flushed as written. Topics are ``Topic:FilterKey`` (a missing key is
``*``); an event matches when its Key or one of its FilterKeys equals the filter key.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from nomad_pipeline.devagent.http import STATE_KEY, query_meta_headers, query_namespace
from nomad_pipeline.devagent.state import NomadHTTPError, Obj, to_json

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


async def _heartbeats(write_line: Callable[[bytes], Awaitable[None]], interval: float) -> None:
    """``{}`` every ``interval`` seconds; Nomad's stream beats whether or not events flow."""
    while True:
        await asyncio.sleep(interval)
        try:
            await write_line(b"{}\n")
        except ConnectionResetError:
            # The reader hung up; the event loop in the handler notices on its next write.
            return


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
    # Heartbeats and batches come from two tasks: one line at a time.
    write_lock = asyncio.Lock()

    async def write_line(line: bytes) -> None:
        async with write_lock:
            await response.write(line)

    await write_line(b"{}\n")
    heartbeat = asyncio.create_task(
        _heartbeats(write_line, request.app[HEARTBEAT_KEY]), name="devagent-event-heartbeat"
    )
    try:
        # Each batch is written from the subscription as it is committed: no extra hop. Batches
        # committed while the last write was under way go out together, one line each, in
        # one write: a burst of commits costs one system call, not one per commit.
        async for batches in state.subscribe_many(after_index):
            lines = []
            for batch in batches:
                events = [e for e in batch.events if event_matches(e, topics, namespace)]
                if events:
                    lines.append(to_json({"Index": batch.index, "Events": events}) + "\n")
            if lines:
                await write_line("".join(lines).encode())
    finally:
        heartbeat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeat
    return response


def add_routes(app: web.Application, *, heartbeat: float = HEARTBEAT_INTERVAL) -> None:
    app[HEARTBEAT_KEY] = heartbeat
    app.router.add_get("/v1/event/stream", event_stream)
