"""Which steps of a run may start, which are skipped, and the run's phase (pure, no I/O).

Order:
- Without any ``needs`` in the flow, steps run in the order written: a step's predecessors are
  all the steps before it.
- With ``needs`` on any step, the flow is a DAG: a step's predecessors are its ``needs`` and,
  transitively, theirs; independent steps run in parallel. A step without ``needs`` in such a flow
  has no predecessors and starts at once.

Readiness:
- A step **without** a condition runs when every predecessor ended ``success`` or ``skipped``; it is
  skipped as soon as any predecessor ended ``failed`` or ``cancelled`` (a failure skips everything
  downstream of it, through skipped steps too, because predecessors are transitive).
- A step **with** a condition is evaluated once every predecessor is terminal, whatever their
  phases, so a failure handler (``steps.build.status == "failed"``) runs after a failure. True runs
  it, false skips it. A condition that cannot be evaluated fails that step with the reason.

Run phase, once every step is terminal:
- ``cancelled`` if any step was cancelled;
- ``failed`` if any step failed. A failure handler that ran does not turn the failure into a
  success: the run still reports that something failed, the handler only reacted to it;
- ``success`` otherwise (every step succeeded or was skipped).
Before that the run is ``running`` (or ``pending`` when nothing has started yet).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from nomad_pipeline.resources.expressions import parse_expression

StepPhase = Literal["pending", "running", "success", "failed", "skipped", "cancelled"]
RunPhase = Literal["pending", "running", "success", "failed", "cancelled", "skipped"]

TERMINAL_STEP_PHASES: frozenset[str] = frozenset({"success", "failed", "skipped", "cancelled"})
TERMINAL_RUN_PHASES: frozenset[str] = frozenset({"success", "failed", "cancelled", "skipped"})
_SATISFIED = frozenset({"success", "skipped"})

ConditionEvaluator = Callable[[str, Mapping[str, Any]], bool]


@dataclass(frozen=True, slots=True)
class PlanStep:
    name: str
    condition: str | None = None
    needs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StepState:
    phase: StepPhase
    exit_code: int | None = None


@dataclass(slots=True)
class Plan:
    """What to do next: steps to start, steps to skip (with why), and the run's phase."""

    start: list[str] = field(default_factory=list)
    skip: dict[str, str] = field(default_factory=dict)
    # Steps whose condition could not be evaluated: they fail with this message.
    fail: dict[str, str] = field(default_factory=dict)
    phase: RunPhase = "pending"

    @property
    def finished(self) -> bool:
        return self.phase in TERMINAL_RUN_PHASES


def predecessors(steps: Sequence[PlanStep]) -> dict[str, frozenset[str]]:
    """Each step's transitive predecessors (all earlier steps, or the ``needs`` closure)."""
    if not any(step.needs for step in steps):
        earlier: list[str] = []
        result: dict[str, frozenset[str]] = {}
        for step in steps:
            result[step.name] = frozenset(earlier)
            earlier.append(step.name)
        return result
    direct = {step.name: step.needs for step in steps}
    closure: dict[str, frozenset[str]] = {}

    def visit(name: str, path: tuple[str, ...]) -> frozenset[str]:
        if name in closure:
            return closure[name]
        if name in path:
            cycle = " -> ".join((*path[path.index(name) :], name))
            raise ValueError(f"steps form a cycle through needs: {cycle}")
        if name not in direct:
            raise ValueError(f"step {path[-1]!r} needs unknown step {name!r}")
        found: set[str] = set()
        for need in direct[name]:
            found.add(need)
            found |= visit(need, (*path, name))
        closure[name] = frozenset(found)
        return closure[name]

    for step in steps:
        visit(step.name, ())
    return {step.name: closure[step.name] for step in steps}


def evaluate_condition(condition: str, context: Mapping[str, Any]) -> bool:
    """The sandboxed condition language of ``resources.expressions``."""
    return parse_expression(condition).is_true(context)


def with_steps(context: Mapping[str, Any], states: Mapping[str, StepState]) -> dict[str, Any]:
    """``context`` (``resources.expressions.evaluation_context``) plus the steps, under
    ``steps.<n>`` and the seed's ``specifications.<n>`` and ``inline.steps.<n>``."""
    view = {
        name: {"status": state.phase, "exit_code": state.exit_code}
        for name, state in states.items()
    }
    return {**context, "steps": view, "specifications": view, "inline": {"steps": view}}


def run_phase(steps: Sequence[PlanStep], states: Mapping[str, StepState]) -> RunPhase:
    phases = [states[s.name].phase if s.name in states else "pending" for s in steps]
    if all(phase in TERMINAL_STEP_PHASES for phase in phases):
        if "cancelled" in phases:
            return "cancelled"
        if "failed" in phases:
            return "failed"
        return "success"
    if all(phase == "pending" for phase in phases):
        return "pending"
    return "running"


def plan(
    steps: Sequence[PlanStep],
    states: Mapping[str, StepState],
    context: Mapping[str, Any],
    evaluate: ConditionEvaluator = evaluate_condition,
) -> Plan:
    """Decide the next moves for a run whose steps are in ``states`` (absent = pending).

    Decisions are made to a fixed point: a step skipped in this pass can make its dependents
    skippable in the same pass, so one reconcile settles a whole chain of skips.
    """
    before = predecessors(steps)
    current: dict[str, StepState] = dict(states)
    result = Plan()
    changed = True
    while changed:
        changed = False
        for step in steps:
            state = current.get(step.name)
            if state is not None and state.phase != "pending":
                continue
            if step.name in result.start:
                continue
            upstream = [current.get(n, StepState("pending")).phase for n in before[step.name]]
            if not all(phase in TERMINAL_STEP_PHASES for phase in upstream):
                if step.condition is None and any(p in ("failed", "cancelled") for p in upstream):
                    reason = "a step it depends on did not succeed"
                    result.skip[step.name] = reason
                    current[step.name] = StepState("skipped")
                    changed = True
                continue
            if step.condition is None:
                if all(phase in _SATISFIED for phase in upstream):
                    result.start.append(step.name)
                else:
                    result.skip[step.name] = "a step it depends on did not succeed"
                    current[step.name] = StepState("skipped")
                    changed = True
                continue
            view_states = {s.name: current.get(s.name, StepState("pending")) for s in steps}
            try:
                holds = evaluate(step.condition, with_steps(context, view_states))
            except Exception as exc:  # any evaluation error is this step's failure, not a crash
                result.fail[step.name] = f"condition {step.condition!r} failed: {exc}"
                current[step.name] = StepState("failed")
                changed = True
                continue
            if holds:
                result.start.append(step.name)
            else:
                result.skip[step.name] = f"condition {step.condition!r} is false"
                current[step.name] = StepState("skipped")
                changed = True
    for name in result.start:
        current[name] = StepState("running")
    result.phase = run_phase(steps, current)
    return result
