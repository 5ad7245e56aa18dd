"""Executing a run's plan: steps in order or as a DAG, conditions, timeouts, retries, stop.

Decisions follow the run reconciler's rules (``reconcilers/planning.py``), restated here because
the runner may import nothing of the controller:
- a step **without** a condition starts once every step in its ``after`` ended ``success`` or
  ``skipped``, and is skipped as soon as one of them ended ``failed`` or ``cancelled``;
- a step **with** a condition is evaluated once every step in its ``after`` is terminal, whatever
  the phases, so failure handlers run; true starts it, false skips it, an error fails it.
Independent steps run at the same time. A step's ``timeout_seconds`` bounds each attempt; a
failed attempt is retried ``retries`` times with doubling backoff. Steps share one working
directory, so files one step writes are there for the next. Scripts and their environment are
rendered as ``runner/rendering.py`` describes (values reach the shell only as variables).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from nomad_pipeline.errors import Invalid
from nomad_pipeline.resources.expressions import evaluation_context, parse_expression
from nomad_pipeline.runner.process import OutputStream, default_shell, run_script
from nomad_pipeline.runner.protocol import PlanStep, RunnerPlan, StepOutcome
from nomad_pipeline.runner.rendering import render_step, run_environment
from nomad_pipeline.runner.reporting import Reporter

logger = logging.getLogger(__name__)

_SUCCEEDED = frozenset({"success", "skipped"})
_NOT_SUCCEEDED = frozenset({"failed", "cancelled"})
TERMINAL = _SUCCEEDED | _NOT_SUCCEEDED

# Environment the steps must not see: the run's token would let a script forge reports.
HIDDEN_FROM_STEPS = frozenset({"NP_RUN_TOKEN"})


@dataclass(frozen=True, slots=True)
class AgentSettings:
    work_dir: Path
    shell: tuple[str, ...] = tuple(default_shell())
    # How long a step's process group gets between SIGTERM and SIGKILL.
    kill_grace: float = 2.0


class RunnerAgent:
    def __init__(
        self,
        plan: RunnerPlan,
        reporter: Reporter,
        settings: AgentSettings,
        base_env: Mapping[str, str],
    ) -> None:
        self._plan = plan
        self._reporter = reporter
        self._settings = settings
        self._base_env = {k: v for k, v in base_env.items() if k not in HIDDEN_FROM_STEPS}
        self._run_env = run_environment(plan.variables, plan.run_context, plan.trigger_context)
        self._steps = {step.name: step for step in plan.steps}
        self.outcomes: dict[str, StepOutcome] = dict(plan.completed)

    @property
    def succeeded(self) -> bool:
        """Every step ended success or skipped."""
        return all(
            self.outcomes.get(name, StepOutcome(phase="cancelled")).phase in _SUCCEEDED
            for name in self._steps
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Run the plan to its end, or until ``stop`` is set (running steps are then killed)."""
        running: dict[str, asyncio.Task[None]] = {}
        stopper = asyncio.create_task(stop.wait(), name="runner stop")
        try:
            while True:
                for step in await self._decide(running):
                    running[step.name] = asyncio.create_task(
                        self._run_step(step), name=f"step {step.name}"
                    )
                if not running:
                    break
                done, _ = await asyncio.wait(
                    {stopper, *running.values()}, return_when=asyncio.FIRST_COMPLETED
                )
                for name, task in list(running.items()):
                    if task in done:
                        del running[name]
                        task.result()
                if stopper in done:
                    break
        finally:
            stopper.cancel()
            for task in running.values():
                task.cancel()
            for task in running.values():
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for name in self._steps:
            if name not in self.outcomes:
                never_started = StepOutcome(
                    phase="cancelled", message="the runner was stopped before the step started"
                )
                await self._finish(name, never_started)

    async def _decide(self, running: Mapping[str, asyncio.Task[None]]) -> list[PlanStep]:
        """Skip or fail what can be decided (to a fixed point) and return the steps to start."""
        to_start: list[PlanStep] = []
        starting: set[str] = set()
        changed = True
        while changed:
            changed = False
            for step in self._plan.steps:
                if step.name in self.outcomes or step.name in running or step.name in starting:
                    continue
                phases = [self._phase(name) for name in step.after]
                if step.condition is None:
                    if any(phase in _NOT_SUCCEEDED for phase in phases):
                        await self._skip(step.name, "a step it depends on did not succeed")
                        changed = True
                    elif all(phase in _SUCCEEDED for phase in phases):
                        to_start.append(step)
                        starting.add(step.name)
                    continue
                if not all(phase in TERMINAL for phase in phases):
                    continue
                try:
                    holds = parse_expression(step.condition).is_true(self._context())
                except Exception as error:  # any evaluation error fails this step, not the runner
                    await self._finish(
                        step.name,
                        StepOutcome(
                            phase="failed", message=f"condition {step.condition!r} failed: {error}"
                        ),
                    )
                    changed = True
                    continue
                if holds:
                    to_start.append(step)
                    starting.add(step.name)
                else:
                    await self._skip(step.name, f"condition {step.condition!r} is false")
                    changed = True
        return to_start

    def _phase(self, name: str) -> str:
        outcome = self.outcomes.get(name)
        return "pending" if outcome is None else outcome.phase

    def _context(self) -> dict[str, object]:
        steps: dict[str, dict[str, object]] = {}
        for name in self._steps:
            outcome = self.outcomes.get(name)
            steps[name] = (
                {"status": "pending", "exit_code": None, "attempts": 0, "message": ""}
                if outcome is None
                else {
                    "status": outcome.phase,
                    "exit_code": outcome.exit_code,
                    "attempts": outcome.attempts,
                    "message": outcome.message,
                }
            )
        return evaluation_context(
            variables=self._plan.variables,
            steps=steps,
            run=self._plan.run_context,
            trigger=self._plan.trigger_context,
        )

    async def _run_step(self, step: PlanStep) -> None:
        attempts = step.retries + 1
        try:
            script, step_env = render_step(step.run, step.env, self._context())
        except Invalid as error:
            message = f"cannot render the step: {error.message}"
            await self._finish(step.name, StepOutcome(phase="failed", message=message))
            return
        env = {**self._base_env, **self._run_env, **step_env, "NP_STEP_NAME": step.name}

        async def output(stream: OutputStream, text: str) -> None:
            await self._reporter.emit(step.name, "log", stream=stream, data=text)

        attempt = 0
        try:
            for attempt in range(1, attempts + 1):
                await self._reporter.emit(step.name, "started", attempt=attempt)
                outcome = await run_script(
                    script,
                    env={**env, "NP_STEP_ATTEMPT": str(attempt)},
                    cwd=self._settings.work_dir,
                    time_limit=step.timeout_seconds,
                    output=output,
                    shell=list(self._settings.shell),
                    kill_grace=self._settings.kill_grace,
                )
                if outcome.succeeded:
                    success = StepOutcome(phase="success", exit_code=0, attempts=attempt)
                    await self._finish(step.name, success)
                    return
                message = outcome.describe()
                if outcome.timed_out:
                    message = f"timed out after {step.timeout_seconds:g}s"
                if attempt == attempts:
                    if attempts > 1:
                        message = f"{message} (attempt {attempt} of {attempts})"
                    failure = StepOutcome(
                        phase="failed",
                        exit_code=outcome.exit_code,
                        attempts=attempt,
                        message=message,
                    )
                    await self._finish(step.name, failure)
                    return
                delay = min(
                    step.retry_backoff_seconds * 2 ** (attempt - 1),
                    step.retry_backoff_max_seconds,
                )
                await output(
                    "stderr",
                    f"[nomad-pipeline-runner] attempt {attempt} of {attempts} {message}; "
                    f"retrying in {delay:g}s\n",
                )
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            cancelled = StepOutcome(
                phase="cancelled", attempts=attempt, message="cancelled: the runner was stopped"
            )
            await self._finish(step.name, cancelled)
            raise

    async def _skip(self, name: str, message: str) -> None:
        self.outcomes[name] = StepOutcome(phase="skipped", message=message)
        await self._reporter.emit(name, "skipped", message=message)

    async def _finish(self, name: str, outcome: StepOutcome) -> None:
        self.outcomes[name] = outcome
        logger.info(
            "step finished",
            extra={"step": name, "phase": outcome.phase, "detail": outcome.message},
        )
        await self._reporter.emit(
            name,
            "finished",
            phase=outcome.phase,
            exit_code=outcome.exit_code,
            message=outcome.message or None,
        )
