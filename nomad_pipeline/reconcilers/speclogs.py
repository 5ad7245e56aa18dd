"""Copying specification steps' logs from Nomad into the controller's log store, live.

One copier task per (step, allocation, stream) follows ``client/fs/logs`` and appends what
arrives to ``<data-dir>/logs/runs/<ns>/<run>/<step>/logs/<stream>.log``. Nomad's followed
stream never ends by itself (nomad-api.md §6.1), so the run reconciler calls
:meth:`LogCopier.allocation_done` once the allocation is terminal; the copier then keeps reading
until the stream has been quiet for ``drain_quiet`` seconds (Nomad batches output over ~200 ms)
and hangs up.

A step's logs are marked finished (which ends ``logs -f`` followers) only once the step itself
has ended *and* every copy of it has drained: a step with ``retries`` has one allocation per
attempt, and the end of one attempt's copy says nothing about the next. The run reconciler
calls :meth:`LogCopier.step_ended` when it writes the step's terminal phase.

A restarted controller resumes where the file ends: for each allocation the copier remembers,
in ``.copy-offsets.json`` beside the log files, how long the files were before that allocation
wrote to them (earlier attempts of the step wrote before it), so Nomad's ``offset`` is the
file's length minus that base and nothing is copied twice. The record is written just before
the allocation's first chunk is appended, not when its copy starts: an allocation without a
record has appended nothing, so it resumes from offset 0, and a step that prints nothing (most
steps of a busy pipeline) costs no file writes at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from nomad_pipeline.controller.logstore import LogStore
from nomad_pipeline.errors import NomadPipelineError, NotFound
from nomad_pipeline.nomad.client import NomadClient

logger = logging.getLogger(__name__)

Stream = Literal["stdout", "stderr"]
STREAMS: tuple[Stream, ...] = ("stdout", "stderr")

# Offsets of an allocation none of whose output was copied yet.
_NOTHING_COPIED: dict[Stream, int] = {"stdout": 0, "stderr": 0}


def _streams_with_output(
    task: str, sizes: Mapping[str, int], offsets: Mapping[Stream, int]
) -> tuple[Stream, ...]:
    """The streams of an ended allocation that hold bytes beyond ``offsets``, by the sizes of
    its log files. When the listing cannot tell (rotated files, or an empty listing), the
    stream is read."""
    pending: list[Stream] = []
    for stream in STREAMS:
        prefix = f"{task}.{stream}."
        files = [name for name in sizes if name.startswith(prefix)]
        if files == [f"{prefix}0"] and sizes[files[0]] <= offsets[stream]:
            continue
        if files or not sizes:
            pending.append(stream)
    return tuple(pending)


OFFSETS_FILE = ".copy-offsets.json"

# A log request before the task started answers 404; retry until it has.
_NOT_STARTED_RETRY_SECONDS = 0.1
_RETRY_CAP_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class LogSource:
    namespace: str
    run: str
    step: str
    nomad_namespace: str
    alloc_id: str
    task: str


@dataclass(slots=True)
class _Copy:
    source: LogSource
    done: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # Whether this allocation's bases are in the offsets file; the lock makes the first chunks
    # of both streams record them once, before either is appended.
    recorded: bool = False
    recording: asyncio.Lock = field(default_factory=asyncio.Lock)


class LogCopier:
    """Owns every copier task; ``close()`` cancels them (the files keep what was copied)."""

    def __init__(
        self, nomad: NomadClient, logs: LogStore, *, drain_quiet: float = 0.4, drain_max: float = 5
    ) -> None:
        self._nomad = nomad
        self._logs = logs
        self._drain_quiet = drain_quiet
        self._drain_max = drain_max
        self._copies: dict[tuple[str, str, str, str], _Copy] = {}
        # The allocations being copied, by step.
        self._step_allocations: dict[tuple[str, str, str], set[str]] = {}
        # Steps that ended while some copy of theirs was still draining: marked finished when
        # the last one is done.
        self._ended_steps: set[tuple[str, str, str]] = set()
        # Tasks telling the log store a step's logs are complete (owned, awaited on close).
        self._marking: set[asyncio.Task[None]] = set()
        self.requests = 0

    def __len__(self) -> int:
        return len(self._copies)

    def start(self, source: LogSource, *, ended: bool = False) -> None:
        """Start copying ``source`` unless it is already being copied. ``ended``: the allocation
        is already terminal, so its logs are read once to their end instead of followed."""
        key = (source.namespace, source.run, source.step, source.alloc_id)
        if key in self._copies:
            return
        copy = _Copy(source)
        if ended:
            copy.done.set()
        self._copies[key] = copy
        self._step_allocations.setdefault(key[:3], set()).add(source.alloc_id)
        task = asyncio.create_task(
            self._copy_allocation(copy), name=f"logs-{source.run}-{source.step}"
        )
        copy.tasks.append(task)
        task.add_done_callback(functools.partial(self._finished, key))

    def copying(self, namespace: str, run: str, step: str, alloc_id: str) -> bool:
        return (namespace, run, step, alloc_id) in self._copies

    def allocation_done(self, namespace: str, run: str, step: str, alloc_id: str) -> None:
        """The allocation is terminal: drain what is left, then stop."""
        copy = self._copies.get((namespace, run, step, alloc_id))
        if copy is not None:
            copy.done.set()

    def step_ended(self, namespace: str, run: str, step: str) -> None:
        """The step reached a terminal phase (no attempt follows): once its copies have
        drained, its logs are marked finished."""
        step_key = (namespace, run, step)
        allocations = self._step_allocations.get(step_key)
        if not allocations:
            self._mark_finished(step_key)
            return
        for alloc_id in allocations:
            self._copies[(*step_key, alloc_id)].done.set()
        self._ended_steps.add(step_key)

    def stop_run(self, namespace: str, run: str) -> None:
        """Drain and stop every copy of a run (cancelled or deleted)."""
        for (ns, run_name, _step, _alloc), copy in list(self._copies.items()):
            if ns == namespace and run_name == run:
                copy.done.set()

    async def close(self) -> None:
        tasks = [task for copy in self._copies.values() for task in copy.tasks]
        tasks.extend(self._marking)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._copies.clear()
        self._step_allocations.clear()
        self._ended_steps.clear()

    async def discard_run(self, namespace: str, run: str) -> None:
        """End every copy of a run at once, without draining, and wait until they ended: the
        run is being deleted, so nothing may append to its logs once they are removed."""
        tasks = [
            task
            for (ns, run_name, _step, _alloc), copy in self._copies.items()
            if ns == namespace and run_name == run
            for task in copy.tasks
        ]
        for task in tasks:
            task.cancel()
        # The copies' own cancellations are their results; a cancellation of ours propagates.
        await asyncio.gather(*tasks, return_exceptions=True)

    def _finished(self, key: tuple[str, str, str, str], _task: asyncio.Task[None]) -> None:
        copy = self._copies.get(key)
        if copy is None or not all(task.done() for task in copy.tasks):
            return
        del self._copies[key]
        step_key = key[:3]
        allocations = self._step_allocations.get(step_key, set())
        allocations.discard(key[3])
        if allocations:
            return
        self._step_allocations.pop(step_key, None)
        if step_key in self._ended_steps:
            self._ended_steps.discard(step_key)
            self._mark_finished(step_key)

    def _mark_finished(self, step_key: tuple[str, str, str]) -> None:
        """Tell the log store the step logs no more, so followers of `logs -f` drain and end."""
        namespace, run, step = step_key
        task = asyncio.create_task(
            self._logs.mark_step_finished(namespace, run, step),
            name=f"logs-finished-{run}-{step}",
        )
        self._marking.add(task)
        task.add_done_callback(self._marking.discard)
        task.add_done_callback(_log_failure)

    async def _copy_allocation(self, copy: _Copy) -> None:
        """Both streams of one allocation, resuming where each file ends (one disk round trip
        for both offsets)."""
        source = copy.source
        sizes = await self._log_sizes(source) if copy.done.is_set() else None
        if sizes is not None and not _streams_with_output(source.task, sizes, _NOTHING_COPIED):
            # Ended with nothing printed (most steps of a busy pipeline): whatever was copied
            # before, nothing is left, so neither the log files nor their offsets are touched.
            return
        # One validated path, its sibling derived: validating names and building the path is
        # a measurable cost per allocation, not worth paying per stream.
        stdout = self._logs.path(source.namespace, source.run, source.step, "stdout")
        paths: dict[Stream, Path] = {"stdout": stdout, "stderr": stdout.with_name("stderr.log")}
        offsets = await asyncio.to_thread(_resume_offsets, paths, source.alloc_id)
        streams_to_copy = (
            STREAMS if sizes is None else _streams_with_output(source.task, sizes, offsets)
        )
        async with asyncio.TaskGroup() as streams:
            for stream in streams_to_copy:
                streams.create_task(
                    self._copy(copy, paths, stream, offsets[stream]),
                    name=f"logs-{source.run}-{source.step}-{stream}",
                )

    async def _log_sizes(self, source: LogSource) -> dict[str, int] | None:
        """The sizes of an ended allocation's log files by name, from one listing of its log
        directory (most steps print little or nothing, so this one request often replaces a
        log request per stream); None when the listing failed."""
        self.requests += 1
        try:
            entries = await self._nomad.list_files(
                source.alloc_id, "alloc/logs", namespace=source.nomad_namespace
            )
        except NomadPipelineError:
            return None
        return {str(entry.get("Name")): int(entry.get("Size") or 0) for entry in entries}

    async def _append(
        self, copy: _Copy, paths: dict[Stream, Path], stream: Stream, chunk: bytes
    ) -> None:
        """Append one chunk, recording the allocation's bases first (module docstring)."""
        source = copy.source
        if not copy.recorded:
            async with copy.recording:
                if not copy.recorded:
                    await asyncio.to_thread(_record_bases, paths, source.alloc_id)
                    copy.recorded = True
        await self._logs.append(source.namespace, source.run, source.step, stream, chunk)

    async def _copy(
        self, copy: _Copy, paths: dict[Stream, Path], stream: Stream, offset: int
    ) -> None:
        source = copy.source
        delay = _NOT_STARTED_RETRY_SECONDS
        first = True
        while True:
            if not first:
                offsets = await asyncio.to_thread(
                    _resume_offsets, {stream: paths[stream]}, source.alloc_id
                )
                offset = offsets[stream]
            first = False
            try:
                if copy.done.is_set():
                    # Terminal already: everything is written, a plain read ends at the end.
                    await self._read_to_end(copy, paths, stream, offset)
                    finished = True
                else:
                    finished = await self._follow(copy, paths, stream, offset)
            except asyncio.CancelledError:
                raise
            except NotFound:
                # Not started yet, or garbage-collected; once the allocation is done, give up.
                if copy.done.is_set():
                    return
                finished = False
            except NomadPipelineError as error:
                logger.warning(
                    "log stream broke, resuming",
                    extra={"alloc_id": source.alloc_id, "stream": stream, "error": str(error)},
                )
                finished = False
            if finished:
                return
            if copy.done.is_set():
                delay = min(delay, self._drain_quiet)
            await _wait_or(copy.done, delay)
            delay = min(delay * 2, _RETRY_CAP_SECONDS)

    def _stream_logs(
        self, source: LogSource, stream: Stream, offset: int, *, follow: bool
    ) -> AsyncGenerator[bytes, None]:
        """Nomad's log stream of ``source``'s task from ``offset``, counted in ``requests``."""
        self.requests += 1
        return self._nomad.stream_logs(
            source.alloc_id,
            source.task,
            stream,
            namespace=source.nomad_namespace,
            offset=offset,
            follow=follow,
        )

    async def _read_to_end(
        self, copy: _Copy, paths: dict[Stream, Path], stream: Stream, offset: int
    ) -> None:
        async for chunk in self._stream_logs(copy.source, stream, offset, follow=False):
            await self._append(copy, paths, stream, chunk)

    async def _follow(
        self, copy: _Copy, paths: dict[Stream, Path], stream: Stream, offset: int
    ) -> bool:
        """Copy until drained after the allocation ended (True) or the stream ended (False).

        A pump task reads Nomad's stream into a queue, so waiting for "more data or the end of
        the allocation" never cancels a read in the middle of the HTTP stream.
        """
        source = copy.source
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for chunk in self._stream_logs(source, stream, offset, follow=True):
                    queue.put_nowait(chunk)
            finally:
                queue.put_nowait(None)

        pump_task = asyncio.create_task(pump(), name=f"logs-pump-{source.alloc_id}-{stream}")
        loop = asyncio.get_running_loop()
        drain_deadline: float | None = None
        try:
            while True:
                chunk: bytes | None
                if not copy.done.is_set():
                    getter = asyncio.create_task(queue.get())
                    ended = asyncio.create_task(copy.done.wait())
                    await asyncio.wait({getter, ended}, return_when=asyncio.FIRST_COMPLETED)
                    ended.cancel()
                    if not getter.done():
                        getter.cancel()
                        continue
                    chunk = getter.result()
                else:
                    if drain_deadline is None:
                        drain_deadline = loop.time() + self._drain_max
                    quiet = min(self._drain_quiet, max(0.0, drain_deadline - loop.time()))
                    try:
                        async with asyncio.timeout(quiet):
                            chunk = await queue.get()
                    except TimeoutError:
                        return True
                if chunk is None:
                    await pump_task  # raises what broke the stream, if anything did
                    return copy.done.is_set()
                await self._append(copy, paths, stream, chunk)
        finally:
            pump_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, NomadPipelineError):
                await pump_task


async def _wait_or(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("marking a step's logs finished failed", exc_info=task.exception())


def _read_offsets(offsets_path: Path) -> dict[str, dict[str, int]]:
    try:
        offsets: dict[str, dict[str, int]] = json.loads(offsets_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return offsets


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _resume_offsets(paths: dict[Stream, Path], alloc_id: str) -> dict[Stream, int]:
    """Where Nomad's streams of ``alloc_id`` resume: each file's length minus the length it had
    before this allocation's first chunk; 0 for an allocation that appended nothing yet."""
    bases = _read_offsets(next(iter(paths.values())).parent / OFFSETS_FILE).get(alloc_id)
    if bases is None:
        return dict.fromkeys(paths, 0)
    return {
        stream: max(0, _file_size(path) - int(bases.get(stream, 0)))
        for stream, path in paths.items()
    }


def _record_bases(paths: dict[Stream, Path], alloc_id: str) -> None:
    """Record the files' lengths as ``alloc_id``'s bases (before it appends anything), in one
    atomic replace of the offsets file."""
    offsets_path = next(iter(paths.values())).parent / OFFSETS_FILE
    offsets = _read_offsets(offsets_path)
    if alloc_id in offsets:
        return
    offsets[alloc_id] = {stream: _file_size(path) for stream, path in paths.items()}
    offsets_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = offsets_path.with_name(f"{OFFSETS_FILE}.{alloc_id}.tmp")
    temporary.write_text(json.dumps(offsets))
    temporary.replace(offsets_path)
