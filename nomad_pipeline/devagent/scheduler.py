"""Scheduling rules as pure functions: feasibility, job status, client status, rescheduling.

They follow Nomad's scheduler (``scheduler/feasible``, ``scheduler/reconciler``) and state store
(``getJobStatus``) for the single node the dev agent has.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

Obj = dict[str, Any]

CLIENT_TERMINAL = ("complete", "failed", "lost")
DESIRED_TERMINAL = ("stop", "evict")
EVAL_NON_TERMINAL = ("pending", "blocked")


def alloc_terminal(alloc: Obj) -> bool:
    return alloc["ClientStatus"] in CLIENT_TERMINAL or alloc["DesiredStatus"] in DESIRED_TERMINAL


def alloc_client_terminal(alloc: Obj) -> bool:
    return bool(alloc["ClientStatus"] in CLIENT_TERMINAL)


def empty_metric(node: Obj) -> Obj:
    """An ``AllocationMetric`` for one evaluated node, before any filtering."""
    return {
        "NodesEvaluated": 1,
        "NodesFiltered": 0,
        "NodesInPool": 1,
        "NodePool": node["NodePool"],
        "NodesAvailable": {node["Datacenter"]: 1},
        "ClassFiltered": None,
        "ConstraintFiltered": None,
        "NodesExhausted": 0,
        "ClassExhausted": None,
        "DimensionExhausted": None,
        "QuotaExhausted": None,
        "ResourcesExhausted": None,
        "Scores": None,
        "ScoreMetaData": None,
        "AllocationTime": 0,
        "CoalescedFailures": 0,
    }


def group_resources(group: Obj) -> tuple[int, int]:
    """CPU (MHz) and memory (MB) the group asks for, summed over its tasks."""
    cpu = memory = 0
    for task in group["Tasks"]:
        resources = task.get("Resources") or {}
        cpu += int(resources.get("CPU") or 0)
        memory += int(resources.get("MemoryMB") or 0)
    return cpu, memory


def check_placement(node: Obj, job: Obj, group: Obj) -> tuple[bool, Obj]:
    """Whether ``group`` fits the node, and the ``AllocationMetric`` explaining it.

    Resources are checked against the node's capacity, not against what other allocations hold:
    the dev agent records resources but does not enforce or reserve them.
    """
    metric = empty_metric(node)
    datacenters = job.get("Datacenters") or ["*"]
    in_datacenter = any(fnmatch.fnmatchcase(node["Datacenter"], dc) for dc in datacenters)
    if not in_datacenter or job.get("NodePool", "default") not in ("default", "all"):
        metric.update(NodesEvaluated=0, NodesInPool=0, NodesAvailable={})
        return False, metric
    for constraint in _constraints(job, group):
        if not constraint_met(node, constraint):
            text = (
                f"{constraint.get('LTarget', '')} {constraint.get('Operand') or '='} "
                f"{constraint.get('RTarget', '')}"
            )
            metric.update(NodesFiltered=1, ConstraintFiltered={text: 1})
            return False, metric
    drivers = node["Drivers"]
    missing = [
        t["Driver"] for t in group["Tasks"] if not (drivers.get(t["Driver"]) or {}).get("Healthy")
    ]
    if missing:
        metric.update(NodesFiltered=1, ConstraintFiltered={"missing drivers": 1})
        return False, metric
    cpu, memory = group_resources(group)
    capacity = node["NodeResources"]
    exhausted: list[str] = []
    if cpu > capacity["Cpu"]["CpuShares"]:
        exhausted.append("cpu")
    if memory > capacity["Memory"]["MemoryMB"]:
        exhausted.append("memory")
    if exhausted:
        metric.update(
            NodesExhausted=1,
            ClassExhausted=None,
            DimensionExhausted={exhausted[0]: 1},
        )
        return False, metric
    metric["ScoreMetaData"] = [{"NodeID": node["ID"], "Scores": {"binpack": 0.0}, "NormScore": 0.0}]
    return True, metric


def job_status(job: Obj, allocs: list[Obj], evals: list[Obj]) -> str:
    """Nomad's ``getJobStatus``."""
    if job["Type"] == "system" or job.get("ParameterizedJob") or job.get("Periodic"):
        return "dead" if job.get("Stop") else "running"
    if any(not alloc_terminal(a) for a in allocs):
        return "running"
    if any(e["Status"] in EVAL_NON_TERMINAL for e in evals):
        return "pending"
    if evals or job.get("Stop"):
        return "dead"
    return "pending"


def client_status(task_states: dict[str, Obj]) -> tuple[str, str]:
    """An allocation's ``ClientStatus`` and ``ClientDescription`` from its task states."""
    failed = running = pending = dead = False
    for state in task_states.values():
        if state["State"] == "running":
            running = True
        elif state["State"] == "pending":
            pending = True
        elif state["Failed"]:
            failed = True
        else:
            dead = True
    if failed:
        return "failed", "Failed tasks"
    if running:
        return "running", "Tasks are running"
    if pending:
        return "pending", "No tasks have started"
    if dead:
        return "complete", "All tasks have completed"
    return "pending", "No tasks have started"


def _reschedule_enabled(policy: Obj) -> bool:
    return int(policy.get("Attempts") or 0) > 0 or bool(policy.get("Unlimited"))


def reschedule_policy(alloc: Obj) -> Obj | None:
    for group in alloc["Job"]["TaskGroups"]:
        if group["Name"] == alloc["TaskGroup"]:
            policy: Obj | None = group.get("ReschedulePolicy")
            return policy
    return None


def reschedule_eligible(alloc: Obj, now: int) -> bool:
    """``Allocation.RescheduleEligible``: attempts left inside the policy's interval."""
    policy = reschedule_policy(alloc)
    if policy is None or not _reschedule_enabled(policy):
        return False
    if policy.get("Unlimited"):
        return True
    events = (alloc.get("RescheduleTracker") or {}).get("Events") or []
    interval = int(policy.get("Interval") or 0)
    attempted = sum(1 for e in events if now - int(e["RescheduleTime"]) < interval)
    return attempted < int(policy["Attempts"])


def last_event_time(alloc: Obj) -> int:
    """When the allocation last changed on the client (the latest task event), in ns."""
    latest = 0
    for state in (alloc.get("TaskStates") or {}).values():
        for event in state.get("Events") or []:
            latest = max(latest, int(event["Time"]))
    return latest or int(alloc["ModifyTime"])


def next_delay(alloc: Obj) -> int:
    """``Allocation.NextDelay``: the delay before the next reschedule, in ns."""
    policy = reschedule_policy(alloc) or {}
    delay = int(policy.get("Delay") or 0)
    events = (alloc.get("RescheduleTracker") or {}).get("Events") or []
    if not events:
        return delay
    function = policy.get("DelayFunction")
    if function == "exponential":
        delay = int(events[-1]["Delay"]) * 2
    elif function == "fibonacci":
        if len(events) >= 2:
            last, before = int(events[-1]["Delay"]), int(events[-2]["Delay"])
            max_delay = int(policy.get("MaxDelay") or 0)
            delay = last if (before == max_delay and last == delay) else last + before
    else:
        return delay
    max_delay = int(policy.get("MaxDelay") or 0)
    if max_delay > 0 and delay > max_delay:
        delay = max_delay
        since_last = last_event_time(alloc) - int(events[-1]["RescheduleTime"])
        if since_last > delay:
            delay = int(policy.get("Delay") or 0)
    return delay


def reschedule_time(alloc: Obj) -> int:
    """The earliest time (ns) the failed allocation may be replaced."""
    return last_event_time(alloc) + next_delay(alloc)


# Placement-neutral on a single node: they spread allocations, never exclude the only node.
_SPREADING_OPERANDS = ("distinct_hosts", "distinct_property")


def _constraints(job: Obj, group: Obj) -> list[Obj]:
    found: list[Obj] = list(job.get("Constraints") or []) + list(group.get("Constraints") or [])
    for task in group["Tasks"]:
        found.extend(task.get("Constraints") or [])
    return found


def node_variables(node: Obj) -> dict[str, Any]:
    """The ``node.*`` names that constraints and ``${...}`` interpolation may use."""
    return {
        "node.unique.id": node["ID"],
        "node.unique.name": node["Name"],
        "node.datacenter": node["Datacenter"],
        "node.region": node.get("Region", "global"),
        "node.class": node.get("NodeClass") or "",
        "node.pool": node["NodePool"],
    }


def _node_value(node: Obj, target: str) -> str | None:
    """Resolve ``${attr.x}``, ``${node.x}`` or ``${meta.x}`` against the node; else a literal."""
    if not (target.startswith("${") and target.endswith("}")):
        return target
    name = target[2:-1]
    if name.startswith("attr."):
        value = (node.get("Attributes") or {}).get(name[5:])
        return None if value is None else str(value)
    if name.startswith("meta."):
        value = (node.get("Meta") or {}).get(name[5:])
        return None if value is None else str(value)
    return node_variables(node).get(name)


def _compare(left: str, right: str) -> int:
    try:
        a, b = float(left), float(right)
    except ValueError:
        return (left > right) - (left < right)
    return (a > b) - (a < b)


def _version_key(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _version_met(value: str, spec: str) -> bool:
    """``version`` constraints: comma-separated ``>= 1.2, < 2`` style clauses."""
    have = _version_key(value)
    for clause in spec.split(","):
        match = re.fullmatch(r"\s*(>=|<=|!=|=|>|<|~>)?\s*v?([\w.\-+]+)\s*", clause)
        if match is None:
            return False
        operator, wanted = match.group(1) or "=", _version_key(match.group(2))
        if operator == "~>":
            # Pessimistic: ~> 1.2 allows [1.2, 2.0); ~> 1.2.3 allows [1.2.3, 1.3.0).
            upper = (*wanted[:-2], wanted[-2] + 1) if len(wanted) >= 2 else (wanted[0] + 1,)
            if not wanted <= have < upper:
                return False
            continue
        checks = {
            "=": have == wanted,
            "!=": have != wanted,
            ">": have > wanted,
            ">=": have >= wanted,
            "<": have < wanted,
            "<=": have <= wanted,
        }
        if not checks[operator]:
            return False
    return True


def constraint_met(node: Obj, constraint: Obj) -> bool:
    """Nomad's feasibility check of one constraint against the node."""
    operand = constraint.get("Operand") or "="
    if operand in _SPREADING_OPERANDS:
        return True
    left = _node_value(node, str(constraint.get("LTarget") or ""))
    right = _node_value(node, str(constraint.get("RTarget") or ""))
    if operand == "is_set":
        return left is not None
    if operand == "is_not_set":
        return left is None
    if left is None or right is None:
        return False
    if operand in ("=", "==", "is"):
        return left == right
    if operand in ("!=", "not"):
        return left != right
    if operand in ("<", "<=", ">", ">="):
        order = _compare(left, right)
        return {"<": order < 0, "<=": order <= 0, ">": order > 0, ">=": order >= 0}[operand]
    if operand == "regexp":
        try:
            return re.search(right, left) is not None
        except re.error:
            return False
    members = {p.strip() for p in left.split(",")}
    wanted = {p.strip() for p in right.split(",")}
    if operand == "set_contains":
        return wanted <= members
    if operand == "set_contains_any":
        return bool(wanted & members)
    if operand in ("version", "semver"):
        return _version_met(left, right)
    return False
