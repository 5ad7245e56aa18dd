"""The dev agent's engine: Nomad's server (jobs, evaluations, scheduling) and client (tasks).

The HTTP layer calls :class:`Engine`; every state change goes through :class:`_Txn`, which
builds one atomic :meth:`StateStore.commit` with its events and recomputes the status of every
job it touched (Nomad's ``getJobStatus`` runs inside the same Raft apply). Evaluations are
planned by a single scheduler worker, several per commit under load, so plans never race.
Client updates from the task runners are coalesced by a flusher into batched commits, as
Nomad's client batches its allocation updates, which keeps 200 concurrent allocations cheap.

Beyond the HTTP layer's calls, the engine answers ``job_allocations``, ``job_evaluations``,
``job_versions`` and ``evaluate_job``, and serves Nomad variables to task templates.
Resources are recorded and checked against the node's capacity for placement, never enforced.
Periodic jobs launch ``<parent>/periodic-<unix>`` children at their cron times while the agent
runs (launches missed while it was down are not made up).

Single-writer rule: between reading state and calling ``commit`` there is never an ``await``,
so each transaction sees and writes a consistent snapshot.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime
import logging
import os
import platform
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any

from nomad_pipeline.devagent import jobspec, scheduler
from nomad_pipeline.devagent.allocdir import host_environment, prepare_alloc_root
from nomad_pipeline.devagent.state import (
    Change,
    Event,
    NomadHTTPError,
    Obj,
    StateStore,
    new_uuid,
    now_ns,
    row_key,
)
from nomad_pipeline.devagent.taskrunner import AllocRunner, rfc3339, task_event

log = logging.getLogger(__name__)

NOMAD_VERSION = "1.9.7"
ZERO_TIME = "0001-01-01T00:00:00Z"
DISPATCH_PAYLOAD_LIMIT = 16384
DEFAULT_NAMESPACE = "default"
# Evaluations planned, or client updates applied, per commit: large enough to amortise a
# commit under a burst, small enough that one batch keeps the event loop busy only briefly.
MAX_BATCH = 32
# How long one blocking wait for a variable lasts before it is renewed (a template waiting
# for a missing variable waits as long as it takes).
VARIABLE_WAIT = 300.0


def _write_response(index: int, **fields: Any) -> Obj:
    return {**fields, "Index": index, "LastContact": 0, "KnownLeader": True}


def _go_list(items: list[str]) -> str:
    """Go's ``%v`` of a ``[]string``: ``[a b]``."""
    return "[" + " ".join(items) + "]"


def _without_job(alloc: Obj) -> Obj:
    return {k: v for k, v in alloc.items() if k != "Job"}


class _Txn:
    """One atomic commit: overlaid reads, puts, events and the job-status recompute."""

    def __init__(self, engine: Engine, event_type: str) -> None:
        self.engine = engine
        self.state = engine.state
        self.event_type = event_type
        # Exact because nothing else commits before this transaction does (no await between).
        self.index = engine.state.index + 1
        self.now = now_ns()
        self._puts: dict[tuple[str, str], Obj | None] = {}
        self._event_types: dict[tuple[str, str], str] = {}
        self.extra_events: list[Event] = []
        self.touched_jobs: set[str] = set()
        # Rows put in this transaction, by (table, job key): the overlay of the engine's index.
        self._added: dict[tuple[str, str], set[str]] = {}
        self.evals_to_run: list[Obj] = []

    def get(self, table: str, key: str) -> Obj | None:
        if (table, key) in self._puts:
            return self._puts[(table, key)]
        return self.state.get(table, key)

    def put(self, table: str, key: str, value: Obj | None, event_type: str | None = None) -> None:
        self._puts[(table, key)] = value
        if event_type is not None:
            self._event_types[(table, key)] = event_type
        if table in ("allocs", "evals") and value is not None:
            job_key = row_key(value["Namespace"], value["JobID"])
            self.touched_jobs.add(job_key)
            self._added.setdefault((table, job_key), set()).add(key)
        elif table == "jobs":
            self.touched_jobs.add(key)

    def put_eval(self, evaluation: Obj, event_type: str | None = None) -> None:
        self.put("evals", evaluation["ID"], evaluation, event_type)
        if evaluation["Status"] == "pending":
            self.evals_to_run.append(evaluation)

    def delete_job(self, job_key: str, event: Event) -> None:
        """Delete a job and all its versions, announced by ``event``.

        A deleted row has nothing to build the event from, so the caller gives it.
        """
        self.put("jobs", job_key, None)
        for version_key in self.engine.versions_by_job.get(job_key, set()):
            self.put("job_versions", version_key, None)
        self.extra_events.append(event)

    def job_allocs(self, job_key: str) -> list[Obj]:
        ids = self.engine.allocs_by_job.get(job_key, set()) | self._added.get(
            ("allocs", job_key), set()
        )
        return [a for a in (self.get("allocs", i) for i in ids) if a is not None]

    def job_evals(self, job_key: str) -> list[Obj]:
        ids = self.engine.evals_by_job.get(job_key, set()) | self._added.get(
            ("evals", job_key), set()
        )
        return [e for e in (self.get("evals", i) for i in ids) if e is not None]

    def _recompute_job_statuses(self) -> None:
        for job_key in sorted(self.touched_jobs):
            job = self.get("jobs", job_key)
            if job is None:
                continue
            allocs = [a for a in self.job_allocs(job_key) if _same_instance(a, job)]
            evals = [e for e in self.job_evals(job_key) if e["CreateIndex"] >= job["CreateIndex"]]
            status = scheduler.job_status(job, allocs, evals)
            if status == job.get("Status"):
                continue
            updated = {**job, "Status": status, "ModifyIndex": self.index}
            job_changed_here = ("jobs", job_key) in self._puts
            self._puts[("jobs", job_key)] = updated
            if not job_changed_here:
                self._event_types[("jobs", job_key)] = self.event_type

    async def commit(self) -> int:
        self._recompute_job_statuses()
        if not self._puts:
            return self.state.index
        assert self.index == self.state.index + 1, "a commit slipped in mid-transaction"
        changes: list[Change] = []
        events: list[Event] = []
        for (table, key), value in self._puts.items():
            changes.append(Change(table, key, value))
            event_type = self._event_types.get((table, key), self.event_type)
            event = self._event_for(table, key, value, event_type)
            if event is not None:
                events.append(event)
        events.extend(self.extra_events)
        self.engine.index_changes(self._puts)
        try:
            index = await self.state.commit(changes, events)
        finally:
            # The change is applied in memory before the commit awaits the disk, so its
            # evaluations must run even if the request that made it is cancelled meanwhile (a
            # client killed right after a register): a skipped one would stay pending forever.
            for evaluation in self.evals_to_run:
                self.engine.schedule_eval(evaluation)
        return index

    def _event_for(self, table: str, key: str, value: Obj | None, event_type: str) -> Event | None:
        if table in ("allocs", "evals") and value is not None:
            topic, payload = (
                ("Allocation", _without_job(value)) if table == "allocs" else ("Evaluation", value)
            )
            return Event(
                topic,
                event_type,
                key,
                value["Namespace"],
                {topic: payload},
                (value["JobID"], value.get("DeploymentID") or ""),
            )
        if table == "jobs" and value is not None:
            return Event("Job", event_type, value["ID"], value["Namespace"], {"Job": value})
        return None


def _same_instance(alloc: Obj, job: Obj) -> bool:
    """Whether ``alloc`` belongs to this incarnation of the job (not one purged before)."""
    return bool(alloc["Job"]["CreateIndex"] == job["CreateIndex"])


class Engine:
    """Nomad's server and client for one node, driving tasks with raw_exec."""

    def __init__(
        self,
        state: StateStore,
        *,
        alloc_root: Path,
        node_name: str,
        region: str = "global",
        datacenter: str = "dc1",
        http_addr: str = "",
    ) -> None:
        self.state = state
        self.alloc_root = alloc_root
        self.region = region
        self.datacenter = datacenter
        self.http_addr = http_addr
        self.node: Obj = self._build_node(node_name)
        self.allocs_by_job: dict[str, set[str]] = {}
        self.evals_by_job: dict[str, set[str]] = {}
        self.versions_by_job: dict[str, set[str]] = {}
        self._eval_queue: asyncio.Queue[str] = asyncio.Queue()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._runners: dict[str, AllocRunner] = {}
        self._runner_tasks: dict[str, asyncio.Task[None]] = {}
        self._dirty: dict[str, dict[str, Obj]] = {}
        self._flush_wake = asyncio.Event()
        self._log_waiters: dict[str, asyncio.Event] = {}
        self._log_waiter_counts: dict[str, int] = {}
        self._host_env = host_environment()
        self._worker: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._periodic: asyncio.Task[None] | None = None
        self._periodic_wake = asyncio.Event()
        # Per periodic job: the launch time (unix s) the next launch is computed from.
        self._periodic_last: dict[str, float] = {}
        self._stopping = False

    # -- the node ------------------------------------------------------------------------

    def _build_node(self, name: str) -> Obj:
        cores = os.cpu_count() or 1
        mhz = _cpu_mhz()
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
        disk_mb = shutil.disk_usage(_existing_parent(self.alloc_root)).free // (1024 * 1024)
        now = rfc3339(now_ns())
        address = self.http_addr.removeprefix("http://").removeprefix("https://")
        attributes = {
            "kernel.name": platform.system().lower(),
            "kernel.version": platform.release(),
            "os.name": platform.system().lower(),
            "cpu.arch": platform.machine(),
            "arch": platform.machine(),
            "cpu.numcores": str(cores),
            "cpu.frequency": str(mhz),
            "cpu.totalcompute": str(cores * mhz),
            "memory.totalbytes": str(memory_mb * 1024 * 1024),
            "unique.hostname": socket.gethostname(),
            "unique.network.ip-address": "127.0.0.1",
            "unique.storage.volume": str(_existing_parent(self.alloc_root)),
            "unique.storage.bytesfree": str(disk_mb * 1024 * 1024),
            "driver.raw_exec": "1",
            "nomad.version": NOMAD_VERSION,
            "nomad.revision": "devagent",
            "nomad.advertise.address": address,
        }
        return {
            "ID": new_uuid(),
            "SecretID": "",
            "Name": name,
            "Datacenter": self.datacenter,
            "Region": self.region,
            "HTTPAddr": address,
            "TLSEnabled": False,
            "Attributes": attributes,
            "NodeResources": {
                "Cpu": {
                    "CpuShares": cores * mhz,
                    "TotalCpuCores": cores,
                    "ReservableCpuCores": list(range(cores)),
                },
                "Memory": {"MemoryMB": memory_mb},
                "Disk": {"DiskMB": disk_mb},
                "Networks": None,
                "MinDynamicPort": 20000,
                "MaxDynamicPort": 32000,
            },
            "ReservedResources": {
                "Cpu": {"CpuShares": 0, "ReservedCpuCores": None},
                "Memory": {"MemoryMB": 0},
                "Disk": {"DiskMB": 0},
                "Networks": {"ReservedHostPorts": ""},
            },
            "Resources": {"CPU": cores * mhz, "MemoryMB": memory_mb, "DiskMB": disk_mb},
            "Reserved": {"CPU": 0, "MemoryMB": 0, "DiskMB": 0},
            "Links": None,
            "Meta": {},
            "NodeClass": "",
            "NodePool": "default",
            "ComputedClass": "",
            "Drain": False,
            "DrainStrategy": None,
            "SchedulingEligibility": "eligible",
            "Status": "ready",
            "StatusDescription": "",
            "StatusUpdatedAt": now_ns() // 1_000_000_000,
            "Events": [
                {
                    "Message": "Node registered",
                    "Subsystem": "Cluster",
                    "Details": None,
                    "Timestamp": now,
                    "CreateIndex": 0,
                }
            ],
            "Drivers": {
                "raw_exec": {
                    "Attributes": {"driver.raw_exec": "true"},
                    "Detected": True,
                    "Healthy": True,
                    "HealthDescription": "Healthy",
                    "UpdateTime": now,
                }
            },
            "HostVolumes": None,
            "HostNetworks": None,
            "CSIControllerPlugins": None,
            "CSINodePlugins": None,
            "LastDrain": None,
            "Version": NOMAD_VERSION,
            "CreateIndex": 0,
            "ModifyIndex": 0,
        }

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Register namespace ``default`` and the node; turn work lost by a restart into lost."""
        await asyncio.to_thread(prepare_alloc_root, self.alloc_root)
        for job_key, _ in self.state.items("jobs"):
            self.versions_by_job.setdefault(job_key, set())
        for key, version in self.state.items("job_versions"):
            job_key = row_key(version["Namespace"], version["ID"])
            self.versions_by_job.setdefault(job_key, set()).add(key)
        for alloc_id, alloc in self.state.items("allocs"):
            self.allocs_by_job.setdefault(row_key(alloc["Namespace"], alloc["JobID"]), set()).add(
                alloc_id
            )
        for eval_id, evaluation in self.state.items("evals"):
            self.evals_by_job.setdefault(
                row_key(evaluation["Namespace"], evaluation["JobID"]), set()
            ).add(eval_id)

        txn = _Txn(self, "AllocationUpdated")
        if self.state.get("namespaces", DEFAULT_NAMESPACE) is None:
            txn.put(
                "namespaces",
                DEFAULT_NAMESPACE,
                {
                    "Name": DEFAULT_NAMESPACE,
                    "Description": "Default shared namespace",
                    "Quota": "",
                    "Meta": None,
                    "Capabilities": None,
                    "NodePoolConfiguration": None,
                    "CreateIndex": txn.index,
                    "ModifyIndex": txn.index,
                },
            )
        previous = next(
            (n for n in self.state.rows("nodes") if n["Name"] == self.node["Name"]), None
        )
        if previous is not None:
            self.node["ID"] = previous["ID"]
            self.node["CreateIndex"] = previous["CreateIndex"]
        else:
            self.node["CreateIndex"] = txn.index
        self.node["ModifyIndex"] = txn.index
        self.node["Events"][0]["CreateIndex"] = self.node["CreateIndex"]
        txn.put("nodes", self.node["ID"], self.node)
        txn.extra_events.append(
            Event("Node", "NodeRegistration", self.node["ID"], "", {"Node": self.node})
        )
        self._mark_lost(txn)
        for evaluation in self.state.rows("evals"):
            if evaluation["Status"] == "pending":
                txn.evals_to_run.append(evaluation)
        txn.touched_jobs.update(key for key, _ in self.state.items("jobs"))
        await txn.commit()
        self._worker = asyncio.create_task(self._eval_loop(), name="devagent-scheduler")
        self._flusher = asyncio.create_task(self._flush_loop(), name="devagent-client-updates")
        self._periodic = asyncio.create_task(self._periodic_loop(), name="devagent-periodic")

    def _mark_lost(self, txn: _Txn) -> None:
        """Allocations that were running when the agent went away have no process any more."""
        failed_jobs: dict[str, Obj] = {}
        for alloc in list(self.state.rows("allocs")):
            if scheduler.alloc_client_terminal(alloc):
                continue
            states = copy.deepcopy(alloc.get("TaskStates") or {})
            for task_state in states.values():
                if task_state["State"] == "dead":
                    continue
                message = "task's process was lost when the dev agent restarted"
                event = task_event(
                    "Failed Restoring Task",
                    message,
                    details={"fails_task": "true", "message": message},
                    FailsTask=True,
                )
                task_state["Events"] = [*task_state["Events"], event][-10:]
                task_state.update(State="dead", Failed=True, FinishedAt=rfc3339(txn.now))
            lost = {
                **alloc,
                "TaskStates": states or None,
                "ClientStatus": "lost",
                "ClientDescription": "alloc is lost since its node is down",
                "DesiredStatus": "stop",
                "DesiredDescription": "alloc is lost since its node is down",
                "ModifyIndex": txn.index,
                "AllocModifyIndex": txn.index,
                "ModifyTime": txn.now,
            }
            txn.put("allocs", alloc["ID"], lost, "AllocationUpdated")
            job = self.state.get("jobs", row_key(alloc["Namespace"], alloc["JobID"]))
            if job is not None and not job.get("Stop") and _same_instance(alloc, job):
                failed_jobs[row_key(job["Namespace"], job["ID"])] = job
        for job in failed_jobs.values():
            txn.put_eval(self._new_eval(txn, job, "node-update"), "EvaluationUpdated")

    async def stop(self) -> None:
        """Kill every task (KillSignal, KillTimeout, SIGKILL). Call before closing the state.

        The kills are not recorded: after a restart the allocations are found lost, as Nomad
        reports work whose client went away, never silently complete.
        """
        self._stopping = True
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        for task in (self._worker, self._flusher, self._periodic):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._worker = self._flusher = self._periodic = None
        await self._flush_dirty()
        for runner in self._runners.values():
            runner.request_stop(shutdown=True)
        tasks = list(self._runner_tasks.values())
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for waiter in self._log_waiters.values():
            waiter.set()
        self._log_waiters.clear()

    # -- reads for the HTTP layer ------------------------------------------------------------

    def alloc_dir(self, alloc_id: str) -> Path:
        return self.alloc_root / alloc_id

    def job_versions(self, namespace: str, job_id: str) -> list[Obj]:
        """Every stored version of the job, newest first (``/v1/job/:id/versions``)."""
        keys = self.versions_by_job.get(row_key(namespace, job_id), set())
        versions = [v for v in (self.state.get("job_versions", k) for k in keys) if v]
        return sorted(versions, key=lambda v: int(v["Version"]), reverse=True)

    def _job_rows(
        self, table: str, by_job: dict[str, set[str]], namespace: str, job_id: str
    ) -> list[Obj]:
        """The rows of ``table`` that the per-job index ``by_job`` lists for the job."""
        rows = (self.state.get(table, i) for i in by_job.get(row_key(namespace, job_id), ()))
        return [row for row in rows if row is not None]

    def job_allocations(
        self, namespace: str, job_id: str, *, all_instances: bool = False
    ) -> list[Obj]:
        """The job's allocations (full objects), oldest first; ``all_instances`` as ``all=true``."""
        allocs = self._job_rows("allocs", self.allocs_by_job, namespace, job_id)
        job = self.state.get("jobs", row_key(namespace, job_id))
        if job is not None and not all_instances:
            allocs = [a for a in allocs if _same_instance(a, job)]
        return sorted(allocs, key=lambda a: (a["CreateIndex"], a["ID"]))

    def job_evaluations(self, namespace: str, job_id: str) -> list[Obj]:
        evals = self._job_rows("evals", self.evals_by_job, namespace, job_id)
        return sorted(evals, key=lambda e: (e["CreateIndex"], e["ID"]))

    def job_summary(self, namespace: str, job_id: str) -> Obj:
        job = self.state.get("jobs", row_key(namespace, job_id))
        if job is None:
            raise NomadHTTPError(404, "job not found")
        summary = {
            g["Name"]: {
                "Queued": 0,
                "Complete": 0,
                "Failed": 0,
                "Running": 0,
                "Starting": 0,
                "Lost": 0,
                "Unknown": 0,
            }
            for g in job["TaskGroups"]
        }
        column = {
            "pending": "Starting",
            "running": "Running",
            "complete": "Complete",
            "failed": "Failed",
            "lost": "Lost",
            "unknown": "Unknown",
        }
        for alloc in self.job_allocations(namespace, job_id):
            counts = summary.get(alloc["TaskGroup"])
            if counts is not None:
                counts[column[alloc["ClientStatus"]]] += 1
        for evaluation in self.job_evaluations(namespace, job_id):
            if evaluation["Status"] == "blocked":
                previous = self.state.get("evals", evaluation["PreviousEval"]) or {}
                for group, queued in (previous.get("QueuedAllocations") or {}).items():
                    if group in summary:
                        summary[group]["Queued"] = queued
        children = {"Pending": 0, "Running": 0, "Dead": 0}
        if job.get("ParameterizedJob") or job.get("Periodic"):
            for child in self.state.rows("jobs"):
                if child.get("ParentID") == job_id and child["Namespace"] == namespace:
                    children[str(child["Status"]).capitalize()] += 1
        return {
            "JobID": job_id,
            "Namespace": namespace,
            "Summary": summary,
            "Children": children,
            "CreateIndex": job["CreateIndex"],
            "ModifyIndex": job["ModifyIndex"],
        }

    # The HTTP layer's contract names the parameter ``timeout``.
    async def wait_for_log_write(self, alloc_id: str, timeout: float) -> None:  # noqa: ASYNC109
        """Return once any log file of the allocation grew, or after ``timeout`` seconds."""
        waiter = self._log_waiters.get(alloc_id)
        if waiter is None:
            waiter = self._log_waiters[alloc_id] = asyncio.Event()
        self._log_waiter_counts[alloc_id] = self._log_waiter_counts.get(alloc_id, 0) + 1
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await waiter.wait()
        finally:
            left = self._log_waiter_counts.pop(alloc_id) - 1
            if left:
                self._log_waiter_counts[alloc_id] = left
            elif self._log_waiters.get(alloc_id) is waiter:
                del self._log_waiters[alloc_id]  # the last follower left: forget the event

    def _log_written(self, alloc_id: str) -> None:
        waiter = self._log_waiters.pop(alloc_id, None)
        if waiter is not None:
            waiter.set()

    # -- variables, as task templates read them -------------------------------------------

    def read_variable(self, namespace: str, path: str) -> dict[str, Any] | None:
        found = self.state.get("vars", row_key(namespace, path))
        if found is None:
            return None
        items: dict[str, Any] = found.get("Items") or {}
        return items

    def list_variables(self, namespace: str, prefix: str) -> list[Obj]:
        metadata = ("Namespace", "Path", "CreateIndex", "ModifyIndex", "CreateTime", "ModifyTime")
        return sorted(
            (
                {k: v.get(k) for k in metadata}
                for v in self.state.rows("vars")
                if v.get("Namespace") == namespace and str(v.get("Path", "")).startswith(prefix)
            ),
            key=lambda v: str(v["Path"]),
        )

    def variables_index(self) -> int:
        return self.state.table_index("vars")

    async def wait_variables(self, after_index: int) -> None:
        while self.state.table_index("vars") <= after_index:
            await self.state.wait(("vars",), after_index, VARIABLE_WAIT)

    # -- jobs ----------------------------------------------------------------------------

    def validate_job(self, job: Obj) -> tuple[Obj, list[str]]:
        """The canonicalized job (Nomad's defaults) and Nomad's validation errors."""
        if not isinstance(job, dict):
            return {}, ["Job must be an object"]
        namespace = job.get("Namespace") or DEFAULT_NAMESPACE
        canonical = jobspec.canonicalize(job, namespace=namespace, region=self.region)
        errors = jobspec.validate(canonical)
        for group in canonical.get("TaskGroups") or []:
            for task in (group.get("Tasks") if isinstance(group, dict) else None) or []:
                kill_signal = task.get("KillSignal") if isinstance(task, dict) else None
                if kill_signal and not _known_signal(str(kill_signal)):
                    errors.append(f'Task {task.get("Name")} has unknown KillSignal "{kill_signal}"')
        return canonical, errors

    def _admit(self, namespace: str, job: Obj) -> None:
        """The namespace must exist and allow every task driver the job uses."""
        found = self.state.get("namespaces", namespace)
        if found is None:
            raise NomadHTTPError(
                500, f'job "{job["ID"]}" is in nonexistent namespace "{namespace}"'
            )
        capabilities = found.get("Capabilities") or {}
        enabled = capabilities.get("EnabledTaskDrivers") or []
        disabled = capabilities.get("DisabledTaskDrivers") or []
        for group in job["TaskGroups"]:
            for task in group["Tasks"]:
                driver = task["Driver"]
                if (enabled and driver not in enabled) or driver in disabled:
                    raise NomadHTTPError(
                        500,
                        f'used task driver "{driver}" in {group["Name"]}[{task["Name"]}] '
                        f"is not allowed in namespace {namespace}",
                    )

    async def register_job(
        self,
        namespace: str,
        job: Obj,
        *,
        enforce_index: bool = False,
        job_modify_index: int = 0,
        eval_priority: int = 0,
    ) -> Obj:
        job = {**job, "Namespace": namespace}
        canonical, errors = self.validate_job(job)
        if errors:
            raise NomadHTTPError(500, jobspec.multierror_text(errors))
        job_id = canonical["ID"]
        self._admit(namespace, canonical)
        job_key = row_key(namespace, job_id)
        existing = self.state.get("jobs", job_key)
        if enforce_index:
            prefix = f"Enforcing job modify index {job_modify_index}"
            if job_modify_index == 0 and existing is not None:
                raise NomadHTTPError(500, f"{prefix}: job already exists")
            if job_modify_index != 0 and existing is None:
                raise NomadHTTPError(500, f"{prefix}: job does not exist")
            if existing is not None and existing["JobModifyIndex"] != job_modify_index:
                raise NomadHTTPError(
                    500,
                    f"{prefix}: job exists with conflicting job modify index: "
                    f"{existing['JobModifyIndex']}",
                )
        for key in jobspec.SERVER_SET_FIELDS:
            canonical.pop(key, None)
        if existing is not None and existing.get("ParentID") and not canonical.get("ParentID"):
            # Resubmitting a dispatched child keeps what dispatch gave it.
            for key in ("ParentID", "Dispatched", "Payload", "DispatchIdempotencyToken"):
                canonical[key] = existing.get(key)
        txn = _Txn(self, "JobRegistered")
        stored = self._store_job_version(txn, canonical, existing)
        return await self._finish_register(txn, stored, eval_priority)

    def _store_job_version(self, txn: _Txn, job: Obj, existing: Obj | None) -> Obj:
        """Write ``job`` as a new version, unless its spec equals the stored one."""
        if existing is not None and jobspec.spec_equal(job, existing):
            return existing
        stored = {
            **job,
            "Status": "pending",
            "StatusDescription": "",
            "Stable": False,
            "Version": existing["Version"] + 1 if existing is not None else 0,
            "SubmitTime": txn.now,
            "CreateIndex": existing["CreateIndex"] if existing is not None else txn.index,
            "ModifyIndex": txn.index,
            "JobModifyIndex": txn.index,
        }
        if existing is not None:
            stored["Status"] = existing["Status"]
        job_key = row_key(stored["Namespace"], stored["ID"])
        txn.put("jobs", job_key, stored)
        txn.put(
            "job_versions",
            row_key(stored["Namespace"], stored["ID"], str(stored["Version"])),
            stored,
        )
        return stored

    async def _finish_register(self, txn: _Txn, job: Obj, eval_priority: int) -> Obj:
        eval_id = ""
        eval_index = 0
        if not (job.get("ParameterizedJob") or job.get("Periodic")):
            evaluation = self._new_eval(txn, job, "job-register", priority=eval_priority)
            txn.put_eval(evaluation)
            eval_id, eval_index = evaluation["ID"], txn.index
        index = await txn.commit()
        if job.get("Periodic"):
            self._periodic_wake.set()
        return _write_response(
            index,
            EvalID=eval_id,
            EvalCreateIndex=eval_index,
            JobModifyIndex=job["JobModifyIndex"],
            Warnings="",
        )

    def _new_eval(
        self,
        txn: _Txn,
        job: Obj,
        triggered_by: str,
        *,
        priority: int = 0,
        status: str = "pending",
        **fields: Any,
    ) -> Obj:
        evaluation = {
            "ID": new_uuid(),
            "Namespace": job["Namespace"],
            "Priority": priority or job.get("Priority") or 50,
            "Type": job["Type"],
            "TriggeredBy": triggered_by,
            "JobID": job["ID"],
            "JobModifyIndex": job.get("JobModifyIndex", 0),
            "NodeID": "",
            "NodeModifyIndex": 0,
            "DeploymentID": "",
            "Status": status,
            "StatusDescription": "",
            "Wait": 0,
            "WaitUntil": ZERO_TIME,
            "NextEval": "",
            "PreviousEval": "",
            "BlockedEval": "",
            "RelatedEvals": None,
            "FailedTGAllocs": None,
            "ClassEligibility": None,
            "EscapedComputedClass": False,
            "QuotaLimitReached": "",
            "AnnotatePlan": False,
            "QueuedAllocations": None,
            "LeaderACL": "",
            "SnapshotIndex": 0,
            "CreateIndex": txn.index,
            "ModifyIndex": txn.index,
            "CreateTime": txn.now,
            "ModifyTime": txn.now,
        }
        evaluation.update(fields)
        return evaluation

    async def deregister_job(self, namespace: str, job_id: str, *, purge: bool) -> Obj:
        job_key = row_key(namespace, job_id)
        existing = self.state.get("jobs", job_key)
        if existing is None:
            return _write_response(self.state.index, EvalID="", EvalCreateIndex=0, JobModifyIndex=0)
        txn = _Txn(self, "JobDeregistered")
        if purge:
            txn.delete_job(
                job_key,
                Event(
                    "Job", "JobDeregistered", job_id, namespace, {"Job": existing, "Deleted": True}
                ),
            )
            job_modify_index = existing["JobModifyIndex"]
        else:
            stopped = {**existing, "Stop": True}
            for key in jobspec.SERVER_SET_FIELDS:
                stopped.pop(key, None)
            job_modify_index = self._store_job_version(txn, stopped, existing)["JobModifyIndex"]
        eval_id = ""
        eval_index = 0
        if not (existing.get("ParameterizedJob") or existing.get("Periodic")):
            evaluation = self._new_eval(
                txn, {**existing, "JobModifyIndex": job_modify_index}, "job-deregister"
            )
            txn.put_eval(evaluation)
            eval_id, eval_index = evaluation["ID"], txn.index
        index = await txn.commit()
        return _write_response(
            index, EvalID=eval_id, EvalCreateIndex=eval_index, JobModifyIndex=job_modify_index
        )

    async def dispatch_job(
        self,
        namespace: str,
        job_id: str,
        *,
        payload: bytes | None,
        meta: dict[str, str],
        id_prefix_template: str = "",
        idempotency_token: str = "",
    ) -> Obj:
        parent = self.state.get("jobs", row_key(namespace, job_id))
        if parent is None:
            raise NomadHTTPError(500, "parameterized job not found")
        parameterized = parent.get("ParameterizedJob")
        if not parameterized or parent.get("Dispatched"):
            raise NomadHTTPError(500, f'Specified job "{job_id}" is not a parameterized job')
        if parent.get("Stop"):
            raise NomadHTTPError(500, f'Specified job "{job_id}" is stopped')
        data = payload or b""
        mode = parameterized.get("Payload") or "optional"
        if mode == "required" and not data:
            raise NomadHTTPError(500, "Payload is not provided but required by parameterized job")
        if mode == "forbidden" and data:
            raise NomadHTTPError(500, "Payload provided but forbidden by parameterized job")
        if len(data) > DISPATCH_PAYLOAD_LIMIT:
            raise NomadHTTPError(
                500, f"Payload exceeds maximum size; {len(data)} > {DISPATCH_PAYLOAD_LIMIT}"
            )
        required = list(parameterized.get("MetaRequired") or [])
        allowed = set(required) | set(parameterized.get("MetaOptional") or [])
        unpermitted = sorted(k for k in meta if k not in allowed)
        if unpermitted:
            raise NomadHTTPError(
                500, f"Dispatch request included unpermitted metadata keys: {_go_list(unpermitted)}"
            )
        missing = sorted(k for k in required if k not in meta)
        if missing:
            raise NomadHTTPError(
                500, f"Dispatch did not provide required meta keys: {_go_list(missing)}"
            )
        if idempotency_token:
            for child in self.state.rows("jobs"):
                if (
                    child.get("ParentID") == job_id
                    and child["Namespace"] == namespace
                    and child.get("DispatchIdempotencyToken") == idempotency_token
                ):
                    return _write_response(
                        self.state.index,
                        DispatchedJobID=child["ID"],
                        EvalID="",
                        EvalCreateIndex=0,
                        JobCreateIndex=child["CreateIndex"],
                    )
        suffix = f"{int(time.time())}-{new_uuid()[:8]}"
        if id_prefix_template:
            suffix = f"{id_prefix_template}-{suffix}"
        child_id = f"{job_id}/dispatch-{suffix}"
        child = {k: v for k, v in parent.items() if k not in jobspec.SERVER_SET_FIELDS}
        child.update(
            ID=child_id,
            Name=child_id,
            ParentID=job_id,
            Dispatched=True,
            ParameterizedJob=None,
            Periodic=None,
            Stop=False,
            Meta={**(parent.get("Meta") or {}), **meta} or None,
            Payload=base64.b64encode(data).decode() if data else None,
            DispatchIdempotencyToken=idempotency_token,
        )
        txn = _Txn(self, "JobRegistered")
        stored = self._store_job_version(txn, child, None)
        response = await self._finish_register(txn, stored, 0)
        return _write_response(
            response["Index"],
            DispatchedJobID=child_id,
            EvalID=response["EvalID"],
            EvalCreateIndex=response["EvalCreateIndex"],
            JobCreateIndex=stored["CreateIndex"],
        )

    async def evaluate_job(
        self, namespace: str, job_id: str, *, force_reschedule: bool = False
    ) -> Obj:
        """A new evaluation of the job (``/v1/job/:id/evaluate``); ``force_reschedule`` also
        replaces failed allocations whose reschedule budget is spent."""
        job = self.state.get("jobs", row_key(namespace, job_id))
        if job is None:
            raise NomadHTTPError(404, "job not found")
        if job.get("Periodic"):
            raise NomadHTTPError(500, "can't evaluate periodic job")
        if job.get("ParameterizedJob"):
            raise NomadHTTPError(500, "can't evaluate parameterized job")
        txn = _Txn(self, "JobRegistered")
        if force_reschedule:
            for alloc in txn.job_allocs(row_key(namespace, job_id)):
                if (
                    _same_instance(alloc, job)
                    and alloc["ClientStatus"] == "failed"
                    and not alloc.get("NextAllocation")
                ):
                    transition = {**(alloc.get("DesiredTransition") or {}), "ForceReschedule": True}
                    txn.put(
                        "allocs",
                        alloc["ID"],
                        {
                            **alloc,
                            "DesiredTransition": transition,
                            "ModifyIndex": txn.index,
                            "AllocModifyIndex": txn.index,
                            "ModifyTime": txn.now,
                        },
                        "AllocationUpdateDesiredStatus",
                    )
        evaluation = self._new_eval(txn, job, "job-register")
        txn.put_eval(evaluation)
        index = await txn.commit()
        return _write_response(
            index,
            EvalID=evaluation["ID"],
            EvalCreateIndex=txn.index,
            JobModifyIndex=job["JobModifyIndex"],
        )

    async def stop_allocation(self, alloc_id: str) -> Obj:
        """Stop the allocation and place a replacement (Nomad's ``/allocation/:id/stop``)."""
        alloc = self.state.get("allocs", alloc_id)
        if alloc is None:
            raise NomadHTTPError(404, "alloc not found")
        txn = _Txn(self, "AllocationUpdateDesiredStatus")
        transition = {**(alloc.get("DesiredTransition") or {}), "Migrate": True}
        txn.put(
            "allocs",
            alloc_id,
            {
                **alloc,
                "DesiredTransition": transition,
                "ModifyIndex": txn.index,
                "AllocModifyIndex": txn.index,
                "ModifyTime": txn.now,
            },
        )
        job = self.state.get("jobs", row_key(alloc["Namespace"], alloc["JobID"])) or alloc["Job"]
        evaluation = self._new_eval(txn, job, "alloc-stop")
        txn.put_eval(evaluation)
        index = await txn.commit()
        return {"EvalID": evaluation["ID"], "Index": index}

    async def reap(self, job_keys: list[str], eval_ids: list[str], alloc_ids: list[str]) -> int:
        """Delete what garbage collection chose, in one commit (Nomad's batch reap).

        Each purged job is announced as a ``JobBatchDeregistered`` Job event. The caller must
        choose the rows and call this without awaiting in between (single-writer rule).
        """
        txn = _Txn(self, "JobBatchDeregistered")
        for alloc_id in alloc_ids:
            txn.put("allocs", alloc_id, None)
        for eval_id in eval_ids:
            txn.put("evals", eval_id, None)
        for job_key in job_keys:
            job = self.state.get("jobs", job_key)
            if job is None:
                continue
            txn.delete_job(
                job_key,
                Event("Job", "JobBatchDeregistered", job["ID"], job["Namespace"], {"Job": job}),
            )
        return await txn.commit()

    def has_alloc_runner(self, alloc_id: str) -> bool:
        """Whether the client still runs (or is finishing) the allocation's tasks."""
        return alloc_id in self._runners

    # -- scheduling ------------------------------------------------------------------------

    def index_changes(self, puts: dict[tuple[str, str], Obj | None]) -> None:
        for (table, key), value in puts.items():
            if table in ("allocs", "evals") and value is None:
                # Garbage collection deletes rows: the stored row still names its job.
                removed = self.state.get(table, key)
                by_job = self.allocs_by_job if table == "allocs" else self.evals_by_job
                if removed is not None:
                    job_key = row_key(removed["Namespace"], removed["JobID"])
                    keys = by_job.get(job_key, set())
                    keys.discard(key)
                    if not keys:
                        by_job.pop(job_key, None)
            elif table == "allocs" and value is not None:
                self.allocs_by_job.setdefault(
                    row_key(value["Namespace"], value["JobID"]), set()
                ).add(key)
            elif table == "evals" and value is not None:
                self.evals_by_job.setdefault(
                    row_key(value["Namespace"], value["JobID"]), set()
                ).add(key)
            elif table == "job_versions":
                job_key = key.rsplit("\x00", 1)[0]
                versions = self.versions_by_job.setdefault(job_key, set())
                if value is None:
                    versions.discard(key)
                else:
                    versions.add(key)

    def schedule_eval(self, evaluation: Obj) -> None:
        """Queue a pending evaluation now, or at its ``WaitUntil`` for delayed reschedules."""
        if self._stopping:
            return
        delay = (_parse_rfc3339(evaluation["WaitUntil"]) - now_ns()) / 1e9
        if delay <= 0:
            self._eval_queue.put_nowait(evaluation["ID"])
            return
        loop = asyncio.get_running_loop()
        eval_id = evaluation["ID"]

        def fire() -> None:
            self._timers.pop(eval_id, None)
            self._eval_queue.put_nowait(eval_id)

        self._timers[eval_id] = loop.call_later(delay, fire)

    async def _eval_loop(self) -> None:
        while True:
            batch = [await self._eval_queue.get()]
            while not self._eval_queue.empty() and len(batch) < MAX_BATCH:
                batch.append(self._eval_queue.get_nowait())
            try:
                await self._process_evals(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Retry one by one so a single bad evaluation fails alone.
                for eval_id in batch:
                    try:
                        await self._process_evals([eval_id])
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        log.exception("evaluation failed", extra={"eval_id": eval_id})
                        await self._fail_eval(eval_id)
            # An in-memory commit never suspends: yield so a burst cannot starve the loop.
            await asyncio.sleep(0)

    async def _fail_eval(self, eval_id: str) -> None:
        evaluation = self.state.get("evals", eval_id)
        if evaluation is None or evaluation["Status"] != "pending":
            return
        txn = _Txn(self, "EvaluationUpdated")
        txn.put(
            "evals",
            eval_id,
            {
                **evaluation,
                "Status": "failed",
                "StatusDescription": "evaluation reached delivery limit (internal error)",
                "ModifyIndex": txn.index,
                "ModifyTime": txn.now,
            },
        )
        await txn.commit()

    async def _process_evals(self, eval_ids: list[str]) -> None:
        """Plan every queued evaluation into one commit (Nomad's plan applier batches too)."""
        txn = _Txn(self, "PlanResult")
        placed: list[Obj] = []
        stopped: list[str] = []
        for eval_id in eval_ids:
            self._plan(txn, eval_id, placed, stopped)
        await txn.commit()
        for alloc in placed:
            self._start_runner(alloc)
        for alloc_id in stopped:
            runner = self._runners.get(alloc_id)
            if runner is not None:
                runner.request_stop()

    def _plan(self, txn: _Txn, eval_id: str, placed: list[Obj], stopped: list[str]) -> None:
        """Reconcile one evaluation's job against its allocations, inside ``txn``."""
        evaluation = txn.get("evals", eval_id)
        if evaluation is None or evaluation["Status"] != "pending":
            return
        job_key = row_key(evaluation["Namespace"], evaluation["JobID"])
        job = txn.get("jobs", job_key)
        allocs = txn.job_allocs(job_key)
        if job is not None:
            allocs = [a for a in allocs if _same_instance(a, job)]
        for other in txn.job_evals(job_key):
            if other["Status"] == "blocked":
                txn.put_eval(
                    {
                        **other,
                        "Status": "canceled",
                        "StatusDescription": "evaluation superseded by a newer evaluation",
                        "ModifyIndex": txn.index,
                        "ModifyTime": txn.now,
                    },
                    "EvaluationUpdated",
                )
        runnable = (
            job is not None
            and not job.get("Stop")
            and not job.get("ParameterizedJob")
            and not job.get("Periodic")
        )
        groups = {g["Name"]: g for g in job["TaskGroups"]} if job is not None and runnable else {}
        # Everything of a stopped or purged job, or of a group that no longer exists, stops.
        for alloc in allocs:
            if not scheduler.alloc_terminal(alloc) and alloc["TaskGroup"] not in groups:
                self._stop_alloc(txn, alloc, "alloc not needed due to job update")
                stopped.append(alloc["ID"])
        failed_groups: dict[str, Obj] = {}
        queued: dict[str, int] = {}
        assert job is not None or not groups
        for name, group in groups.items():
            assert job is not None
            to_place = self._reconcile_group(
                txn, evaluation=evaluation, job=job, group=group, allocs=allocs, stopped=stopped
            )
            queued[name] = 0
            if not to_place:
                continue
            feasible, metric = scheduler.check_placement(self.node, job, group)
            if not feasible:
                metric["CoalescedFailures"] = len(to_place) - 1
                failed_groups[name] = metric
                queued[name] = len(to_place)
                continue
            for slot, previous in to_place:
                placed.append(
                    self._place(
                        txn,
                        evaluation=evaluation,
                        job=job,
                        group=group,
                        slot=slot,
                        previous=previous,
                        metric=metric,
                    )
                )
        completed = {
            **evaluation,
            "Status": "complete",
            "QueuedAllocations": queued or None,
            "FailedTGAllocs": failed_groups or None,
            "SnapshotIndex": self.state.index,
            "ModifyIndex": txn.index,
            "ModifyTime": txn.now,
        }
        if failed_groups and job is not None:
            blocked = self._new_eval(
                txn,
                job,
                "queued-allocs",
                status="blocked",
                StatusDescription="created to place remaining allocations",
                PreviousEval=eval_id,
                ClassEligibility={},
            )
            txn.put_eval(blocked, "EvaluationUpdated")
            completed["BlockedEval"] = blocked["ID"]
        txn.put_eval(completed, "EvaluationUpdated")

    def _reconcile_group(
        self,
        txn: _Txn,
        *,
        evaluation: Obj,
        job: Obj,
        group: Obj,
        allocs: list[Obj],
        stopped: list[str],
    ) -> list[tuple[int, Obj | None]]:
        """Decide each slot ``job.group[i]``: keep, stop, replace or reschedule.

        Returns the slots to place, each with the allocation it replaces (or None).
        """
        name = group["Name"]
        batch = job["Type"] in ("batch", "sysbatch")
        latest: dict[int, Obj] = {}
        for alloc in allocs:
            if alloc["TaskGroup"] != name:
                continue
            slot = _slot(alloc["Name"])
            if slot not in latest or alloc["CreateIndex"] > latest[slot]["CreateIndex"]:
                latest[slot] = alloc
        to_place: list[tuple[int, Obj | None]] = []
        count = int(group["Count"])
        for slot, alloc in latest.items():
            if slot >= count and not scheduler.alloc_terminal(alloc):
                self._stop_alloc(txn, alloc, "alloc not needed due to job update")
                stopped.append(alloc["ID"])
        for slot in range(count):
            found = latest.get(slot)
            if found is None:
                to_place.append((slot, None))
                continue
            alloc = found
            current = alloc["JobVersion"] == job["Version"]
            migrate = bool((alloc.get("DesiredTransition") or {}).get("Migrate"))
            if not scheduler.alloc_terminal(alloc):
                if not current:
                    self._stop_alloc(txn, alloc, "alloc is being updated due to job update")
                    stopped.append(alloc["ID"])
                    to_place.append((slot, alloc))
                elif migrate:
                    self._stop_alloc(txn, alloc, "alloc is being migrated")
                    stopped.append(alloc["ID"])
                    to_place.append((slot, alloc))
                continue
            if not current:
                # Terminal work of an older version does not count toward the new one.
                to_place.append((slot, None))
                continue
            status = alloc["ClientStatus"]
            # A service's finished work is replaced; a batch job's finished work counts.
            service_done = status == "complete" and not batch and alloc["DesiredStatus"] == "run"
            reschedule = (
                status in ("failed", "lost")
                and not alloc.get("NextAllocation")
                and self._reschedule_due(txn, evaluation, job, alloc)
            )
            if service_done or reschedule:
                to_place.append((slot, alloc))
        return to_place

    def _reschedule_due(self, txn: _Txn, evaluation: Obj, job: Obj, alloc: Obj) -> bool:
        """Whether a failed allocation is replaced now; else maybe set up a follow-up eval."""
        if (alloc.get("DesiredTransition") or {}).get("ForceReschedule"):
            return True
        if not scheduler.reschedule_eligible(alloc, txn.now):
            return False
        due = scheduler.reschedule_time(alloc)
        if due <= txn.now or alloc.get("FollowupEvalID") == evaluation["ID"]:
            return True
        followup_id = alloc.get("FollowupEvalID")
        if followup_id:
            followup = txn.get("evals", followup_id)
            if followup is not None and followup["Status"] == "pending":
                return False
        followup = self._new_eval(
            txn,
            job,
            "alloc-failure",
            StatusDescription="created for delayed rescheduling",
            PreviousEval=evaluation["ID"],
            Wait=max(due - txn.now, 0),
            WaitUntil=rfc3339(due),
        )
        txn.put_eval(followup, "EvaluationUpdated")
        txn.put(
            "allocs",
            alloc["ID"],
            {
                **alloc,
                "FollowupEvalID": followup["ID"],
                "ModifyIndex": txn.index,
                "AllocModifyIndex": txn.index,
                "ModifyTime": txn.now,
            },
        )
        return False

    def _stop_alloc(self, txn: _Txn, alloc: Obj, description: str) -> None:
        current = txn.get("allocs", alloc["ID"]) or alloc
        txn.put(
            "allocs",
            alloc["ID"],
            {
                **current,
                "DesiredStatus": "stop",
                "DesiredDescription": description,
                "ModifyIndex": txn.index,
                "AllocModifyIndex": txn.index,
                "ModifyTime": txn.now,
            },
        )

    def _place(
        self,
        txn: _Txn,
        *,
        evaluation: Obj,
        job: Obj,
        group: Obj,
        slot: int,
        previous: Obj | None,
        metric: Obj,
    ) -> Obj:
        alloc_id = new_uuid()
        tracker = None
        if previous is not None:
            previous = txn.get("allocs", previous["ID"]) or previous
            updates: Obj = {"NextAllocation": alloc_id}
            if previous["ClientStatus"] in ("failed", "lost"):
                policy = scheduler.reschedule_policy(previous) or {}
                delay = scheduler.next_delay(previous)
                interval = int(policy.get("Interval") or 0)
                events = [
                    e
                    for e in (previous.get("RescheduleTracker") or {}).get("Events") or []
                    if policy.get("Unlimited") or txn.now - int(e["RescheduleTime"]) < interval
                ]
                events.append(
                    {
                        "RescheduleTime": txn.now,
                        "PrevAllocID": previous["ID"],
                        "PrevNodeID": previous["NodeID"],
                        "Delay": delay,
                    }
                )
                tracker = {"Events": events, "LastReschedule": "Rescheduled"}
                if previous["DesiredStatus"] == "run":
                    updates.update(
                        DesiredStatus="stop",
                        DesiredDescription="alloc was rescheduled because it failed",
                    )
            txn.put(
                "allocs",
                previous["ID"],
                {
                    **previous,
                    **updates,
                    "ModifyIndex": txn.index,
                    "AllocModifyIndex": txn.index,
                    "ModifyTime": txn.now,
                },
            )
        task_resources = {
            t["Name"]: {
                "Cpu": {"CpuShares": t["Resources"]["CPU"], "ReservedCores": None},
                "Memory": {
                    "MemoryMB": t["Resources"]["MemoryMB"],
                    "MemoryMaxMB": t["Resources"].get("MemoryMaxMB") or 0,
                },
                "Networks": None,
                "Devices": None,
            }
            for t in group["Tasks"]
        }
        cpu, memory = scheduler.group_resources(group)
        disk = int((group.get("EphemeralDisk") or {}).get("SizeMB") or 0)
        alloc = {
            "ID": alloc_id,
            "Namespace": job["Namespace"],
            "EvalID": evaluation["ID"],
            "Name": f"{job['ID']}.{group['Name']}[{slot}]",
            "NodeID": self.node["ID"],
            "NodeName": self.node["Name"],
            "JobID": job["ID"],
            "Job": job,
            "JobVersion": job["Version"],
            "TaskGroup": group["Name"],
            "Resources": {"CPU": cpu, "MemoryMB": memory, "DiskMB": disk},
            "SharedResources": {"DiskMB": disk},
            "TaskResources": {
                t["Name"]: {"CPU": t["Resources"]["CPU"], "MemoryMB": t["Resources"]["MemoryMB"]}
                for t in group["Tasks"]
            },
            "AllocatedResources": {
                "Tasks": task_resources,
                "TaskLifecycles": {t["Name"]: t.get("Lifecycle") for t in group["Tasks"]},
                "Shared": {"DiskMB": disk, "Networks": None, "Ports": None},
            },
            "Metrics": metric,
            "DesiredStatus": "run",
            "DesiredDescription": "",
            "DesiredTransition": {"Migrate": None, "Reschedule": None, "ForceReschedule": None},
            "ClientStatus": "pending",
            "ClientDescription": "",
            "TaskStates": None,
            "AllocStates": None,
            "PreviousAllocation": previous["ID"] if previous is not None else "",
            "NextAllocation": "",
            "DeploymentID": "",
            "DeploymentStatus": None,
            "RescheduleTracker": tracker,
            "NetworkStatus": None,
            "FollowupEvalID": "",
            "PreemptedAllocations": None,
            "PreemptedByAllocation": "",
            "CreateIndex": txn.index,
            "ModifyIndex": txn.index,
            "AllocModifyIndex": txn.index,
            "CreateTime": txn.now,
            "ModifyTime": txn.now,
        }
        txn.put("allocs", alloc_id, alloc)
        return alloc

    # -- periodic jobs ---------------------------------------------------------------------

    async def _periodic_loop(self) -> None:
        """Launch children of periodic jobs at their cron times (Nomad's periodic dispatcher)."""
        while True:
            self._periodic_wake.clear()
            now = time.time()
            soonest: float | None = None
            due: list[tuple[Obj, float]] = []
            live: set[str] = set()
            for job in self.state.rows("jobs"):
                periodic = job.get("Periodic") or {}
                if not periodic.get("Enabled") or job.get("Stop"):
                    continue
                key = row_key(job["Namespace"], job["ID"])
                live.add(key)
                launch = jobspec.next_periodic_launch(
                    periodic, self._periodic_last.setdefault(key, now)
                )
                if launch is None:
                    continue
                if launch <= now:
                    due.append((job, launch))
                elif soonest is None or launch < soonest:
                    soonest = launch
            for key in set(self._periodic_last) - live:
                del self._periodic_last[key]
            for job, launch in due:
                self._periodic_last[row_key(job["Namespace"], job["ID"])] = launch
                try:
                    await self._launch_periodic(job, launch)
                except NomadHTTPError:
                    log.exception("periodic launch failed", extra={"job_id": job["ID"]})
            if due:
                continue
            timeout = None if soonest is None else max(soonest - time.time(), 0.0)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._periodic_wake.wait()

    async def _launch_periodic(self, parent: Obj, launch: float) -> None:
        namespace, parent_id = parent["Namespace"], parent["ID"]
        children = [
            j
            for j in self.state.rows("jobs")
            if j.get("ParentID") == parent_id and j["Namespace"] == namespace
        ]
        if parent["Periodic"].get("ProhibitOverlap") and any(
            c["Status"] != "dead" for c in children
        ):
            return
        child_id = f"{parent_id}/periodic-{int(launch)}"
        if self.state.get("jobs", row_key(namespace, child_id)) is not None:
            return
        child = {k: v for k, v in parent.items() if k not in jobspec.SERVER_SET_FIELDS}
        child.update(ID=child_id, Name=child_id, ParentID=parent_id, Periodic=None, Stop=False)
        txn = _Txn(self, "JobRegistered")
        stored = self._store_job_version(txn, child, None)
        txn.put_eval(self._new_eval(txn, stored, "periodic-job"))
        await txn.commit()

    # -- the client ------------------------------------------------------------------------

    def _start_runner(self, alloc: Obj) -> None:
        if self._stopping:
            return
        runner = AllocRunner(
            alloc=alloc,
            alloc_dir=self.alloc_dir(alloc["ID"]),
            node=self.node,
            host_env=self._host_env,
            variables=self,
            report=self._report,
            log_written=self._log_written,
        )
        alloc_id = alloc["ID"]
        self._runners[alloc_id] = runner
        task = asyncio.create_task(runner.run(), name=f"devagent-alloc-{alloc_id[:8]}")
        self._runner_tasks[alloc_id] = task

        def finished(_: asyncio.Task[None]) -> None:
            self._runners.pop(alloc_id, None)
            self._runner_tasks.pop(alloc_id, None)

        task.add_done_callback(finished)

    def _report(self, alloc_id: str, task_states: dict[str, Obj]) -> None:
        self._dirty[alloc_id] = task_states
        self._flush_wake.set()

    async def _flush_loop(self) -> None:
        while True:
            await self._flush_wake.wait()
            self._flush_wake.clear()
            try:
                await self._flush_dirty(limit=MAX_BATCH)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("client update failed")
            if self._dirty:
                # More than one batch waits: let HTTP handlers run before the next one.
                self._flush_wake.set()
                await asyncio.sleep(0)

    async def _flush_dirty(self, *, limit: int | None = None) -> None:
        """Commit reported task-state changes (at most ``limit`` allocations) in one commit."""
        if limit is None or len(self._dirty) <= limit:
            dirty, self._dirty = self._dirty, {}
        else:
            dirty = {k: self._dirty.pop(k) for k in list(self._dirty)[:limit]}
        if not dirty:
            return
        txn = _Txn(self, "AllocationUpdated")
        for alloc_id, task_states in dirty.items():
            alloc = txn.get("allocs", alloc_id)
            if alloc is None:
                continue
            states = {name: {**s, "Events": list(s["Events"])} for name, s in task_states.items()}
            status, description = scheduler.client_status(states)
            txn.put(
                "allocs",
                alloc_id,
                {
                    **alloc,
                    "TaskStates": states,
                    "ClientStatus": status,
                    "ClientDescription": description,
                    "ModifyIndex": txn.index,
                    "ModifyTime": txn.now,
                },
            )
            if status == "failed" and alloc["ClientStatus"] != "failed":
                self._eval_for_failure(txn, alloc)
        await txn.commit()

    def _eval_for_failure(self, txn: _Txn, alloc: Obj) -> None:
        """A failed allocation gets an ``alloc-failure`` evaluation if it could be rescheduled."""
        if alloc["DesiredStatus"] != "run":
            return
        job = txn.get("jobs", row_key(alloc["Namespace"], alloc["JobID"]))
        if job is None or job.get("Stop") or not _same_instance(alloc, job):
            return
        policy = scheduler.reschedule_policy(alloc) or {}
        if int(policy.get("Attempts") or 0) <= 0 and not policy.get("Unlimited"):
            return
        txn.put_eval(self._new_eval(txn, job, "alloc-failure"))


def _slot(name: str) -> int:
    start = name.rfind("[")
    return int(name[start + 1 : -1])


def _known_signal(name: str) -> bool:
    return name in signal.Signals.__members__


def _parse_rfc3339(text: str) -> int:
    """Unix ns of an RFC3339(Nano) UTC timestamp; Go's zero time gives 0."""
    if not text or text.startswith("0001-"):
        return 0
    main, _, fraction = text.removesuffix("Z").partition(".")
    stamp = datetime.datetime.fromisoformat(main).replace(tzinfo=datetime.UTC)
    return int(stamp.timestamp()) * 1_000_000_000 + int((fraction or "0").ljust(9, "0")[:9])


def _existing_parent(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def _cpu_mhz() -> int:
    """The CPU frequency Nomad's fingerprinter would report (``cpu MHz`` of /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":", 1)[1]))
    except (OSError, ValueError):
        pass
    return 2000
