"""NDJSON watch streams: one ``{"type", "object"}`` per line, flushed as each event happens.

Without a resource version the stream starts with a synthetic ADDED per listed object, then
continues from the list's version, so a client never misses a change between list and watch.
A version older than the store keeps ends the stream with an ``ERROR`` event carrying code 410;
the client re-lists. There are no heartbeats: a line means a change.

A label selector filters events as Kubernetes' watch cache does: each change is judged by
whether the object matched the selector before it (the store's ``WatchEvent.previous``) and
after it, so a client's view (an informer, ``get -w -l``) stays exactly the selected objects:

- matched before and after: MODIFIED; matched neither: no line;
- did not match, now matches: ADDED (the object entered the selection);
- matched, no longer matches: DELETED carrying the new object (it left the selection);
- a deletion of a matching object: DELETED.

This holds for a watch resumed with ``resource_version=N`` too: events replayed from the
store's history carry their previous object as well.

On server shutdown every open watch ends cleanly, as the Kubernetes API server's do: a line
being written is finished, the chunked response is ended (``write_eof``) and the client reads a
normal end of stream, after which it re-watches from the last resource version it saw.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

from aiohttp import web

from nomad_pipeline.controller.api import STORE
from nomad_pipeline.errors import Gone
from nomad_pipeline.resources.meta import Resource
from nomad_pipeline.store.core import matches_selector
from nomad_pipeline.store.interface import WatchEvent, WatchEventType

NDJSON = "application/x-ndjson"


class WatchStreams:
    """The open watch streams of one application, and how shutdown ends them.

    :meth:`end_all` wakes every stream waiting for its next event (only that wait is abandoned,
    never a line being written); a stream busy writing finishes its line and ends before waiting
    again.
    """

    def __init__(self) -> None:
        self.closing = False
        # One timeout scope per stream waiting for the store; expiring it ends the wait alone.
        self._waits: set[asyncio.Timeout] = set()

    @property
    def waiting(self) -> int:
        """How many streams are waiting for their next event."""
        return len(self._waits)

    def end_all(self) -> None:
        """End every open watch stream cleanly; one opened from now on ends after its list."""
        if self.closing:
            # Their waits are expiring already (and an expiring one cannot be rescheduled).
            return
        self.closing = True
        now = asyncio.get_running_loop().time()
        for wait in self._waits:
            wait.reschedule(now)

    async def next_event(self, events: AsyncIterator[WatchEvent]) -> WatchEvent | None:
        """The next event, or None once the stream should end (shutdown, or the store closed)."""
        if self.closing:
            return None
        wait = asyncio.timeout(None)
        try:
            async with wait:
                self._waits.add(wait)
                try:
                    return await anext(events)
                finally:
                    self._waits.discard(wait)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            if wait.expired():
                return None
            raise


WATCH_STREAMS = web.AppKey("watch_streams", WatchStreams)


def selected_type(event: WatchEvent, selector: Mapping[str, str] | None) -> WatchEventType | None:
    """The type a watch filtered by ``selector`` reports ``event`` as; None leaves it out."""
    if not selector:
        return event.type
    matches_now = matches_selector(event.object.metadata.labels, selector)
    if event.type != "MODIFIED":
        return event.type if matches_now else None
    previous = event.previous
    # A store that did not hold the object before cannot say; judge by the new object alone.
    matched_before = (
        matches_now if previous is None else matches_selector(previous.metadata.labels, selector)
    )
    if matched_before and matches_now:
        return "MODIFIED"
    if matches_now:
        return "ADDED"
    if matched_before:
        return "DELETED"
    return None


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
    streams = request.app[WATCH_STREAMS]
    response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-cache"})
    await response.prepare(request)
    try:
        if since is None:
            listed = await store.list(kind, namespace, selector)
            for obj in listed.items:
                await response.write(event_line("ADDED", object_wire(obj)))
            since = listed.resource_version
        events = store.watch(kind, namespace, since)
        try:
            while (event := await streams.next_event(events)) is not None:
                event_type = selected_type(event, selector)
                if event_type is not None:
                    await response.write(event_line(event_type, object_wire(event.object)))
        finally:
            # Close the store's generator now (an ended or cancelled watch), not whenever it is
            # collected.
            if isinstance(events, AsyncGenerator):
                await events.aclose()
    except Gone as error:
        await response.write(event_line("ERROR", {"kind": "Status", **error.to_dict()}))
    except ConnectionError:
        # The client went away; nothing is left to tell it.
        return response
    await response.write_eof()
    return response
