"""Scheduling rules as pure functions: feasibility, job status, client status, rescheduling.

They follow Nomad's scheduler (``scheduler/feasible``, ``scheduler/reconciler``) and state store
(``getJobStatus``) for the single node the dev agent has.
"""

from __future__ import annotations

import fnmatch
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
