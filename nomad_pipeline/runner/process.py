"""One attempt of one step: a shell process in its own process group, its output streamed.

Scripts run as ``bash -c SCRIPT`` when bash is installed (the seed's scripts use ``source``),
else ``/bin/sh -c SCRIPT``, exactly as written: no ``-e`` is added, so a script's exit code is
that of its last command, as in the seed. The script is an argument, never a file or stdin, and
variable values only reach it through the environment, so no value can become shell syntax.

The process leads a new session, so a timeout or a cancellation kills the whole group (the
script and everything it started): SIGTERM first, SIGKILL after ``kill_grace`` seconds.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import shutil
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

OutputStream = Literal["stdout", "stderr"]
OutputSink = Callable[[OutputStream, str], Awaitable[None]]

READ_SIZE = 64 * 1024
# After the script exits, how long its output pipes may stay open (held by a process it left
# running in the background) before we stop reading them.
_PIPE_DRAIN_SECONDS = 2.0


def default_shell() -> list[str]:
    bash = shutil.which("bash")
    return [bash, "-c"] if bash else ["/bin/sh", "-c"]


@dataclass(frozen=True, slots=True)
class Outcome:
    exit_code: int | None
    timed_out: bool = False
    cancelled: bool = False

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.cancelled

    def describe(self) -> str:
        if self.cancelled:
            return "cancelled: the runner was stopped"
        if self.timed_out:
            return "timed out"
        if self.exit_code is not None and self.exit_code < 0:
            return f"killed by signal {signal.Signals(-self.exit_code).name}"
        return f"exited with code {self.exit_code}"


async def run_script(
    script: str,
    *,
    env: Mapping[str, str],
    cwd: Path,
    time_limit: float | None,
    output: OutputSink,
    shell: list[str],
    kill_grace: float,
) -> Outcome:
    """Run ``script`` to its end or for ``time_limit`` seconds; cancelling kills its group."""
    process = await asyncio.create_subprocess_exec(
        *shell,
        script,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
        env=dict(env),
        start_new_session=True,
    )
    assert process.stdout is not None and process.stderr is not None
    readers = [
        asyncio.create_task(_pump(process.stdout, "stdout", output), name="step stdout"),
        asyncio.create_task(_pump(process.stderr, "stderr", output), name="step stderr"),
    ]
    timed_out = False
    try:
        try:
            async with asyncio.timeout(time_limit):
                await process.wait()
        except TimeoutError:
            timed_out = True
            await _kill_group(process, kill_grace)
    except asyncio.CancelledError:
        await asyncio.shield(_kill_group(process, kill_grace))
        await _finish_readers(readers)
        raise
    await _finish_readers(readers)
    return Outcome(exit_code=process.returncode, timed_out=timed_out)


async def _pump(stream: asyncio.StreamReader, name: OutputStream, output: OutputSink) -> None:
    # Incremental decoding keeps a character split across two reads whole.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while chunk := await stream.read(READ_SIZE):
        text = decoder.decode(chunk)
        if text:
            await output(name, text)
    tail = decoder.decode(b"", final=True)
    if tail:
        await output(name, tail)


async def _finish_readers(readers: list[asyncio.Task[None]]) -> None:
    """Let the readers hand out what is buffered; give up on pipes a leftover child holds."""
    _, still_reading = await asyncio.wait(readers, timeout=_PIPE_DRAIN_SECONDS)
    for reader in still_reading:
        reader.cancel()
    for reader in readers:
        with contextlib.suppress(asyncio.CancelledError):
            await reader


async def _kill_group(process: asyncio.subprocess.Process, grace: float) -> None:
    _signal_group(process.pid, signal.SIGTERM)
    try:
        async with asyncio.timeout(grace):
            await process.wait()
    except TimeoutError:
        pass
    # Children of the script may ignore SIGTERM or outlive it: the group goes either way.
    _signal_group(process.pid, signal.SIGKILL)
    await process.wait()


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)
