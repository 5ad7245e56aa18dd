"""``nomad-pipeline-runner``: runs an inline flow's steps inside a Nomad allocation.

Configuration comes from the environment the run reconciler sets on the runner's task:

- ``NP_CONTROLLER_ADDR`` (``http://host:port``), ``NP_RUN_NAMESPACE``, ``NP_RUN_NAME``,
  ``NP_RUN_TOKEN`` (required);
- ``NP_WORK_DIR``: where steps run (default: the current directory, the task's working
  directory under Nomad);
- ``NP_RUNNER_CONNECT_TIMEOUT`` (seconds to keep trying to fetch the plan, default 600),
  ``NP_RUNNER_FLUSH_TIMEOUT`` (seconds to keep trying to deliver the last reports, default 600),
  ``NP_RUNNER_STOP_FLUSH_TIMEOUT`` (the same after SIGTERM, default 3: Nomad's kill_timeout is
  short), ``NP_RUNNER_KILL_GRACE`` (SIGTERM to SIGKILL for a step's processes, default 2);
- ``NOMAD_ALLOC_DIR`` (set by Nomad): reports that pile up while the controller is unreachable
  spill there beyond 8 MiB.

Exit codes: 0 every step succeeded or was skipped; 1 a step failed or was cancelled; 2 the
runner could not do its job (bad configuration, plan unavailable, reports undeliverable).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nomad_pipeline.errors import Invalid, NomadPipelineError
from nomad_pipeline.runner.agent import AgentSettings, RunnerAgent
from nomad_pipeline.runner.protocol import RunnerPlan
from nomad_pipeline.runner.reporting import ControllerClient, Reporter, retrying

logger = logging.getLogger("nomad_pipeline.runner")

EXIT_SUCCESS = 0
EXIT_STEP_FAILED = 1
EXIT_RUNNER_ERROR = 2


@dataclass(frozen=True, slots=True)
class RunnerConfig:
    controller_addr: str
    namespace: str
    run: str
    token: str
    work_dir: Path
    spill_dir: Path
    connect_timeout: float = 600.0
    flush_timeout: float = 600.0
    stop_flush_timeout: float = 3.0
    kill_grace: float = 2.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> RunnerConfig:
        """Read the configuration; Invalid names the variable that is missing or wrong."""

        def required(name: str) -> str:
            value = environ.get(name, "").strip()
            if not value:
                raise Invalid(f"environment variable {name} is required", field=name)
            return value

        def seconds(name: str, default: float) -> float:
            text = environ.get(name)
            if text is None or not text.strip():
                return default
            try:
                value = float(text)
            except ValueError:
                raise Invalid(
                    f"environment variable {name} must be a number of seconds, got {text!r}",
                    field=name,
                ) from None
            if value < 0:
                raise Invalid(f"environment variable {name} must not be negative", field=name)
            return value

        addr = required("NP_CONTROLLER_ADDR")
        if not addr.startswith(("http://", "https://")):
            raise Invalid(
                f"environment variable NP_CONTROLLER_ADDR must be an http(s) URL, got {addr!r}",
                field="NP_CONTROLLER_ADDR",
            )
        work_dir = Path(environ.get("NP_WORK_DIR") or os.getcwd())
        if not work_dir.is_dir():
            raise Invalid(f"NP_WORK_DIR {str(work_dir)!r} is not a directory", field="NP_WORK_DIR")
        alloc_dir = environ.get("NOMAD_ALLOC_DIR")
        spill_dir = Path(alloc_dir or tempfile.gettempdir()) / "nomad-pipeline-runner"
        return cls(
            controller_addr=addr,
            namespace=required("NP_RUN_NAMESPACE"),
            run=required("NP_RUN_NAME"),
            token=required("NP_RUN_TOKEN"),
            work_dir=work_dir,
            spill_dir=spill_dir,
            connect_timeout=seconds("NP_RUNNER_CONNECT_TIMEOUT", 600.0),
            flush_timeout=seconds("NP_RUNNER_FLUSH_TIMEOUT", 600.0),
            stop_flush_timeout=seconds("NP_RUNNER_STOP_FLUSH_TIMEOUT", 3.0),
            kill_grace=seconds("NP_RUNNER_KILL_GRACE", 2.0),
        )


async def run_runner(
    config: RunnerConfig, environ: Mapping[str, str], stop: asyncio.Event | None = None
) -> int:
    """Fetch the plan, execute it, deliver every report; the process exit code."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    try:
        async with ControllerClient(
            config.controller_addr, config.namespace, config.run, config.token
        ) as client:
            plan = await _until_stopped(_fetch_plan(client, config.connect_timeout), stop)
            if plan is None:
                logger.warning("stopped before the plan arrived")
                return EXIT_STEP_FAILED
            reporter = Reporter(
                client,
                last_seq=plan.last_seq,
                spill_path=config.spill_dir / f"{config.namespace}-{config.run}.events",
            )
            return await _execute(config, plan, reporter, environ, stop)
    except NomadPipelineError as error:
        logger.error("runner failed", extra={"reason": error.reason, "error": error.message})
        print(f"error: {error.reason}: {error.message}", file=sys.stderr)
        return EXIT_RUNNER_ERROR
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signum)


async def _fetch_plan(client: ControllerClient, connect_timeout: float) -> RunnerPlan:
    async for attempt in retrying(max_delay=connect_timeout):
        with attempt:
            return await client.fetch_plan()
    raise AssertionError("tenacity re-raises the last error when it gives up")


async def _execute(
    config: RunnerConfig,
    plan: RunnerPlan,
    reporter: Reporter,
    environ: Mapping[str, str],
    stop: asyncio.Event,
) -> int:
    sender = asyncio.create_task(reporter.run(), name="runner reports")
    # A run cancelled on the controller, or reports it refuses for good, stop the steps too.
    cancel_watch = asyncio.create_task(reporter.cancelled.wait(), name="runner cancel watch")
    cancel_watch.add_done_callback(lambda _: stop.set())
    sender.add_done_callback(lambda _: stop.set())
    agent = RunnerAgent(
        plan,
        reporter,
        AgentSettings(work_dir=config.work_dir, kill_grace=config.kill_grace),
        environ,
    )
    try:
        await agent.run(stop)
        flushed = asyncio.create_task(reporter.flush(), name="runner final flush")
        stopping = asyncio.create_task(stop.wait(), name="runner stop during flush")
        # The whole flush budget while nobody asks us to stop; once asked (Nomad's kill gives
        # only its kill_timeout), the short budget.
        done, _ = await asyncio.wait(
            {flushed, sender, stopping},
            timeout=config.flush_timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if stopping in done and flushed not in done and sender not in done:
            done, _ = await asyncio.wait(
                {flushed, sender},
                timeout=config.stop_flush_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        for task in (flushed, stopping):
            task.cancel()
        if sender in done:
            sender.result()
        if flushed not in done:
            logger.error(
                "reports not delivered before the flush timeout",
                extra={"undelivered_events": len(reporter.outbox)},
            )
            return EXIT_RUNNER_ERROR
    finally:
        for task in (sender, cancel_watch):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return EXIT_SUCCESS if agent.succeeded else EXIT_STEP_FAILED


async def _until_stopped(
    fetch: Coroutine[Any, Any, RunnerPlan], stop: asyncio.Event
) -> RunnerPlan | None:
    """The plan, or None when ``stop`` is set first (a SIGTERM while the controller is away)."""
    fetching = asyncio.create_task(fetch, name="runner plan fetch")
    stopping = asyncio.create_task(stop.wait(), name="runner stop")
    try:
        await asyncio.wait({fetching, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not fetching.done():
            fetching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await fetching
    if fetching.cancelled():
        return None
    return fetching.result()


def main() -> int:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        config = RunnerConfig.from_env(os.environ)
    except Invalid as error:
        print(f"error: {error.reason}: {error.message}", file=sys.stderr)
        return EXIT_RUNNER_ERROR
    return asyncio.run(run_runner(config, os.environ))
