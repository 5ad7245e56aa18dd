"""``get -w`` as a real subprocess: a row per change until it is terminated."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from cli_harness import Controller, start_controller

from nomad_pipeline.store.memory import MemoryStore

LINE_DEADLINE = 30.0

NAMESPACE = """\
apiVersion: nomad-pipeline.io/v1
kind: Namespace
metadata: {name: team-a}
spec: {description: team a}
"""


def flow(name: str, label: str) -> str:
    return f"""\
apiVersion: nomad-pipeline.io/v1
kind: Flow
metadata: {{name: {name}, namespace: team-a, labels: {{team: {label}}}}}
spec:
  inline:
    steps:
      - {{name: build, run: "echo build"}}
"""


async def read_line(stream: asyncio.StreamReader) -> str:
    line = await asyncio.wait_for(stream.readline(), timeout=LINE_DEADLINE)
    assert line, "the watch ended before printing the expected row"
    return line.decode()


async def test_get_watch_prints_new_rows_for_changes(
    controller: Controller, tmp_path: Path
) -> None:
    await controller.cli("apply", "-f", "-", stdin=NAMESPACE)
    await controller.cli("apply", "-f", "-", stdin=flow("build-test", "a"))
    watcher = await controller.start_cli("get", "flows", "-n", "team-a", "-w", "-o", "wide")
    assert watcher.stdout is not None
    try:
        header = await read_line(watcher.stdout)
        assert header.split()[:2] == ["NAME", "TYPE"]
        first = await read_line(watcher.stdout)
        assert first.split()[0] == "build-test"
        assert "team=a" in first

        changed = await controller.cli("apply", "-f", "-", stdin=flow("build-test", "b"))
        assert changed.out == "flow.nomad-pipeline.io/build-test configured\n"
        modified = await read_line(watcher.stdout)
        assert modified.split()[0] == "build-test"
        assert "team=b" in modified

        await controller.cli("apply", "-f", "-", stdin=flow("deploy", "c"))
        added = await read_line(watcher.stdout)
        assert added.split()[0] == "deploy"
        # Rows printed later keep the header's columns.
        assert added.index("inline") == header.index("TYPE")

        # Ctrl-C ends the watch quietly.
        watcher.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(watcher.communicate(), LINE_DEADLINE)
        assert watcher.returncode == 130
        assert err == b""
    finally:
        if watcher.returncode is None:
            watcher.terminate()
            await watcher.wait()


async def test_get_one_object_watch_recovers_from_an_expired_version(tmp_path: Path) -> None:
    # The store keeps two events: the object's own version expires after a few other writes,
    # so the watch starts with 410 Gone, re-lists and goes on.
    async for controller in start_controller(tmp_path, store=MemoryStore(history_size=2)):
        await controller.cli("apply", "-f", "-", stdin=NAMESPACE)
        await controller.cli("apply", "-f", "-", stdin=flow("build-test", "a"))
        for index in range(4):
            await controller.cli("apply", "-f", "-", stdin=flow(f"other-{index}", "x"))
        watcher = await controller.start_cli(
            "get", "flow", "build-test", "-n", "team-a", "-w", "-o", "name"
        )
        assert watcher.stdout is not None
        try:
            assert await read_line(watcher.stdout) == "flow.nomad-pipeline.io/build-test\n"
            await controller.cli("apply", "-f", "-", stdin=flow("other-4", "x"))
            await controller.cli("apply", "-f", "-", stdin=flow("build-test", "b"))
            # Only the watched object's change prints, not the other flow's.
            assert await read_line(watcher.stdout) == "flow.nomad-pipeline.io/build-test\n"
            assert watcher.returncode is None
        finally:
            watcher.terminate()
            await watcher.wait()
