"""The client side: one AllocRunner per allocation, one TaskRunner per task (driver raw_exec).

Follows Nomad's ``client/allocrunner``: lifecycle ordering (prestart, main, poststart,
poststop, sidecars), the restart tracker (``taskrunner/restarts``), the kill sequence (KillSignal,
KillTimeout, SIGKILL to the whole process group) and task events capped at the last 10.

Runners never touch the state store. They mutate their own TaskState dicts and call ``report``;
the engine coalesces reports into client-update commits. Everything is event-driven: processes
are awaited, pipes are read by protocols, and waits use events, never polling.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import functools
import logging
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from nomad_pipeline.devagent import artifacts, templates
from nomad_pipeline.devagent.allocdir import (
    build_alloc_dir,
    interpolate_config,
    interpolation_lookup,
    merged_meta,
    resolve_in_task,
    task_environment,
)
from nomad_pipeline.devagent.jobspec import format_duration

Obj = dict[str, Any]

logger = logging.getLogger(__name__)

MAX_TASK_EVENTS = 10
WITHIN_POLICY = "Restart within policy"
NO_RESTARTS = "Policy allows no restarts"
UNRECOVERABLE = "Error was unrecoverable"
# How long to wait for the log pipes to drain once a task's process group is gone; only a
# grandchild that left the group can hold them open longer.
PIPE_DRAIN_TIMEOUT = 2.0


def rfc3339(ns: int) -> str:
    """RFC3339Nano in UTC, as Go marshals ``time.Time`` (trailing zeros of the fraction cut)."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    stamp = _utc_second(seconds)
    if fraction:
        stamp += "." + f"{fraction:09d}".rstrip("0")
    return stamp + "Z"


@functools.lru_cache(maxsize=64)
def _utc_second(seconds: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` of a unix second. Memoized: every task event and state change
    formats a time, nearly all of them within the same few seconds, and building a datetime
    for each costs more than formatting the rest of the event."""
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")


def new_task_state() -> Obj:
    return {
        "State": "pending",
        "Failed": False,
        "Restarts": 0,
        "LastRestart": None,
        "StartedAt": None,
        "FinishedAt": None,
        "Events": [],
        "TaskHandle": None,
    }


def task_event(
    event_type: str,
    display: str,
    *,
    message: str = "",
    details: dict[str, str] | None = None,
    **fields: Any,
) -> Obj:
    """A TaskEvent with its deprecated top-level fields zeroed, as Nomad still sends them."""
    event: Obj = {
        "Type": event_type,
        "Time": time.time_ns(),
        "Message": message,
        "DisplayMessage": display,
        "Details": details or {},
        "FailsTask": False,
        "RestartReason": "",
        "SetupError": "",
        "DriverError": "",
        "ExitCode": 0,
        "Signal": 0,
        "KillTimeout": 0,
        "KillError": "",
        "KillReason": "",
        "StartDelay": 0,
        "DownloadError": "",
        "ValidationError": "",
        "DiskLimit": 0,
        "FailedSibling": "",
        "VaultError": "",
        "TaskSignalReason": "",
        "TaskSignal": "",
        "DriverMessage": "",
        "GenericSource": "",
    }
    event.update(fields)
    return event


class RestartTracker:
    """``client/allocrunner/taskrunner/restarts.RestartTracker`` on the monotonic clock."""

    def __init__(self, policy: Obj, job_type: str, lifecycle: Obj | None) -> None:
        self._attempts = int(policy["Attempts"])
        self._interval = int(policy["Interval"])
        self._delay = int(policy["Delay"])
        self._mode = str(policy["Mode"])
        on_success = job_type not in ("batch", "sysbatch")
        if lifecycle is not None:
            on_success = bool(lifecycle.get("Sidecar"))
        self._on_success = on_success
        self._count = 0
        self._start = time.monotonic_ns()

    def next(self, *, success: bool, unrecoverable: bool = False) -> tuple[str, int, str]:
        """``(decision, delay_ns, reason)`` with decision terminated|restart|fail."""
        now = time.monotonic_ns()
        if now > self._start + self._interval:
            self._count = 0
            self._start = now
        if unrecoverable:
            return "fail", 0, UNRECOVERABLE
        if self._attempts == 0:
            if success and not self._on_success:
                return "terminated", 0, ""
            return "fail", 0, NO_RESTARTS
        if success and not self._on_success:
            return "terminated", 0, ""
        self._count += 1
        if self._count > self._attempts:
            reason = (
                f"Exceeded allowed attempts {self._attempts} in interval "
                f'{format_duration(self._interval)} and mode is "{self._mode}"'
            )
            if self._mode == "fail":
                return "fail", 0, reason
            return "restart", max(self._start + self._interval - now, 0), reason
        jitter = int(random.random() * self._delay * 0.25) if self._delay else 0
        return "restart", self._delay + jitter, WITHIN_POLICY


class RotatingLog:
    """``alloc/logs/<task>.<stream>.<n>`` rotated at MaxFileSizeMB, keeping MaxFiles files."""

    def __init__(
        self, logs_dir: Path, task: str, stream: str, log_config: Obj, on_write: Callable[[], None]
    ) -> None:
        self._base = f"{task}.{stream}."
        self._dir = logs_dir
        self._max_size = int(log_config["MaxFileSizeMB"]) * 1024 * 1024
        self._max_files = int(log_config["MaxFiles"])
        self._on_write = on_write
        existing = [
            int(name[len(self._base) :])
            for name in os.listdir(logs_dir)
            if name.startswith(self._base) and name[len(self._base) :].isdigit()
        ]
        self._number = max(existing, default=0)
        self._fd = -1
        self._size = 0
        self._open()

    def _open(self) -> None:
        path = self._dir / f"{self._base}{self._number}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._size = os.fstat(self._fd).st_size

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            room = self._max_size - self._size
            if room <= 0:
                self._rotate()
                continue
            written = os.write(self._fd, view[:room])
            self._size += written
            view = view[written:]
        self._on_write()

    def _rotate(self) -> None:
        os.close(self._fd)
        self._number += 1
        self._open()
        stale = self._number - self._max_files
        if stale >= 0:
            with contextlib.suppress(FileNotFoundError):
                (self._dir / f"{self._base}{stale}").unlink()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _PipeSink(asyncio.Protocol):
    def __init__(self, log: RotatingLog | None, done: asyncio.Future[None]) -> None:
        self._log = log
        self._done = done

    def data_received(self, data: bytes) -> None:
        if self._log is not None:
            self._log.write(data)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_result(None)


class VariableSource(Protocol):
    """Nomad variables as templates read them (``nomadVar``, ``nomadVarList``)."""

    def read_variable(self, namespace: str, path: str) -> dict[str, Any] | None:
        """The variable's Items, or None when it does not exist."""
        ...

    def list_variables(self, namespace: str, prefix: str) -> list[Obj]:
        """Metadata of the variables under ``prefix``."""
        ...

    def variables_index(self) -> int: ...

    async def wait_variables(self, after_index: int) -> None:
        """Return once any variable changed after ``after_index``."""
        ...


class ChildProcess:
    """A task's process, reaped when its pidfd becomes readable.

    asyncio's default child watcher (Python 3.11) parks one thread per child; with hundreds
    of concurrent tasks a pidfd in the event loop is far cheaper. Kernels without pidfd
    (before 5.3) fall back to one waiting thread per child, as the default watcher does.
    """

    def __init__(self, popen: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self._popen = popen
        self._loop = loop
        self.pid = popen.pid
        self._exited: asyncio.Future[int] = loop.create_future()
        try:
            self._pidfd = os.pidfd_open(popen.pid)
        except (OSError, AttributeError):
            self._pidfd = -1
            threading.Thread(
                target=self._wait_in_thread, name=f"devagent-wait-{popen.pid}", daemon=True
            ).start()
        else:
            loop.add_reader(self._pidfd, self._reap)

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    def _reap(self) -> None:
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        # The child has exited, so this wait returns at once.
        self._exited.set_result(self._popen.wait())

    def _wait_in_thread(self) -> None:
        returncode = self._popen.wait()
        self._loop.call_soon_threadsafe(self._exited.set_result, returncode)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)


@dataclass(slots=True)
class _Exit:
    exit_code: int
    signal: int


class _CommandNotFoundError(Exception):
    pass


class _SetupError(Exception):
    """A recoverable failure before the process starts (artifacts, templates)."""

    def __init__(self, event: Obj) -> None:
        super().__init__(event["DisplayMessage"])
        self.event = event


class TaskRunner:
    def __init__(self, owner: AllocRunner, task: Obj) -> None:
        self.owner = owner
        self.task = task
        self.name: str = task["Name"]
        self.lifecycle: Obj | None = task.get("Lifecycle")
        self.state = new_task_state()
        self.task_dir = owner.alloc_dir / self.name
        self._tracker = RestartTracker(
            task["RestartPolicy"], owner.alloc["Job"]["Type"], self.lifecycle
        )
        self._kill_requested = asyncio.Event()
        self._exited = asyncio.Event()
        self.finished = asyncio.Event()
        self._process: ChildProcess | None = None
        self._artifacts_done = False
        self._logs: tuple[RotatingLog, RotatingLog] | None = None
        self._pipes_done: list[asyncio.Future[None]] = []
        self._setup: asyncio.Task[dict[str, str]] | None = None
        self._terminating = False
        # Whether run() was ever scheduled: a task that never launched dies without a process.
        self.launched = False

    # -- state ---------------------------------------------------------------------------

    def emit(self, event: Obj, **state: Any) -> None:
        events: list[Obj] = self.state["Events"]
        events.append(event)
        del events[:-MAX_TASK_EVENTS]
        self.state.update(state)
        self.owner.task_changed()

    @property
    def dead(self) -> bool:
        return bool(self.state["State"] == "dead")

    @property
    def failed(self) -> bool:
        return bool(self.state["Failed"])

    @property
    def running(self) -> bool:
        return bool(self.state["State"] == "running")

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        except Exception as exc:  # a bug or a host failure must end the task visibly, not hang
            logger.exception("task runner failed", extra={"task": self.name})
            self.fail_setup(f"task runner failed: {exc}")
        finally:
            if self._logs is not None:
                for log in self._logs:
                    log.close()
            self.finished.set()
            self.owner.task_changed()

    async def _run(self) -> None:
        while True:
            if self._kill_requested.is_set():
                self._mark_dead()
                return
            # Setup (artifact downloads, templates) runs as its own task so a kill can cut it.
            self._setup = asyncio.create_task(self._prepare(), name=f"devagent-setup-{self.name}")
            try:
                env = await self._setup
            except _SetupError as exc:
                if not await self._after_failure(exc.event, success=False):
                    return
                continue
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
                self._mark_dead()
                return
            finally:
                self._setup = None
            started = await self._start(env)
            if not started:
                return
            if self._kill_requested.is_set():
                # The kill came while the process was being spawned: it gets the sequence now.
                outcome, _ = await asyncio.gather(self._wait(), self._terminate())
            else:
                outcome = await self._wait()
            terminated = task_event(
                "Terminated",
                _exit_display(outcome),
                details={
                    "exit_code": str(outcome.exit_code),
                    "signal": str(outcome.signal),
                    "oom_killed": "false",
                },
                ExitCode=outcome.exit_code,
                Signal=outcome.signal,
            )
            if self._kill_requested.is_set():
                self.emit(terminated)
                self.emit(
                    task_event("Killed", "Task successfully killed"),
                    State="dead",
                    FinishedAt=rfc3339(time.time_ns()),
                )
                return
            success = outcome.exit_code == 0 and outcome.signal == 0
            if not await self._after_failure(terminated, success=success):
                return

    async def _after_failure(self, event: Obj, *, success: bool) -> bool:
        """Record ``event`` and apply the restart policy; False when the task is now dead."""
        self.emit(event)
        decision, delay, reason = self._tracker.next(success=success)
        if decision == "terminated":
            self.emit_state(State="dead", FinishedAt=rfc3339(time.time_ns()))
            return False
        if decision == "fail":
            self._fail(reason)
            return False
        shown = f"Task restarting in {format_duration(delay)}"
        if reason != WITHIN_POLICY:
            shown = f"{reason} - {shown}"
        restarting = task_event(
            "Restarting",
            shown,
            details={"restart_reason": reason, "start_delay": str(delay)},
            RestartReason=reason,
            StartDelay=delay,
        )
        # As Nomad's task runner: a Restarting event counts the restart when it is recorded.
        self.emit(
            restarting,
            State="pending",
            Restarts=self.state["Restarts"] + 1,
            LastRestart=rfc3339(restarting["Time"]),
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay / 1e9):
                await self._kill_requested.wait()
        if self._kill_requested.is_set():
            self._mark_dead()
            return False
        return True

    def fail_setup(self, message: str) -> None:
        """The task cannot run at all (the allocation directory could not be built...)."""
        self._emit_failed(
            task_event(
                "Setup Failure",
                message,
                details={"setup_error": message, "fails_task": "true"},
                SetupError=message,
                FailsTask=True,
            )
        )

    def emit_state(self, **state: Any) -> None:
        self.state.update(state)
        self.owner.task_changed()

    def _fail(self, reason: str) -> None:
        self._emit_failed(
            task_event(
                "Not Restarting",
                reason,
                details={"restart_reason": reason, "fails_task": "true"},
                RestartReason=reason,
                FailsTask=True,
            )
        )

    def _emit_failed(self, event: Obj) -> None:
        """Record ``event``, the reason the task is over, and leave the task dead and failed."""
        self.emit(event, State="dead", Failed=True, FinishedAt=rfc3339(time.time_ns()))

    def _mark_dead(self) -> None:
        """Dead without a process to kill: stopped before starting or between restarts."""
        self.emit_state(
            State="dead",
            FinishedAt=rfc3339(time.time_ns()) if self.state["StartedAt"] else None,
        )

    # -- setup ---------------------------------------------------------------------------

    async def _prepare(self) -> dict[str, str]:
        owner = self.owner
        env = task_environment(
            alloc=owner.alloc,
            group=owner.group,
            task=self.task,
            alloc_dir=owner.alloc_dir,
            node=owner.node,
            host_env=owner.host_env,
        )
        if self.task.get("Artifacts") and not self._artifacts_done:
            self.emit(
                task_event(
                    "Downloading Artifacts",
                    "Client is downloading artifacts",
                    message="Client is downloading artifacts",
                )
            )
            for artifact in self.task["Artifacts"]:
                try:
                    await artifacts.fetch(artifact, self.task_dir)
                except artifacts.ArtifactError as exc:
                    raise _SetupError(
                        task_event(
                            "Failed Artifact Download",
                            str(exc),
                            details={"download_error": str(exc), "fails_task": "false"},
                            DownloadError=str(exc),
                        )
                    ) from exc
            self._artifacts_done = True
        payload = owner.alloc["Job"].get("Payload")
        dispatch = self.task.get("DispatchPayload")
        if dispatch and dispatch.get("File"):
            data = base64.b64decode(payload) if payload else b""
            target = resolve_in_task(self.task_dir, f"local/{dispatch['File']}")
            await asyncio.to_thread(_write_file, target, data, 0o644)
        for template in self.task.get("Templates") or []:
            try:
                env.update(await self._render(template, env))
            except (templates.TemplateError, OSError, ValueError) as exc:
                message = f"Template failed: {exc}"
                raise _SetupError(
                    task_event(
                        "Task hook failed",
                        message,
                        details={"message": message},
                        SetupError=message,
                    )
                ) from exc
        return env

    async def _render(self, template: Obj, env: dict[str, str]) -> dict[str, str]:
        if template.get("EmbeddedTmpl"):
            source = str(template["EmbeddedTmpl"])
        else:
            path = resolve_in_task(self.task_dir, str(template["SourcePath"]))
            source = await asyncio.to_thread(path.read_text)
        variables = self.owner.variables
        namespace = str(self.owner.alloc["Namespace"])
        data = templates.TemplateData(
            env=env,
            read_variable=lambda path: variables.read_variable(namespace, path),
            list_variables=lambda prefix: variables.list_variables(namespace, prefix),
        )
        reported: set[str] = set()
        while True:
            seen = variables.variables_index()
            try:
                text = templates.render(
                    source,
                    data,
                    left=template.get("LeftDelim") or "{{",
                    right=template.get("RightDelim") or "}}",
                )
                break
            except templates.VariableMissing as missing:
                # As consul-template: the task waits, pending, until the variable exists.
                if missing.path not in reported:
                    reported.add(missing.path)
                    shown = f"Missing: nomad.var.block({missing.path}@{namespace}.global)"
                    self.emit(task_event("Template", shown, message=shown))
                await variables.wait_variables(seen)
        target = resolve_in_task(self.task_dir, str(template["DestPath"]))
        await asyncio.to_thread(_write_file, target, text.encode(), int(template["Perms"], 8))
        return templates.parse_env_file(text) if template.get("Envvars") else {}

    # -- process -------------------------------------------------------------------------

    def _resolve_command(self, command: str, env: dict[str, str]) -> str | None:
        """Nomad's ``lookupBin``: task ``local/``, the task directory, then the PATH."""
        if os.path.isabs(command):
            return command  # a missing binary fails the exec with a clear error
        for candidate in (self.task_dir / "local" / command, self.task_dir / command):
            if candidate.exists():
                return str(candidate)
        return shutil.which(command, path=env.get("PATH"))

    def _spawn(
        self,
        command: str,
        args: list[str],
        work_dir: str,
        env: dict[str, str],
        output: tuple[int, int],
    ) -> subprocess.Popen[bytes]:
        """Find the binary and start it in its own session (blocking; runs off the loop)."""
        binary = self._resolve_command(command, env)
        if binary is None:
            raise _CommandNotFoundError(f"file {command} not found under path {self.task_dir}")
        return subprocess.Popen(
            [binary, *args],
            cwd=work_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output[0],
            stderr=output[1],
            start_new_session=True,
        )

    async def _start(self, env: dict[str, str]) -> bool:
        owner = self.owner
        lookup = interpolation_lookup(
            env, merged_meta(owner.alloc["Job"], owner.group, self.task), owner.node
        )
        config = interpolate_config(self.task.get("Config") or {}, lookup)
        command = str(config.get("command") or "")
        args = [str(a) for a in config.get("args") or []]
        work_dir = str(config.get("work_dir") or self.task_dir)
        if self._logs is None and not self.task["LogConfig"].get("Disabled"):
            self._logs = await asyncio.to_thread(self.open_logs)
        self._exited.clear()
        self._terminating = False
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        try:
            # Spawning off the loop: finding and exec'ing a binary on a busy disk takes
            # milliseconds, and close_fds (the default) keeps other tasks' pipes out of it.
            popen = await asyncio.to_thread(
                self._spawn, command, args, work_dir, env, (out_write, err_write)
            )
            self._process = ChildProcess(popen, asyncio.get_running_loop())
        except _CommandNotFoundError as exc:
            for fd in (out_read, err_read):
                os.close(fd)
            self._driver_failure(str(exc))
            return False
        except OSError as exc:
            for fd in (out_read, err_read):
                os.close(fd)
            self._driver_failure(f"failed to launch command with executor: {exc}")
            return False
        finally:
            os.close(out_write)
            os.close(err_write)
        logs: tuple[RotatingLog | None, RotatingLog | None] = self._logs or (None, None)
        self._pipes_done = [
            await _read_pipe(fd, log) for fd, log in zip((out_read, err_read), logs, strict=True)
        ]
        started = task_event("Started", "Task started by client")
        # StartedAt moves with every (re)start, as Nomad records each transition to running.
        self.emit(started, State="running", StartedAt=rfc3339(started["Time"]))
        return True

    def preopen_logs(self) -> None:
        """Open the log files ahead of the first start (blocking; called off the loop)."""
        if self._logs is None and not self.task["LogConfig"].get("Disabled"):
            self._logs = self.open_logs()

    def open_logs(self) -> tuple[RotatingLog, RotatingLog]:
        """Open the task's log files, continuing the newest rotated file; blocking."""
        logs_dir = self.owner.alloc_dir / "alloc" / "logs"
        config = self.task["LogConfig"]
        notify = self.owner.log_written
        return (
            RotatingLog(logs_dir, self.name, "stdout", config, notify),
            RotatingLog(logs_dir, self.name, "stderr", config, notify),
        )

    def _driver_failure(self, message: str) -> None:
        self.emit(
            task_event(
                "Driver Failure",
                message,
                details={"driver_error": message},
                DriverError=message,
            )
        )
        _, _, reason = self._tracker.next(success=False, unrecoverable=True)
        self._fail(reason)

    async def _wait(self) -> _Exit:
        process = self._process
        assert process is not None
        returncode = await process.wait()
        # raw_exec's executor tears down the task's whole process tree when the task exits.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(PIPE_DRAIN_TIMEOUT):
                await asyncio.gather(*self._pipes_done)
        self._process = None
        self._exited.set()
        if returncode < 0:
            return _Exit(exit_code=128 - returncode, signal=-returncode)
        return _Exit(exit_code=returncode, signal=0)

    async def kill(self, reason: Obj | None = None) -> None:
        """Stop the task: KillSignal to its process group, SIGKILL after KillTimeout."""
        if self.finished.is_set():
            return
        if not self.launched:
            self.emit_state(State="dead")
            self.finished.set()
            return
        if reason is not None and not self.dead:
            self.emit(dict(reason))  # one event object per task: states are copied apart
        self._kill_requested.set()
        if self._setup is not None:
            self._setup.cancel()
        await self._terminate()
        await self.finished.wait()

    async def _terminate(self) -> None:
        """The kill sequence for a running process; a no-op without one or when under way."""
        process = self._process
        if process is None or process.returncode is not None or self._terminating:
            return
        self._terminating = True
        name = self.task.get("KillSignal") or "SIGINT"
        kill_signal = signal.Signals[name]
        timeout = int(self.task["KillTimeout"])
        shown = format_duration(timeout)
        self.emit(
            task_event(
                "Killing",
                f"Sent interrupt. Waiting {shown} before force killing",
                details={"kill_timeout": shown},
                KillTimeout=timeout,
            )
        )
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, kill_signal)
        try:
            async with asyncio.timeout(timeout / 1e9):
                await self._exited.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)


async def _read_pipe(fd: int, log: RotatingLog | None) -> asyncio.Future[None]:
    """Copy a task's output pipe into its log; the future completes at EOF."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    sink = _PipeSink(log, done)
    await loop.connect_read_pipe(lambda: sink, os.fdopen(fd, "rb", buffering=0))
    return done


def _write_file(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


def _exit_display(outcome: _Exit) -> str:
    text = f"Exit Code: {outcome.exit_code}"
    if outcome.signal:
        text += f", Signal: {outcome.signal}"
    return text


class AllocRunner:
    """Runs one allocation's tasks in lifecycle order until they are all dead."""

    def __init__(
        self,
        *,
        alloc: Obj,
        alloc_dir: Path,
        node: Obj,
        host_env: dict[str, str],
        variables: VariableSource,
        report: Callable[[str, dict[str, Obj]], None],
        log_written: Callable[[str], None],
    ) -> None:
        self.alloc = alloc
        self.alloc_id: str = alloc["ID"]
        self.alloc_dir = alloc_dir
        self.node = node
        self.host_env = host_env
        self.variables = variables
        self.group: Obj = next(
            g for g in alloc["Job"]["TaskGroups"] if g["Name"] == alloc["TaskGroup"]
        )
        self._report = report
        self._log_written = log_written
        self.tasks = {t["Name"]: TaskRunner(self, t) for t in self.group["Tasks"]}
        self._changed = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._silent = False
        # While set, changes are recorded but not reported; see ``_run``.
        self._holding_reports = False
        self._task_handles: list[asyncio.Task[None]] = []

    def _prepare_dirs(self) -> None:
        """Build the allocation directory and open every task's logs in one thread hop."""
        build_alloc_dir(self.alloc_dir, list(self.tasks))
        for runner in self.tasks.values():
            runner.preopen_logs()

    def task_states(self) -> dict[str, Obj]:
        return {name: runner.state for name, runner in self.tasks.items()}

    def task_changed(self) -> None:
        self._changed.set()
        if not self._silent and not self._holding_reports:
            self._report(self.alloc_id, self.task_states())

    def log_written(self) -> None:
        self._log_written(self.alloc_id)

    def request_stop(self, *, shutdown: bool = False) -> None:
        """Kill the allocation's tasks; on agent ``shutdown`` nothing more is reported."""
        if shutdown:
            self._silent = True
        self._stop_requested.set()
        self._changed.set()

    def _hook(self, runner: TaskRunner) -> str:
        return str((runner.lifecycle or {}).get("Hook") or "main")

    def _sidecar(self, runner: TaskRunner) -> bool:
        return bool((runner.lifecycle or {}).get("Sidecar"))

    def _start(self, runner: TaskRunner) -> None:
        runner.launched = True
        self._task_handles.append(
            asyncio.create_task(
                runner.run(), name=f"devagent-task-{self.alloc_id[:8]}-{runner.name}"
            )
        )

    async def _until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            self._changed.clear()
            await self._changed.wait()

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            for runner in self.tasks.values():
                if not runner.finished.is_set():
                    await runner.kill()
            if self._task_handles:
                await asyncio.gather(*self._task_handles, return_exceptions=True)

    async def _run(self) -> None:
        # "Received" is reported together with what follows the directory setup: one client
        # update (a commit, its events, its disk write) instead of two, milliseconds apart.
        # Nomad's client batches its allocation updates the same way.
        self._holding_reports = True
        setup_error: OSError | None = None
        try:
            for runner in self.tasks.values():
                runner.emit(task_event("Received", "Task received by client"))
            await asyncio.to_thread(self._prepare_dirs)
        except OSError as exc:
            setup_error = exc
        finally:
            self._holding_reports = False
        if setup_error is not None:
            for runner in self.tasks.values():
                runner.fail_setup(f"failed to build task directories: {setup_error}")
            return
        for runner in self.tasks.values():
            runner.emit(
                task_event(
                    "Task Setup", "Building Task Directory", message="Building Task Directory"
                )
            )
        by_hook: dict[str, list[TaskRunner]] = {
            "prestart": [],
            "main": [],
            "poststart": [],
            "poststop": [],
        }
        for runner in self.tasks.values():
            by_hook[self._hook(runner)].append(runner)
        stopping = self._stop_requested.is_set

        def any_failed() -> bool:
            return any(r.failed for r in self.tasks.values())

        for runner in by_hook["prestart"]:
            self._start(runner)
        blocking = [r for r in by_hook["prestart"] if not self._sidecar(r)]
        await self._until(lambda: stopping() or any_failed() or all(r.dead for r in blocking))
        if not stopping() and not any_failed():
            for runner in by_hook["main"]:
                self._start(runner)
            mains = by_hook["main"]
            await self._until(
                lambda: stopping() or any_failed() or all(r.running or r.dead for r in mains)
            )
            if not stopping() and not any_failed():
                for runner in by_hook["poststart"]:
                    self._start(runner)
            leader = next((r for r in mains if r.task.get("Leader")), None)
            await self._until(
                lambda: (
                    stopping()
                    or any_failed()
                    or all(r.dead for r in mains)
                    or (leader is not None and leader.dead)
                )
            )
        await self._stop_tasks(by_hook)
        if not self._silent:
            for runner in by_hook["poststop"]:
                self._start(runner)
            await self._until(lambda: self._silent or all(r.dead for r in by_hook["poststop"]))

    async def _stop_tasks(self, by_hook: dict[str, list[TaskRunner]]) -> None:
        """Kill what still runs: the leader, then main tasks, then sidecars and poststart."""
        failed = next((r for r in self.tasks.values() if r.failed), None)
        mains = by_hook["main"]
        leader = next((r for r in mains if r.task.get("Leader")), None)
        if failed is not None:
            reason: Obj | None = task_event(
                "Sibling Task Failed",
                f'Task\'s sibling "{failed.name}" failed',
                details={"failed_sibling": failed.name},
                FailedSibling=failed.name,
            )
        elif self._stop_requested.is_set():
            reason = None
        elif leader is not None and leader.dead:
            reason = task_event("Leader Task Dead", "Leader Task in Group dead")
        else:
            reason = task_event("Main Tasks Dead", "Main tasks in the group died")
        waves = [
            [leader] if leader is not None else [],
            [r for r in mains if r is not leader],
            by_hook["prestart"] + by_hook["poststart"],
        ]
        for wave in waves:
            alive = [r for r in wave if not r.dead and not r.finished.is_set()]
            await asyncio.gather(*(r.kill(reason if r.launched else None) for r in alive))
