"""Deciding a specification step's outcome from what Nomad reports (pure, no I/O).

The rules are Nomad's own (nomad-api.md §2.8, §2.9, §4, §5.5):

- A job whose ``Stop`` is set was stopped by us (cancel or timeout): **cancelled**.
- A job that is still ``pending`` behind an evaluation with ``FailedTGAllocs`` can never be placed
  as things stand (missing driver, exhausted resources): **failed**, with Nomad's reason. Holding
  such a step would leave the run stuck behind a blocked evaluation forever.
- Only allocations of the registered ``JobVersion`` count; a replaced allocation (one with
  ``NextAllocation``) is history, not an outcome.
- Once every counted allocation is terminal and the job is ``dead``: all ``complete`` with
  ``DesiredStatus == run`` is **success**; any ``failed`` (or ``lost``) with no follow-up is
  **failed**, with the exit code of the task's last ``Terminated`` event and Nomad's message;
  ``complete`` with ``DesiredStatus == stop`` is **cancelled**.
- Anything else is still **running** (an allocation exists) or **pending** (none yet).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

NomadObject = Mapping[str, Any]

OutcomePhase = Literal["pending", "running", "success", "failed", "cancelled"]
TERMINAL_OUTCOMES: frozenset[OutcomePhase] = frozenset({"success", "failed", "cancelled"})

_TERMINAL_CLIENT_STATUSES = frozenset({"complete", "failed", "lost"})


@dataclass(frozen=True, slots=True)
class StepOutcome:
    phase: OutcomePhase
    message: str = ""
    exit_code: int | None = None
    alloc_id: str | None = None

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL_OUTCOMES


def placement_failure(evaluation: NomadObject | None) -> str | None:
    """Nomad's reason why an evaluation could not place its allocations, or None if it did.

    Example: ``placement failed for group "step": missing drivers (1 of 1 nodes filtered)``.
    """
    if not evaluation:
        return None
    failed_groups = evaluation.get("FailedTGAllocs") or {}
    reasons: list[str] = []
    for group in sorted(failed_groups):
        metric = failed_groups[group] or {}
        details: list[str] = []
        evaluated = metric.get("NodesEvaluated") or 0
        for reason, count in sorted((metric.get("ConstraintFiltered") or {}).items()):
            details.append(f"{reason} ({count} of {evaluated} nodes filtered)")
        for class_name, count in sorted((metric.get("ClassFiltered") or {}).items()):
            details.append(f"node class {class_name} filtered ({count})")
        for dimension, count in sorted((metric.get("DimensionExhausted") or {}).items()):
            details.append(f"{dimension} exhausted ({count} nodes)")
        for quota in metric.get("QuotaExhausted") or []:
            details.append(f"quota exhausted: {quota}")
        if not details and metric.get("NodesExhausted"):
            details.append(f"resources exhausted on {metric['NodesExhausted']} nodes")
        if not details and (metric.get("NodesInPool") == 0 or not metric.get("NodesAvailable")):
            details.append("no nodes available")
        reasons.append(
            f"placement failed for group {group!r}: {'; '.join(details) or 'no feasible node'}"
        )
    return "; ".join(reasons) or None


def _last_event(task_state: NomadObject, event_type: str) -> NomadObject | None:
    for event in reversed(task_state.get("Events") or []):
        if event.get("Type") == event_type:
            return dict(event)
    return None


def _exit_code(task_state: NomadObject) -> int | None:
    terminated = _last_event(task_state, "Terminated")
    if terminated is None:
        return None
    details = terminated.get("Details") or {}
    raw = details.get("exit_code", terminated.get("ExitCode"))
    if raw is None:
        return None
    try:
        return int(raw)
    except (TypeError, ValueError):
        return None


def _failure_message(alloc: NomadObject) -> tuple[str, int | None]:
    """Nomad's words for why an allocation failed, and the failed task's exit code."""
    task_states: Mapping[str, NomadObject] = alloc.get("TaskStates") or {}
    if alloc.get("ClientStatus") == "lost":
        return "allocation lost: " + (alloc.get("ClientDescription") or "node down"), None
    for task_name in sorted(task_states):
        state = task_states[task_name]
        if not state.get("Failed"):
            continue
        exit_code = _exit_code(state)
        parts = []
        for event_type in (
            "Failed Artifact Download",
            "Terminated",
            "Not Restarting",
            "Driver Failure",
            "Setup Failure",
        ):
            event = _last_event(state, event_type)
            if event is not None:
                text = event.get("DisplayMessage") or event.get("Message") or ""
                if text:
                    parts.append(text)
        detail = "; ".join(parts) or alloc.get("ClientDescription") or "task failed"
        return f"task {task_name!r} failed: {detail}", exit_code
    return alloc.get("ClientDescription") or "allocation failed", None


def _success_exit_code(alloc: NomadObject) -> int:
    task_states: Mapping[str, NomadObject] = alloc.get("TaskStates") or {}
    codes = [_exit_code(task_states[name]) for name in sorted(task_states)]
    return max((code for code in codes if code is not None), default=0)


def summarise_allocations(
    allocations: Sequence[NomadObject],
    job: NomadObject,
    evaluation: NomadObject | None = None,
) -> StepOutcome:
    """The outcome of one step's Nomad job (see the module docstring for the rules).

    ``allocations`` are the job's allocation stubs (``/v1/job/:id/allocations``), ``job`` the job
    as ``GET /v1/job/:id`` returns it, ``evaluation`` the evaluation created by the register (or
    by the dispatch), whose ``FailedTGAllocs`` reveals unplaceable jobs.
    """
    version = job.get("Version")
    current = [
        a
        for a in allocations
        if (version is None or a.get("JobVersion") == version) and not a.get("NextAllocation")
    ]
    newest = max(current, key=lambda a: a.get("CreateIndex", 0), default=None)
    newest_id = newest.get("ID") if newest else None

    if job.get("Stop"):
        return StepOutcome("cancelled", "the Nomad job was stopped", alloc_id=newest_id)

    if not current:
        reason = placement_failure(evaluation)
        if reason is not None:
            return StepOutcome("failed", reason)
        if job.get("Status") == "dead":
            # Every allocation was replaced or none was ever made, and nothing is left to run.
            return StepOutcome("failed", "the Nomad job ended without a final allocation")
        return StepOutcome("pending", "waiting for Nomad to place the job")

    # A failed allocation with no follow-up is final for fail-fast policies even before the
    # job's status catches up; with a pending reschedule (FollowupEvalID) it is not.
    for alloc in sorted(current, key=lambda a: a.get("CreateIndex", 0)):
        if alloc.get("ClientStatus") in ("failed", "lost") and not alloc.get("FollowupEvalID"):
            message, exit_code = _failure_message(alloc)
            return StepOutcome("failed", message, exit_code=exit_code, alloc_id=alloc.get("ID"))

    all_terminal = all(a.get("ClientStatus") in _TERMINAL_CLIENT_STATUSES for a in current)
    if all_terminal and job.get("Status") == "dead":
        stopped = [a for a in current if a.get("DesiredStatus") in ("stop", "evict")]
        if stopped:
            description = stopped[0].get("DesiredDescription") or "allocation stopped"
            return StepOutcome(
                "cancelled", f"allocation stopped: {description}", alloc_id=stopped[0].get("ID")
            )
        exit_code = max(_success_exit_code(a) for a in current)
        return StepOutcome("success", exit_code=exit_code, alloc_id=newest_id)
    if all_terminal or any(a.get("ClientStatus") == "running" for a in current):
        return StepOutcome("running", alloc_id=newest_id)
    return StepOutcome("pending", "allocation placed, waiting for it to start", alloc_id=newest_id)
