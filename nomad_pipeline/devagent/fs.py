"""The client file system API: ``/v1/client/fs/{logs,stream,cat,readat,ls,stat}/:alloc_id``.

Paths are relative to the allocation directory and are resolved (symlinks included) before
use; anything that lands outside the directory, or inside a task's ``secrets``/``private``
directory, is refused. Logs and ``stream`` speak Nomad's framed format: concatenated JSON
objects with no separator, base64 ``Data``, ``{}`` heartbeats every second while following.
A followed stream never ends by itself, as in real Nomad (hashicorp/nomad#18369): the reader
hangs up once the allocation is terminal.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import stat as stat_module
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Protocol

from aiohttp import web

from nomad_pipeline.devagent.http import STATE_KEY, query_bool, query_meta_headers
from nomad_pipeline.devagent.state import NomadHTTPError, Obj

FRAME_SIZE = 64 * 1024
HEARTBEAT_INTERVAL = 1.0
_PROTECTED_TASK_DIRS = {"secrets": "secret", "private": "private"}


class AllocFiles(Protocol):
    """What the file system API needs from the engine."""

    def alloc_dir(self, alloc_id: str) -> Path: ...

    # The engine's signature: a bounded wait for the next log write, not a cancellable op.
    async def wait_for_log_write(self, alloc_id: str, timeout: float) -> None: ...  # noqa: ASYNC109


FILES_KEY: Final = web.AppKey("devagent_alloc_files", AllocFiles)


# -- allocation and path resolution ---------------------------------------------------------


def real_path(path: Path) -> Path:
    """``path.resolve()``: absolute, every symlink followed.

    An existing path is resolved by the kernel, from an ``O_PATH`` descriptor's entry in
    ``/proc/self/fd``: three system calls where ``resolve`` makes one ``lstat`` per component
    and walks them in Python, for every file system request and log file. A path that does
    not exist (or a system without ``/proc``) takes ``resolve``'s way.
    """
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except (OSError, AttributeError):
        return path.resolve()
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return path.resolve()
    finally:
        os.close(fd)


def _inside(root: Path, path: Path) -> bool:
    """``root in path.parents`` for resolved absolute paths, without building every parent."""
    return str(path).startswith(os.path.join(str(root), ""))


def _allocation(request: web.Request) -> tuple[Obj, Path]:
    alloc_id = request.match_info["alloc_id"]
    alloc = request.app[STATE_KEY].get("allocs", alloc_id)
    if alloc is None:
        raise NomadHTTPError(404, f'Unknown allocation "{alloc_id}"')
    root = request.app[FILES_KEY].alloc_dir(alloc_id)
    if not root.is_dir():
        raise NomadHTTPError(404, f"state for allocation {alloc_id} not found on client")
    return alloc, real_path(root)


def resolve_in_alloc_dir(root: Path, relative: str) -> Path:
    """``relative`` inside the allocation directory ``root`` (already resolved), or a 400."""
    target = real_path(root / relative.lstrip("/"))
    if target != root and not _inside(root, target):
        raise NomadHTTPError(400, "Path escapes the alloc directory")
    parts = target.relative_to(root).parts
    if len(parts) >= 2 and parts[0] != "alloc" and parts[1] in _PROTECTED_TASK_DIRS:
        kind = _PROTECTED_TASK_DIRS[parts[1]]
        raise NomadHTTPError(400, f"Reading {kind} file prohibited: {relative}")
    return target


def _required_path(request: web.Request) -> str:
    path = request.query.get("path", "")
    if not path:
        raise NomadHTTPError(400, "must provide a file name")
    return path


def _file_info(path: Path, name: str) -> Obj:
    info = path.lstat()
    return {
        "Name": name,
        "IsDir": stat_module.S_ISDIR(info.st_mode),
        "Size": info.st_size,
        "FileMode": stat_module.filemode(info.st_mode),
        "ModTime": datetime.fromtimestamp(info.st_mtime, UTC).isoformat().replace("+00:00", "Z"),
    }


def _content_type(path: Path) -> str:
    """What Go's ``http.DetectContentType`` says for the common cases (text or binary)."""
    with path.open("rb") as handle:
        head = handle.read(512)
    if not head:
        return "text/plain; charset=utf-8"
    if b"\x00" in head:
        return "application/octet-stream"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut at the 512-byte boundary is still text.
        if exc.start < len(head) - 3:
            return "application/octet-stream"
    return "text/plain; charset=utf-8"


def _stat_error(relative: str, target: Path) -> NomadHTTPError:
    if not target.exists():
        return NomadHTTPError(400, f"stat {relative}: no such file or directory")
    return NomadHTTPError(400, f"stat {relative}: permission denied")


def _existing_file(root: Path, relative: str) -> Path:
    """``relative`` inside the allocation directory, which must exist and not be a directory."""
    target = resolve_in_alloc_dir(root, relative)
    if not target.exists():
        raise _stat_error(relative, target)
    if target.is_dir():
        raise NomadHTTPError(400, f'file "{relative}" is a directory')
    return target


# -- cat, readat, ls, stat ------------------------------------------------------------------


async def cat(request: web.Request) -> web.StreamResponse:
    _, root = _allocation(request)
    relative = _required_path(request)
    target = _existing_file(root, relative)
    data = await asyncio.to_thread(target.read_bytes)
    return web.Response(body=data, content_type="text/plain", headers=_headers(request))


async def readat(request: web.Request) -> web.StreamResponse:
    _, root = _allocation(request)
    relative = _required_path(request)
    offset = _int_param(request, "offset")
    limit = _int_param(request, "limit")
    target = _existing_file(root, relative)
    data = await asyncio.to_thread(_read_range, target, offset, limit)
    return web.Response(body=data, content_type="text/plain", headers=_headers(request))


def _int_param(request: web.Request, name: str) -> int:
    value = request.query.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise NomadHTTPError(
            400, f'error parsing {name}: strconv.ParseInt: parsing "{value}": invalid syntax'
        ) from None


def _read_range(path: Path, offset: int, limit: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(max(offset, 0))
        return handle.read(limit) if limit >= 0 else handle.read()


async def ls(request: web.Request) -> web.StreamResponse:
    _, root = _allocation(request)
    relative = request.query.get("path", "") or "/"
    target = resolve_in_alloc_dir(root, relative)
    if not target.exists():
        raise _stat_error(relative, target)
    if not target.is_dir():
        raise NomadHTTPError(400, f"readdirent {relative}: not a directory")
    entries = sorted(target.iterdir(), key=lambda p: p.name)
    body = [_file_info(entry, entry.name) for entry in entries]
    return web.json_response(body, headers=_headers(request))


async def stat(request: web.Request) -> web.StreamResponse:
    _, root = _allocation(request)
    relative = _required_path(request)
    target = resolve_in_alloc_dir(root, relative)
    if not target.exists():
        raise _stat_error(relative, target)
    body = _file_info(target, target.name)
    body["ContentType"] = "" if target.is_dir() else _content_type(target)
    return web.json_response(body, headers=_headers(request))


def _headers(request: web.Request) -> dict[str, str]:
    return query_meta_headers(request.app[STATE_KEY].index)


# -- framed streams -------------------------------------------------------------------------


@dataclass(slots=True)
class _Cursor:
    """Where a stream reads next: a file among ``files`` (rotations in order) and a byte offset."""

    files: list[Path]
    position: int
    current: int = 0


def _log_files(root: Path, task: str, log_type: str) -> list[Path]:
    pattern = re.compile(rf"^{re.escape(task)}\.{log_type}\.(\d+)$")
    logs = root / "alloc" / "logs"
    try:
        with os.scandir(logs) as listing:
            found = [
                (int(match.group(1)), entry.name, entry.is_symlink())
                for entry in listing
                if (match := pattern.match(entry.name))
            ]
    except OSError:
        return []
    # A task could swap its log file (or the logs directory) for a symlink: only files inside
    # the allocation directory count. A file that is no symlink is where its directory is.
    logs_inside = _inside(root, real_path(logs))
    return [
        logs / name
        for _, name, is_symlink in sorted(found)
        if (_inside(root, real_path(logs / name)) if is_symlink else logs_inside)
    ]


def _start_cursor(files: list[Path], origin: str, offset: int) -> _Cursor:
    if origin == "start":
        return _Cursor(files, max(offset, 0))
    # origin=end counts back from the end of the newest file across older rotations.
    remaining = max(offset, 0)
    for index in range(len(files) - 1, -1, -1):
        size = files[index].stat().st_size
        if remaining <= size:
            return _Cursor(files, size - remaining, index)
        remaining -= size
    return _Cursor(files, 0)


class _FrameWriter:
    def __init__(self, response: web.StreamResponse, root: Path, *, plain: bool) -> None:
        self.response = response
        self.root = root
        self.plain = plain
        self.last_write = asyncio.get_running_loop().time()

    async def data(self, path: Path, data: bytes, offset: int) -> None:
        if self.plain:
            await self.response.write(data)
        else:
            await self._frame(
                {
                    "Offset": offset,
                    "Data": base64.b64encode(data).decode(),
                    "File": path.relative_to(self.root).as_posix(),
                }
            )

    async def event(self, path: Path, event: str) -> None:
        if not self.plain:
            await self._frame({"File": path.relative_to(self.root).as_posix(), "FileEvent": event})

    async def heartbeat(self) -> None:
        loop = asyncio.get_running_loop()
        if not self.plain and loop.time() - self.last_write >= HEARTBEAT_INTERVAL:
            await self._frame({})

    async def _frame(self, frame: Obj) -> None:
        await self.response.write(json.dumps(frame, separators=(",", ":")).encode())
        self.last_write = asyncio.get_running_loop().time()


async def _stream(
    request: web.Request,
    alloc_id: str,
    cursor: _Cursor,
    writer: _FrameWriter,
    *,
    follow: bool,
    rotations: Callable[[], list[Path]] | None,
) -> None:
    """Send ``cursor``'s file from its position on; with ``rotations``, move on to newer ones."""
    files = request.app[FILES_KEY]
    while True:
        path = cursor.files[cursor.current]
        # A followed file is checked every second and mostly has not grown: its size, one
        # stat on the loop as the other path checks here, saves a thread hop for nothing.
        size = _size(path, cursor.position)
        chunk = b""
        if size > cursor.position:
            chunk, size = await asyncio.to_thread(_read_chunk, path, cursor.position)
        if size < cursor.position:
            await writer.event(path, "file truncated")
            cursor.position = 0
            continue
        if chunk:
            cursor.position += len(chunk)
            await writer.data(path, chunk, cursor.position)
            continue
        newer = (
            _newer_rotations(path, rotations())
            if rotations is not None and _may_have_rotated(path)
            else []
        )
        if newer:
            # By rotation number, not list position: older files may have been deleted.
            cursor.files = newer
            cursor.current = 0
            cursor.position = 0
            continue
        if not follow:
            return
        await files.wait_for_log_write(alloc_id, HEARTBEAT_INTERVAL)
        await writer.heartbeat()


def _rotation(path: Path) -> int:
    return int(path.name.rsplit(".", 1)[1])


def _may_have_rotated(current: Path) -> bool:
    """Whether a log file newer than ``current`` may exist.

    The task's log writer creates ``<task>.<type>.<n+1>`` before any newer file and deletes
    the oldest files first: while ``current`` is there and its successor is not, nothing newer
    is. Two ``lstat`` calls instead of listing the directory, which a follower of a quiet
    task would otherwise do every second.
    """
    successor = current.with_name(f"{current.name.rsplit('.', 1)[0]}.{_rotation(current) + 1}")
    return not os.path.lexists(current) or os.path.lexists(successor)


def _newer_rotations(current: Path, files: list[Path]) -> list[Path]:
    return [f for f in files if _rotation(f) > _rotation(current)]


def _size(path: Path, missing: int) -> int:
    """The file's size, ``missing`` when it is gone (as ``_read_chunk`` counts it)."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return missing


def _read_chunk(path: Path, position: int) -> tuple[bytes, int]:
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, 2)
            if size <= position:
                return b"", size
            handle.seek(position)
            return handle.read(FRAME_SIZE), size
    except FileNotFoundError:
        return b"", position


def _origin_and_offset(request: web.Request) -> tuple[str, int]:
    origin = request.query.get("origin", "") or "start"
    if origin not in ("start", "end"):
        raise NomadHTTPError(400, "origin must be start or end")
    raw = request.query.get("offset", "") or "0"
    try:
        offset = int(raw)
    except ValueError:
        raise NomadHTTPError(400, f'strconv.ParseInt: parsing "{raw}": invalid syntax') from None
    return origin, offset


async def _open_stream(request: web.Request, *, plain: bool) -> web.StreamResponse:
    response = web.StreamResponse(headers=_headers(request))
    response.content_type = "text/plain" if plain else "application/json"
    await response.prepare(request)
    return response


async def logs(request: web.Request) -> web.StreamResponse:
    alloc, root = _allocation(request)
    task = request.query.get("task", "")
    if not task:
        raise NomadHTTPError(400, "must provide task name")
    if task not in _task_names(alloc):
        raise NomadHTTPError(400, f'unknown task name "{task}"')
    log_type = request.query.get("type", "")
    if log_type not in ("stdout", "stderr"):
        raise NomadHTTPError(400, "must provide log type (stdout/stderr)")
    follow = query_bool(request, "follow")
    plain = query_bool(request, "plain")
    origin, offset = _origin_and_offset(request)
    task_state = (alloc.get("TaskStates") or {}).get(task) or {}
    if not task_state.get("StartedAt") or task_state["StartedAt"].startswith("0001-"):
        raise NomadHTTPError(404, f'task "{task}" not started yet. No logs available')
    if _log_config(alloc, task).get("Disabled"):
        raise NomadHTTPError(404, f'log collection is disabled for task "{task}"')
    files = _log_files(root, task, log_type)
    if not files:
        raise NomadHTTPError(
            404, f'log entry for task "{task}" and log type "{log_type}" not found'
        )
    cursor = _start_cursor(files, origin, offset)
    response = await _open_stream(request, plain=plain)
    writer = _FrameWriter(response, root, plain=plain)
    await _stream(
        request,
        alloc["ID"],
        cursor,
        writer,
        follow=follow,
        rotations=lambda: _log_files(root, task, log_type),
    )
    await response.write_eof()
    return response


async def stream_file(request: web.Request) -> web.StreamResponse:
    alloc, root = _allocation(request)
    relative = _required_path(request)
    target = _existing_file(root, relative)
    origin, offset = _origin_and_offset(request)
    follow = query_bool(request, "follow", default=True)
    cursor = _start_cursor([target], origin, offset)
    response = await _open_stream(request, plain=False)
    writer = _FrameWriter(response, root, plain=False)
    await _stream(request, alloc["ID"], cursor, writer, follow=follow, rotations=None)
    await response.write_eof()
    return response


def _task_names(alloc: Obj) -> set[str]:
    names = set((alloc.get("TaskStates") or {}).keys())
    for group in (alloc.get("Job") or {}).get("TaskGroups") or []:
        if group.get("Name") == alloc.get("TaskGroup"):
            names.update(task.get("Name", "") for task in group.get("Tasks") or [])
    return names


def _log_config(alloc: Obj, task_name: str) -> Obj:
    for group in (alloc.get("Job") or {}).get("TaskGroups") or []:
        if group.get("Name") != alloc.get("TaskGroup"):
            continue
        for task in group.get("Tasks") or []:
            if task.get("Name") == task_name:
                config: Obj = task.get("LogConfig") or {}
                return config
    return {}


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/client/fs/logs/{alloc_id}", logs)
    app.router.add_get("/v1/client/fs/stream/{alloc_id}", stream_file)
    app.router.add_get("/v1/client/fs/cat/{alloc_id}", cat)
    app.router.add_get("/v1/client/fs/readat/{alloc_id}", readat)
    app.router.add_get("/v1/client/fs/ls/{alloc_id}", ls)
    app.router.add_get("/v1/client/fs/stat/{alloc_id}", stat)
