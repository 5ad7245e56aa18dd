"""The state store's persistence and event subscription, the allocation directory, job decoding
and path resolution: the pieces the agent runs for every step of a pipeline."""

from __future__ import annotations

import array
import asyncio
import fcntl
import json
import os
import stat
import struct
from pathlib import Path
from typing import Any

import pytest
from engine_support import batch_job, job_dead, running_engine, wait_until

from nomad_pipeline.devagent import jobspec
from nomad_pipeline.devagent.allocdir import build_alloc_dir, prepare_alloc_root
from nomad_pipeline.devagent.fs import real_path, resolve_in_alloc_dir
from nomad_pipeline.devagent.state import Change, Event, NomadHTTPError, StateStore, to_json


def test_decoded_job_shares_nothing_with_the_request() -> None:
    request: dict[str, Any] = {
        "ID": "j",
        "Type": "batch",
        "Meta": {"team": "a"},
        "TaskGroups": [
            {
                "Name": "g",
                "Tasks": [
                    {
                        "Name": "t",
                        "Driver": "raw_exec",
                        "Config": {"command": "/bin/echo", "args": ["one"]},
                        "Env": {"A": "1"},
                    }
                ],
            }
        ],
    }
    original = json.loads(json.dumps(request))
    job = jobspec.canonicalize(request, namespace="default")
    task = job["TaskGroups"][0]["Tasks"][0]
    task["Config"]["args"].append("two")
    task["Env"]["B"] = "2"
    job["Meta"]["team"] = "b"
    assert request == original


def test_alloc_dir_tree_is_built_and_rebuilt(tmp_path: Path) -> None:
    alloc_dir = tmp_path / "allocs" / "a1"
    build_alloc_dir(alloc_dir, ["main", "side"])
    build_alloc_dir(alloc_dir, ["main", "side"])  # a restarted allocation finds its tree
    for name in ("data", "logs", "tmp"):
        assert (alloc_dir / "alloc" / name).is_dir()
    for task in ("main", "side"):
        for name in ("local", "secrets", "private", "tmp"):
            assert (alloc_dir / task / name).is_dir()
        for name in ("secrets", "private"):
            assert stat.S_IMODE((alloc_dir / task / name).stat().st_mode) == 0o700


_FLAGS_SIZE = struct.calcsize("l") << 16
GET_FLAGS, SET_FLAGS, TOP_DIRECTORY = 0x80006601 | _FLAGS_SIZE, 0x40006602 | _FLAGS_SIZE, 0x20000


def inode_flags(path: Path) -> int | None:
    """``lsattr``'s flags of a directory, None where the file system has none."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = array.array("i", [0])
        fcntl.ioctl(fd, GET_FLAGS, flags)
        return flags[0]
    except OSError:
        return None
    finally:
        os.close(fd)


def can_mark_top_directories(path: Path) -> bool:
    path.mkdir()
    flags = inode_flags(path)
    if flags is None:
        return False
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, SET_FLAGS, array.array("i", [flags | TOP_DIRECTORY]))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def test_the_alloc_root_is_marked_as_the_top_of_directory_hierarchies(tmp_path: Path) -> None:
    alloc_root = tmp_path / "data" / "alloc"
    prepare_alloc_root(alloc_root)
    prepare_alloc_root(alloc_root)  # a restarted agent finds it
    assert alloc_root.is_dir()
    if can_mark_top_directories(tmp_path / "probe"):
        flags = inode_flags(alloc_root)
        assert flags is not None and flags & TOP_DIRECTORY


def test_alloc_dir_refuses_a_file_where_a_directory_belongs(tmp_path: Path) -> None:
    alloc_dir = tmp_path / "a1"
    (alloc_dir / "alloc").mkdir(parents=True)
    (alloc_dir / "alloc" / "logs").write_text("not a directory")
    with pytest.raises(FileExistsError):
        build_alloc_dir(alloc_dir, ["main"])


def test_real_path_resolves_as_pathlib_does(tmp_path: Path) -> None:
    (tmp_path / "real" / "logs").mkdir(parents=True)
    (tmp_path / "real" / "logs" / "out.0").write_text("x")
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "logs" / "escape").symlink_to("/etc")
    relative = Path(os.path.relpath(tmp_path / "real", Path.cwd()))
    cases = [
        tmp_path / "real",
        tmp_path / "linked" / "logs" / "out.0",
        tmp_path / "linked" / "logs" / ".." / "logs",
        tmp_path / "real" / "logs" / "escape",
        tmp_path / "linked" / "missing" / "file",
        relative / "logs",
    ]
    for path in cases:
        assert real_path(path) == path.resolve(), path


def test_a_sibling_with_the_same_prefix_is_outside_the_alloc_dir(tmp_path: Path) -> None:
    (tmp_path / "a1" / "alloc").mkdir(parents=True)
    (tmp_path / "a10").mkdir()
    root = (tmp_path / "a1").resolve()  # the file system API resolves the root first
    (root / "alloc" / "next").symlink_to(tmp_path / "a10")
    assert resolve_in_alloc_dir(root, "alloc") == root / "alloc"
    assert resolve_in_alloc_dir(root, "/") == root
    for relative in ("alloc/next", "../a10", "alloc/../../a10/x"):
        with pytest.raises(NomadHTTPError, match="Path escapes the alloc directory"):
            resolve_in_alloc_dir(root, relative)


def test_to_json_is_compact_json() -> None:
    value = {"a": [1, 2.5, None, True], "b": {"c": "é\ud800"}, "d": ""}
    assert to_json(value) == json.dumps(value, separators=(",", ":"))


async def test_rows_written_by_several_commits_keep_their_last_value(tmp_path: Path) -> None:
    state = StateStore(tmp_path)
    await state.open()
    job = {"v": 3}  # one object in two tables, as a job and its version row
    # Committed together, these commits reach the writer as one batch.
    await asyncio.gather(
        state.commit([Change("vars", "a", {"v": 1})]),
        state.commit([Change("vars", "a", {"v": 2}), Change("vars", "b", {"v": 1})]),
        state.commit([Change("vars", "b", None), Change("jobs", "j", job)]),
        state.commit([Change("job_versions", "j\x000", job)]),
    )
    index = state.index
    await state.close()

    reopened = StateStore(tmp_path)
    await reopened.open()
    try:
        assert reopened.get("vars", "a") == {"v": 2}
        assert reopened.get("vars", "b") is None
        assert reopened.get("jobs", "j") == {"v": 3}
        assert reopened.get("job_versions", "j\x000") == {"v": 3}
        assert reopened.index == index
    finally:
        await reopened.close()


def _event(key: str) -> Event:
    return Event("Job", "JobRegistered", key, "default", {"Job": {"ID": key}})


async def test_subscribers_get_every_waiting_batch_at_once() -> None:
    state = StateStore(None)
    await state.open()
    first = await state.commit([Change("jobs", "a", {"ID": "a"})], [_event("a")])
    stream = state.subscribe_many(0)
    backlog = await anext(stream)
    assert [batch.index for batch in backlog] == [first]
    # Three commits before the reader runs again: one hand-over, in commit order.
    indexes = [
        await state.commit([Change("jobs", key, {"ID": key})], [_event(key)]) for key in "bcd"
    ]
    waiting = await anext(stream)
    assert [batch.index for batch in waiting] == indexes
    assert [batch.events[0]["Key"] for batch in waiting] == ["b", "c", "d"]
    await stream.aclose()

    single = state.subscribe(0)
    assert [(await anext(single)).index for _ in range(4)] == [first, *indexes]
    await single.aclose()
    await state.close()


async def test_received_is_reported_with_the_task_setup(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        start = engine.state.index
        await engine.register_job("default", batch_job("setup"))
        await wait_until(engine, lambda: job_dead(engine, "setup"))
        reported: list[list[str]] = []
        stream = engine.state.subscribe(start)
        async for batch in stream:
            for event in batch.events:
                if event["Topic"] == "Allocation":
                    states = event["Payload"]["Allocation"]["TaskStates"] or {}
                    for task_state in states.values():
                        reported.append([e["Type"] for e in task_state["Events"]])
            if batch.index >= engine.state.index:
                break
        await stream.aclose()
        assert reported[0] == ["Received", "Task Setup"]
        assert reported[-1] == ["Received", "Task Setup", "Started", "Terminated"]
