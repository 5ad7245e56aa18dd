"""Run commands: run (--wait, --follow), cancel, rerun, logs."""

from __future__ import annotations

import argparse
import contextlib
import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from nomad_pipeline.cli.context import Context
from nomad_pipeline.cli.output import dig, flow_steps, kind_name, run_steps
from nomad_pipeline.errors import Invalid
from nomad_pipeline.resources.names import TERMINAL_PHASES

if TYPE_CHECKING:
    from nomad_pipeline.cli.client import ApiClient

RUNS = "runs"
LOG_STREAMS = ("stdout", "stderr")
# After a run ends, its log streams close once the controller has flushed the last lines;
# this bounds how long --follow waits for that before exiting anyway.
LOG_DRAIN_TIMEOUT = 10.0


def parse_variables(pairs: Sequence[str]) -> dict[str, str]:
    """``--var k=v`` pairs as strings; the controller coerces them to the declared types."""
    variables: dict[str, str] = {}
    for pair in pairs:
        name, separator, value = pair.partition("=")
        if not separator or not name:
            raise Invalid(f"--var {pair!r}: expected NAME=VALUE", field="--var")
        variables[name] = value
    return variables


async def run_command(ctx: Context, args: argparse.Namespace) -> int:
    async with ctx.api() as api:
        run_id = await api.start_run(ctx.namespace, args.flow, parse_variables(args.var))
        return await _report_started(ctx, api, args, run_id)


async def rerun_command(ctx: Context, args: argparse.Namespace) -> int:
    async with ctx.api() as api:
        run_id = await api.rerun(ctx.namespace, args.run, from_failed=args.from_failed)
        return await _report_started(ctx, api, args, run_id)


async def _report_started(
    ctx: Context, api: ApiClient, args: argparse.Namespace, run_id: str
) -> int:
    """Prints the new run's id; with ``--wait``/``--follow``, follows it: 0 only on success."""
    ctx.out(run_id)
    if not (args.wait or args.follow):
        return 0
    phase = await follow_run(ctx, api, ctx.namespace, run_id, logs=args.follow)
    return 0 if phase == "success" else 1


async def cancel_command(ctx: Context, args: argparse.Namespace) -> int:
    async with ctx.api() as api:
        await api.cancel_run(ctx.namespace, args.run)
    ctx.out(f"{kind_name('Run', args.run)} cancel requested")
    return 0


class ProgressPrinter:
    """Prints each step transition and run phase change once, in the order they are seen."""

    def __init__(self, ctx: Context, run_id: str) -> None:
        self.ctx = ctx
        self.run_id = run_id
        self.step_phases: dict[str, tuple[str, int]] = {}
        self.run_phase = ""

    def update(self, run: Mapping[str, Any]) -> None:
        """Prints what changed since the last update."""
        for step in run_steps(run):
            name = str(step.get("name"))
            phase = str(step.get("phase") or "pending")
            # A retry is a transition of its own: the same phase again on a later attempt.
            seen = (phase, max(1, int(step.get("attempts") or 0)))
            if self.step_phases.get(name) == seen:
                continue
            self.step_phases[name] = seen
            if phase == "pending":
                continue
            self.ctx.out(f"step {name}: {phase}{step_details(step)}")
        phase = str(dig(run, "status", "phase") or "pending")
        if phase != self.run_phase:
            self.run_phase = phase
            message = dig(run, "status", "message")
            detail = f": {message}" if message and phase != "success" else ""
            self.ctx.out(f"run {self.run_id}: {phase}{detail}")


def step_details(step: Mapping[str, Any]) -> str:
    parts: list[str] = []
    if (step.get("attempts") or 0) > 1:
        parts.append(f"attempt {step['attempts']}")
    if step.get("exit_code") is not None and step.get("phase") in ("success", "failed"):
        parts.append(f"exit code {step['exit_code']}")
    text = f" ({', '.join(parts)})" if parts else ""
    message = step.get("message")
    if message and step.get("phase") not in ("running", "success"):
        text += f": {message}"
    return text


def run_step_names(run: Mapping[str, Any]) -> list[str]:
    """The run's steps in flow order: from its status, else from its flow snapshot."""
    steps = run_steps(run) or flow_steps(dig(run, "spec", "flow_spec"))
    return [str(step.get("name")) for step in steps]


async def follow_run(
    ctx: Context, api: ApiClient, namespace: str, run_id: str, *, logs: bool
) -> str:
    """Watches the run until its phase is final, printing transitions (and, with ``logs``,
    every step's output as it is written); returns the final phase."""
    # Loaded by main's asyncio.run already; imported here, not above, so --help never loads it.
    import asyncio

    printer = ProgressPrinter(ctx, run_id)
    run = await api.get_object(RUNS, namespace, run_id)
    async with asyncio.TaskGroup() as group:
        # Every step's log is followed from the start: the server holds a pending step's
        # stream open until the step ends, so output shows as soon as it is written.
        log_tasks = [
            group.create_task(
                print_step_log(
                    ctx,
                    api,
                    namespace=namespace,
                    run_id=run_id,
                    step=step,
                    stream=stream,
                    prefix=True,
                ),
                name=f"logs {run_id}/{step}/{stream}",
            )
            for step in (run_step_names(run) if logs else [])
            for stream in LOG_STREAMS
        ]
        printer.update(run)
        if printer.run_phase not in TERMINAL_PHASES:
            version = str(dig(run, "metadata", "resource_version") or "0")
            # Closed on leaving, so the watch connection ends with the wait.
            updates = api.object_updates(RUNS, namespace, run_id, resource_version=version)
            async with contextlib.aclosing(updates):
                async for update in updates:
                    printer.update(update)
                    if printer.run_phase in TERMINAL_PHASES:
                        break
        if log_tasks:
            _, pending = await asyncio.wait(log_tasks, timeout=LOG_DRAIN_TIMEOUT)
            for task in pending:
                task.cancel()
    return printer.run_phase


# --- logs -----------------------------------------------------------------------------------


async def print_step_log(
    ctx: Context,
    api: ApiClient,
    *,
    namespace: str,
    run_id: str,
    step: str,
    stream: str,
    prefix: bool,
    follow: bool = True,
) -> None:
    """One step's stdout (to our stdout) or stderr (to our stderr), line by line."""
    target = ctx.out if stream == "stdout" else ctx.err
    label = f"[{step}] " if prefix else ""
    async for line in api.step_log_lines(namespace, run_id, step, stream, follow=follow):
        target(label + line)


async def logs_command(ctx: Context, args: argparse.Namespace) -> int:
    stream = "stderr" if args.stderr else "stdout"
    async with ctx.api() as api:
        if args.step is not None:
            steps = [args.step]
        else:
            steps = run_step_names(await api.get_object(RUNS, ctx.namespace, args.run))
        step_log = functools.partial(
            print_step_log,
            ctx,
            api,
            namespace=ctx.namespace,
            run_id=args.run,
            stream=stream,
            prefix=len(steps) > 1,
        )
        if args.follow:
            # Loaded by main's asyncio.run already; imported here so --help never loads it.
            import asyncio

            # Steps of a DAG run in parallel: follow them all at once, each line labelled.
            async with asyncio.TaskGroup() as group:
                for step in steps:
                    group.create_task(step_log(step=step), name=f"logs {args.run}/{step}/{stream}")
        else:
            for step in steps:
                await step_log(step=step, follow=False)
    return 0
