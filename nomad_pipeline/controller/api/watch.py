"""NDJSON watch streams: one ``{"type", "object"}`` per line, flushed as each event happens.

Without a resource version the stream starts with a synthetic ADDED per listed object, then
continues from the list's version, so a client never misses a change between list and watch.
A version older than the store keeps ends the stream with an ``ERROR`` event carrying code 410;
the client re-lists. There are no heartbeats: a line means a change.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from aiohttp import web

from nomad_pipeline.controller.api import STORE, WATCHES
from nomad_pipeline.errors import Gone
from nomad_pipeline.resources.meta import Resource

NDJSON = "application/x-ndjson"


def matches(labels: Mapping[str, str], selector: Mapping[str, str] | None) -> bool:
    return not selector or all(labels.get(key) == value for key, value in selector.items())


def object_wire(obj: Resource) -> dict[str, Any]:
    """The object as clients see it; cluster-scoped objects carry no namespace, so what a client
    reads can be applied again unchanged."""
    wire = obj.to_wire()
    if not obj.metadata.namespace:
        wire["metadata"].pop("namespace", None)
    return wire


def event_line(event_type: str, obj: dict[str, Any]) -> bytes:
    return json.dumps({"type": event_type, "object": obj}, separators=(",", ":")).encode() + b"\n"


async def stream_watch(
    request: web.Request,
    kind: type[Resource],
    *,
    namespace: str | None,
    selector: Mapping[str, str] | None,
    since: int | None,
) -> web.StreamResponse:
    store = request.app[STORE]
    response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-cache"})
    await response.prepare(request)
    task = asyncio.current_task()
    watches = request.app[WATCHES]
    if task is not None:
        watches.add(task)
    try:
        if since is None:
            listed = await store.list(kind, namespace, selector)
            for obj in listed.items:
                await response.write(event_line("ADDED", object_wire(obj)))
            since = listed.resource_version
        events = store.watch(kind, namespace, since)
        try:
            async for event in events:
                if not matches(event.object.metadata.labels, selector):
                    continue
                await response.write(event_line(event.type, object_wire(event.object)))
        finally:
            # Close the store's generator now (a cancelled watch), not whenever it is collected.
            if isinstance(events, AsyncGenerator):
                await events.aclose()
    except Gone as error:
        await response.write(event_line("ERROR", {"kind": "Status", **error.to_dict()}))
    except (ConnectionResetError, ConnectionError):
        # The client went away; nothing is left to tell it.
        return response
    finally:
        if task is not None:
            watches.discard(task)
    await response.write_eof()
    return response
