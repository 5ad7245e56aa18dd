"""Helpers for the engine tests: a started Engine over a real StateStore, jobs, waiting."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from nomad_pipeline.devagent.engine import Engine
from nomad_pipeline.devagent.state import StateStore, row_key

T = TypeVar("T")

SH = "/bin/sh"
MS = 1_000_000
SECOND = 1_000_000_000
NO_RESTART = {"Attempts": 0, "Mode": "fail", "Interval": 86_400 * SECOND, "Delay": 15 * SECOND}
NO_RESCHEDULE = {"Attempts": 0, "Unlimited": False}


@asynccontextmanager
async def running_engine(root: Path, *, persist: bool = False) -> AsyncIterator[Engine]:
    state = StateStore(root / "data" if persist else None)
    await state.open()
    engine = Engine(state, alloc_root=root / "allocs", node_name="test-node")
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()
        await state.close()


def shell_task(script: str, name: str = "main", **fields: Any) -> dict[str, Any]:
    return {
        "Name": name,
        "Driver": "raw_exec",
        "Config": {"command": SH, "args": ["-c", script]},
        **fields,
    }


def batch_job(
    job_id: str,
    script: str = "exit 0",
    *,
    tasks: list[dict[str, Any]] | None = None,
    count: int = 1,
    restart: dict[str, Any] | None = None,
    reschedule: dict[str, Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    return {
        "ID": job_id,
        "Type": "batch",
        "TaskGroups": [
            {
                "Name": "step",
                "Count": count,
                "RestartPolicy": restart if restart is not None else NO_RESTART,
                "ReschedulePolicy": reschedule if reschedule is not None else NO_RESCHEDULE,
                "Tasks": tasks if tasks is not None else [shell_task(script)],
            }
        ],
        **fields,
    }


async def wait_until(engine: Engine, probe: Callable[[], T | None], *, timeout: float = 15.0) -> T:
    """Re-evaluate ``probe`` on every state change until it returns a value (or time out)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        index = engine.state.index
        value = probe()
        if value:
            return value
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise AssertionError(f"condition not reached within {timeout}s")
        await engine.state.wait(("jobs", "allocs", "evals"), index, remaining)


def job(engine: Engine, job_id: str, namespace: str = "default") -> dict[str, Any]:
    found = engine.state.get("jobs", row_key(namespace, job_id))
    assert found is not None, f"job {job_id} not found"
    return found


def job_dead(engine: Engine, job_id: str) -> dict[str, Any] | None:
    found = engine.state.get("jobs", row_key("default", job_id))
    return found if found is not None and found["Status"] == "dead" else None


def eval_complete(engine: Engine, eval_id: str) -> dict[str, Any] | None:
    found = engine.state.get("evals", eval_id)
    return found if found is not None and found["Status"] == "complete" else None


def allocs(engine: Engine, job_id: str) -> list[dict[str, Any]]:
    return engine.job_allocations("default", job_id)


def event_types(alloc: dict[str, Any], task: str = "main") -> list[str]:
    return [e["Type"] for e in alloc["TaskStates"][task]["Events"]]
