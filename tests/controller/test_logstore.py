"""The controller's log store: seed layout, path safety, live followers, concurrent writers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from nomad_pipeline.controller.logstore import LogStore
from nomad_pipeline.errors import Invalid


async def collect(iterator: object) -> bytes:
    chunks = [chunk async for chunk in iterator]  # type: ignore[attr-defined]
    return b"".join(chunks)


async def test_append_writes_the_seed_layout(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "logs")
    await store.append("default", "01jrun", "build", "stdout", b"hello\n")
    await store.append("default", "01jrun", "build", "stderr", b"oops\n")
    await store.append("default", "01jrun", "build", "stdout", b"world\n")

    step_logs = tmp_path / "logs" / "runs" / "default" / "01jrun" / "build" / "logs"
    assert (step_logs / "stdout.log").read_bytes() == b"hello\nworld\n"
    assert (step_logs / "stderr.log").read_bytes() == b"oops\n"
    assert await store.read("default", "01jrun", "build", "stdout") == b"hello\nworld\n"
    assert await store.read("default", "01jrun", "build", "stdout", offset=6) == b"world\n"
    assert await store.read("default", "01jrun", "other", "stdout") == b""


@pytest.mark.parametrize(
    ("namespace", "run", "step", "field"),
    [
        ("..", "run", "step", "namespace"),
        ("default", "..", "step", "run id"),
        ("default", "run", "..", "step id"),
        ("default", "run", ".", "step id"),
        ("default", "a/b", "step", "run id"),
        ("default", "run", "../../etc", "step id"),
        ("default", "run", "/etc/passwd", "step id"),
        ("default", "run", "", "step id"),
        ("default", "run", ".hidden", "step id"),
        ("default", "run", "step\x00", "step id"),
        ("de fault", "run", "step", "namespace"),
        ("default", "run", "x" * 300, "step id"),
    ],
)
async def test_ids_that_could_leave_the_root_are_refused(
    tmp_path: Path, namespace: str, run: str, step: str, field: str
) -> None:
    store = LogStore(tmp_path / "logs")
    with pytest.raises(Invalid) as error:
        await store.append(namespace, run, step, "stdout", b"x")
    assert error.value.field == field
    with pytest.raises(Invalid):
        await store.read(namespace, run, step, "stdout")
    assert not any(tmp_path.rglob("*.log"))


@pytest.mark.parametrize("good", ["run_build", "01JABCDEF", "a", "v1.2-x"])
async def test_ordinary_ids_are_accepted(tmp_path: Path, good: str) -> None:
    store = LogStore(tmp_path / "logs")
    await store.append("default", good, good, "stdout", b"ok")
    assert await store.read("default", good, good, "stdout") == b"ok"


async def test_bad_stream_is_refused(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "logs")
    with pytest.raises(Invalid) as error:
        await store.append("default", "run", "step", "stdin", b"x")  # type: ignore[arg-type]
    assert error.value.field == "type"


async def test_a_planted_symlink_cannot_lead_outside(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    runs = tmp_path / "logs" / "runs" / "default"
    runs.mkdir(parents=True)
    (runs / "evil").symlink_to(outside, target_is_directory=True)
    store = LogStore(tmp_path / "logs")

    with pytest.raises(Invalid, match="outside the log directory"):
        await store.append("default", "evil", "step", "stdout", b"x")
    with pytest.raises(Invalid, match="outside the log directory"):
        await store.read("default", "evil", "step", "stdout")
    assert list(outside.iterdir()) == []


async def test_a_symlinked_log_file_is_not_written_through(tmp_path: Path) -> None:
    target = tmp_path / "target.txt"
    target.write_bytes(b"")
    logs = tmp_path / "logs" / "runs" / "default" / "run" / "step" / "logs"
    logs.mkdir(parents=True)
    (logs / "stdout.log").symlink_to(target)
    store = LogStore(tmp_path / "logs")

    with pytest.raises(OSError):
        await store.append("default", "run", "step", "stdout", b"x")
    assert target.read_bytes() == b""


async def test_follow_is_woken_by_append_and_ends_when_the_step_finishes(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "logs")
    await store.append("ns", "run", "step", "stdout", b"before\n")
    received: list[bytes] = []
    got_chunk = asyncio.Event()

    async def follower() -> None:
        async for chunk in store.follow("ns", "run", "step", "stdout", until=lambda: False):
            received.append(chunk)
            got_chunk.set()

    task = asyncio.create_task(follower(), name="follower")
    async with asyncio.timeout(5):
        await got_chunk.wait()
    assert received == [b"before\n"]

    latencies = []
    for number in range(20):
        got_chunk.clear()
        started = time.perf_counter()
        await store.append("ns", "run", "step", "stdout", f"line {number}\n".encode())
        async with asyncio.timeout(5):
            await got_chunk.wait()
        latencies.append(time.perf_counter() - started)
    assert max(latencies) < 0.25

    await store.append("ns", "run", "step", "stdout", b"last\n")
    await store.mark_step_finished("ns", "run", "step")
    async with asyncio.timeout(5):
        await task
    assert b"".join(received).endswith(b"line 19\nlast\n")
    assert b"".join(received) == await store.read("ns", "run", "step", "stdout")


async def test_follow_with_an_event_drains_and_ends_when_it_is_set(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "logs")
    ended = asyncio.Event()
    follower = asyncio.create_task(
        collect(store.follow("ns", "run", "step", "stderr", offset=0, until=ended)),
        name="follower",
    )
    await store.append("ns", "run", "step", "stderr", b"a\n")
    await store.append("ns", "run", "step", "stderr", b"b\n")
    ended.set()
    async with asyncio.timeout(5):
        assert await follower == b"a\nb\n"


async def test_follow_of_a_finished_step_returns_what_is_there(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "logs")
    await store.append("ns", "run", "step", "stdout", b"0123456789")
    await store.mark_step_finished("ns", "run", "step")
    async with asyncio.timeout(5):
        assert await collect(store.follow("ns", "run", "step", "stdout", until=lambda: False)) == (
            b"0123456789"
        )
        assert await collect(
            store.follow("ns", "run", "step", "stdout", offset=4, until=lambda: True)
        ) == (b"456789")


async def test_concurrent_writers_never_interleave_within_an_append(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "logs")

    async def writer(name: str) -> None:
        for number in range(50):
            await store.append("ns", "run", "step", "stdout", f"{name}-{number:03}\n".encode() * 3)

    follower = asyncio.create_task(
        collect(store.follow("ns", "run", "step", "stdout", until=lambda: False)), name="f"
    )
    async with asyncio.TaskGroup() as group:
        for name in ("a", "b", "c", "d"):
            group.create_task(writer(name), name=f"writer {name}")
    await store.mark_step_finished("ns", "run", "step")
    async with asyncio.timeout(5):
        followed = await follower

    content = await store.read("ns", "run", "step", "stdout")
    assert followed == content
    lines = content.decode().splitlines()
    assert len(lines) == 4 * 50 * 3
    # Each append's three copies of one line stay together.
    for index in range(0, len(lines), 3):
        assert lines[index] == lines[index + 1] == lines[index + 2]
    for name in ("a", "b", "c", "d"):
        own = [line for line in lines[::3] if line.startswith(f"{name}-")]
        assert own == [f"{name}-{number:03}" for number in range(50)]


async def test_delete_run_removes_logs_and_ends_followers(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "logs")
    await store.append("ns", "run", "step", "stdout", b"x")
    await store.append("ns", "other", "step", "stdout", b"y")
    started = asyncio.Event()

    async def follower() -> bytes:
        received = b""
        async for chunk in store.follow("ns", "run", "step", "stdout", until=lambda: False):
            received += chunk
            started.set()
        return received

    task = asyncio.create_task(follower(), name="follower")
    async with asyncio.timeout(5):
        await started.wait()
    await store.delete_run("ns", "run")
    async with asyncio.timeout(5):
        assert await task == b"x"
    assert not (tmp_path / "logs" / "runs" / "ns" / "run").exists()
    assert await store.read("ns", "other", "step", "stdout") == b"y"
    assert not await store.exists("ns", "run")
    await store.delete_run("ns", "run")


async def test_stores_over_one_root_share_their_followers(tmp_path: Path) -> None:
    api_side = LogStore(tmp_path / "logs")
    reconciler_side = LogStore(tmp_path / "logs")
    ended = asyncio.Event()
    follower = asyncio.create_task(
        collect(api_side.follow("ns", "run", "step", "stdout", until=ended)), name="follower"
    )
    await reconciler_side.append("ns", "run", "step", "stdout", b"copied from nomad\n")
    await reconciler_side.mark_step_finished("ns", "run", "step")
    async with asyncio.timeout(5):
        assert await follower == b"copied from nomad\n"
    assert api_side.step_finished("ns", "run", "step")
