"""Step logs on the controller's disk, in the seed's layout, with live followers.

Layout: ``<root>/runs/<namespace>/<run-id>/<step-id>/logs/{stdout,stderr}.log`` where ``root`` is
``<data-dir>/logs``. Every ID is checked against a name pattern and every resolved path must stay
under the root, so neither ``../`` nor a planted symlink can make us read or write elsewhere.

File I/O runs in worker threads so the event loop never blocks on disk. Each file has an
``asyncio.Condition``: an append notifies it after the bytes are on disk, so a follower wakes
within milliseconds of the write instead of polling. A follower ends once the step is over (the
caller's ``until`` says so, or :meth:`LogStore.mark_step_finished` was called) and everything
written before that has been handed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from nomad_pipeline.errors import Invalid

LogStream = Literal["stdout", "stderr"]
LOG_STREAMS: tuple[LogStream, ...] = get_args(LogStream)

# Names only: letters, digits, '-', '_' and '.', starting and ending with a letter or digit. This
# admits resource names, lower- or upper-case ULIDs and the seed's step ids ("run_build"), and
# can never spell "/", "." or "..".
_ID_PATTERN = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9])?$")
_ID_RULE = (
    "must be 1-253 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
)

# One read hands out at most this much, so a follower of a large file streams it in pieces.
READ_CHUNK = 64 * 1024

_FILE_MODE = 0o644
# Beside the step directories of a run (a step id cannot start with "."): the last runner report
# sequence number applied, so retried reports are recognised after a controller restart too.
_REPORT_SEQ_FILE = ".runner-report-seq"


def validate_log_id(value: str, what: str) -> str:
    """Return ``value`` if it is a safe path component, else raise Invalid naming ``what``."""
    if not _ID_PATTERN.match(value):
        raise Invalid(f"{what} {value!r} {_ID_RULE}", field=what)
    return value


def validate_stream(value: str) -> LogStream:
    for stream in LOG_STREAMS:
        if value == stream:
            return stream
    raise Invalid(f"log type {value!r} must be one of {', '.join(LOG_STREAMS)}", field="type")


@dataclass(eq=False, slots=True)
class _LogFile:
    """Live state of one log file: its size as appended so far and who waits for more."""

    size: int
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    # Set when the step is marked finished (or its run deleted) and this state is dropped, so
    # followers still holding it end even if the finished mark is gone by the time they wake.
    closed: bool = False


_FileKey = tuple[str, str, str, LogStream]
_StepKey = tuple[str, str, str]


@dataclass(eq=False, slots=True, weakref_slot=True)
class _RootState:
    """What followers wait on, shared by every LogStore over one root in this process: the API
    and the reconcilers may each build their own, and an append through any of them must wake
    the followers of all."""

    files: dict[_FileKey, _LogFile] = field(default_factory=dict)
    finished: set[_StepKey] = field(default_factory=set)
    report_seqs: dict[tuple[str, str], int] = field(default_factory=dict)


# Held weakly: the state lives as long as some LogStore over that root does.
_ROOT_STATES: weakref.WeakValueDictionary[Path, _RootState] = weakref.WeakValueDictionary()


def _shared_state(root: Path) -> _RootState:
    key = root.resolve()
    state = _ROOT_STATES.get(key)
    if state is None:
        state = _RootState()
        _ROOT_STATES[key] = state
    return state


class LogStore:
    def __init__(self, root: Path) -> None:
        self._root = root
        self._shared = _shared_state(root)

    @property
    def root(self) -> Path:
        return self._root

    def path(self, namespace: str, run: str, step: str, stream: LogStream) -> Path:
        """The file of one step's stream (validated names; the file may not exist yet)."""
        return self._step_dir(namespace, run, step) / "logs" / f"{validate_stream(stream)}.log"

    async def append(
        self, namespace: str, run: str, step: str, stream: LogStream, data: bytes
    ) -> None:
        """Append ``data`` and wake the followers of that file once it is on disk."""
        if not data:
            return
        key = self._file_key(namespace, run, step, stream)
        path = self.path(namespace, run, step, stream)
        log_file = await self._log_file(key, path)
        # The condition's lock also serialises writers of one file, so concurrent appends land
        # whole and in the order they acquired it, and ``size`` always matches the file.
        async with log_file.changed:
            await asyncio.to_thread(self._write, path, data)
            log_file.size += len(data)
            log_file.changed.notify_all()

    async def read(
        self,
        namespace: str,
        run: str,
        step: str,
        stream: LogStream,
        *,
        offset: int = 0,
        limit: int | None = None,
    ) -> bytes:
        """Bytes from ``offset`` (at most ``limit``); empty when nothing was logged yet."""
        path = self.path(namespace, run, step, stream)
        return await asyncio.to_thread(self._read, path, offset, limit)

    async def exists(self, namespace: str, run: str, step: str | None = None) -> bool:
        """Whether anything was logged for the run (or the step)."""
        directory = (
            self._run_dir(namespace, run) if step is None else self._step_dir(namespace, run, step)
        )
        return await asyncio.to_thread(self._is_dir, directory)

    async def follow(
        self,
        namespace: str,
        run: str,
        step: str,
        stream: LogStream,
        *,
        offset: int = 0,
        until: Callable[[], bool] | asyncio.Event,
    ) -> AsyncIterator[bytes]:
        """Chunks from ``offset`` on, then each append as it lands, until the step is over.

        The step is over when ``until`` is true (a callable is checked whenever the file changes
        or the step is marked finished; an Event also wakes the follower when set) or when
        :meth:`mark_step_finished` was called. What was written before that is always handed out
        before the iterator ends.
        """
        key = self._file_key(namespace, run, step, stream)
        path = self.path(namespace, run, step, stream)
        step_key = key[:3]
        log_file = await self._log_file(key, path)

        def step_over() -> bool:
            if log_file.closed or step_key in self._shared.finished:
                return True
            return until.is_set() if isinstance(until, asyncio.Event) else until()

        waker: asyncio.Task[None] | None = None
        if isinstance(until, asyncio.Event):
            waker = asyncio.create_task(
                self._notify_when_set(until, log_file), name=f"log follow waker {path}"
            )
        try:
            while True:
                async with log_file.changed:
                    # Checked under the lock that appends hold while they bump ``size``, so a
                    # wake-up can never slip between this check and the wait.
                    while log_file.size <= offset and not step_over():
                        await log_file.changed.wait()
                    over = step_over()
                    available = log_file.size
                while offset < available:
                    chunk = await asyncio.to_thread(
                        self._read, path, offset, min(READ_CHUNK, available - offset)
                    )
                    if not chunk:
                        break
                    offset += len(chunk)
                    yield chunk
                if over and offset >= log_file.size:
                    return
        finally:
            if waker is not None:
                waker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waker

    async def mark_step_finished(self, namespace: str, run: str, step: str) -> None:
        """Record that the step will log no more, and wake its followers so they drain and end."""
        step_key = (
            validate_log_id(namespace, "namespace"),
            validate_log_id(run, "run id"),
            validate_log_id(step, "step id"),
        )
        self._shared.finished.add(step_key)
        for stream in LOG_STREAMS:
            log_file = self._shared.files.pop((*step_key, stream), None)
            if log_file is not None:
                async with log_file.changed:
                    log_file.closed = True
                    log_file.changed.notify_all()

    def step_finished(self, namespace: str, run: str, step: str) -> bool:
        return (namespace, run, step) in self._shared.finished

    async def delete_run(self, namespace: str, run: str) -> None:
        """Remove every log of the run; its followers end. Deleting twice is not an error."""
        run_dir = self._run_dir(namespace, run)
        await asyncio.to_thread(self._remove_tree, run_dir)
        steps = {key[2] for key in self._shared.files if key[:2] == (namespace, run)}
        for step in steps:
            await self.mark_step_finished(namespace, run, step)
        self._shared.finished = {
            key for key in self._shared.finished if key[:2] != (namespace, run)
        }
        self._shared.report_seqs.pop((namespace, run), None)

    async def report_seq(self, namespace: str, run: str) -> int:
        """The highest runner report sequence number applied for the run (0 if none)."""
        key = (namespace, run)
        seq = self._shared.report_seqs.get(key)
        if seq is None:
            path = self._run_dir(namespace, run) / _REPORT_SEQ_FILE
            seq = await asyncio.to_thread(self._read_seq, path)
            self._shared.report_seqs[key] = seq
        return seq

    async def set_report_seq(self, namespace: str, run: str, seq: int) -> None:
        """Record ``seq`` durably (written to a temporary file, then renamed over the old one)."""
        path = self._run_dir(namespace, run) / _REPORT_SEQ_FILE
        await asyncio.to_thread(self._write_seq, path, seq)
        self._shared.report_seqs[(namespace, run)] = seq

    # -- paths ---------------------------------------------------------------------------------

    def _run_dir(self, namespace: str, run: str) -> Path:
        directory = (
            self._root
            / "runs"
            / validate_log_id(namespace, "namespace")
            / validate_log_id(run, "run id")
        )
        return directory

    def _step_dir(self, namespace: str, run: str, step: str) -> Path:
        return self._run_dir(namespace, run) / validate_log_id(step, "step id")

    def _check_inside_root(self, path: Path) -> None:
        """Refuse a path whose existing part resolves outside the root (a planted symlink).

        Names are validated before (no "..", no "/"), so only a symlink can lead out. This
        touches the disk: it runs in the worker threads, right before the access it guards.
        """
        root = self._root.resolve()
        if not path.resolve().is_relative_to(root):
            raise Invalid(f"log path {path} resolves outside the log directory {root}")

    @staticmethod
    def _file_key(namespace: str, run: str, step: str, stream: LogStream) -> _FileKey:
        return (namespace, run, step, stream)

    async def _log_file(self, key: _FileKey, path: Path) -> _LogFile:
        log_file = self._shared.files.get(key)
        if log_file is None:
            size = await asyncio.to_thread(self._size, path)
            # Another coroutine may have created the state while we looked at the disk.
            log_file = self._shared.files.setdefault(key, _LogFile(size=size))
        return log_file

    @staticmethod
    async def _notify_when_set(event: asyncio.Event, log_file: _LogFile) -> None:
        await event.wait()
        async with log_file.changed:
            log_file.changed.notify_all()

    # -- blocking helpers, run in worker threads -----------------------------------------------

    def _write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The directories may only now exist: check again before writing through them.
        self._check_inside_root(path.parent)
        descriptor = os.open(
            path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, _FILE_MODE
        )
        try:
            view = memoryview(data)
            while view:
                written = os.write(descriptor, view)
                view = view[written:]
        finally:
            os.close(descriptor)

    def _read(self, path: Path, offset: int, limit: int | None) -> bytes:
        self._check_inside_root(path.parent)
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return b""
        with os.fdopen(descriptor, "rb") as handle:
            handle.seek(offset)
            return handle.read() if limit is None else handle.read(limit)

    def _read_seq(self, path: Path) -> int:
        self._check_inside_root(path.parent)
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            return 0
        try:
            return int(text)
        except ValueError:
            raise Invalid(
                f"runner report sequence file {path} holds {text!r}, not a number"
            ) from None

    def _write_seq(self, path: Path, seq: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._check_inside_root(path.parent)
        temporary = path.with_name(f"{path.name}.tmp")
        temporary.write_text(f"{seq}\n")
        os.replace(temporary, path)

    def _is_dir(self, directory: Path) -> bool:
        self._check_inside_root(directory)
        return directory.is_dir()

    def _remove_tree(self, directory: Path) -> None:
        self._check_inside_root(directory)
        # rmtree never follows symlinks inside the tree.
        shutil.rmtree(directory, ignore_errors=True)

    def _size(self, path: Path) -> int:
        self._check_inside_root(path.parent)
        try:
            return path.lstat().st_size
        except FileNotFoundError:
            return 0
