"""Helpers shared by the dev agent's HTTP tests: a started agent, clients, polling, jobs."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aiohttp
import nomad

from nomad_pipeline.devagent.server import DevAgent, DevAgentConfig

T = TypeVar("T")

SH = "/bin/sh"


@asynccontextmanager
async def running_agent(**overrides: Any) -> AsyncIterator[DevAgent]:
    config = DevAgentConfig(port=0, node_name="test-node", **overrides)
    agent = DevAgent(config)
    await agent.start()
    try:
        yield agent
    finally:
        await agent.stop()


def python_nomad(agent: DevAgent, **kwargs: Any) -> nomad.Nomad:
    """The real python-nomad client pointed at ``agent`` (call it through asyncio.to_thread)."""
    return nomad.Nomad(address=agent.address, timeout=30, **kwargs)


async def eventually(
    probe: Callable[[], Awaitable[T | None]], *, timeout: float = 20.0, interval: float = 0.05
) -> T:
    """Poll ``probe`` until it returns something truthy, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")


def batch_job(
    job_id: str,
    script: str,
    *,
    driver: str = "raw_exec",
    restart_attempts: int = 0,
    restart_delay_ns: int = 1_000_000_000,
    reschedule: dict[str, Any] | None = None,
    count: int = 1,
    meta: dict[str, str] | None = None,
    parameterized: dict[str, Any] | None = None,
    kill_timeout_ns: int = 2_000_000_000,
) -> dict[str, Any]:
    """A one-group, one-task batch job running ``script`` with /bin/sh."""
    job: dict[str, Any] = {
        "ID": job_id,
        "Name": job_id,
        "Type": "batch",
        "Datacenters": ["*"],
        "Meta": meta,
        "TaskGroups": [
            {
                "Name": "step",
                "Count": count,
                "RestartPolicy": {
                    "Attempts": restart_attempts,
                    "Mode": "fail",
                    "Interval": 86_400_000_000_000,
                    "Delay": restart_delay_ns,
                },
                "ReschedulePolicy": reschedule or {"Attempts": 0, "Unlimited": False},
                "Tasks": [
                    {
                        "Name": "main",
                        "Driver": driver,
                        "Config": {"command": SH, "args": ["-c", script]},
                        "KillTimeout": kill_timeout_ns,
                        "Resources": {"CPU": 100, "MemoryMB": 64},
                    }
                ],
            }
        ],
    }
    if parameterized is not None:
        job["ParameterizedJob"] = parameterized
    return job


class Api:
    """A thin aiohttp client returning (status, headers, body) for exact wire assertions."""

    def __init__(self, session: aiohttp.ClientSession, address: str) -> None:
        self.session = session
        self.address = address

    async def call(
        self,
        method: str,
        path: str,
        *,
        params: Any = None,
        json_body: Any = None,
        data: bytes | str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        async with self.session.request(
            method,
            self.address + path,
            params=params,
            json=json_body,
            data=data,
            headers=headers,
        ) as response:
            raw = await response.read()
            content_type = response.headers.get("Content-Type", "")
            body: Any = raw.decode(errors="replace")
            if content_type.startswith("application/json") and raw:
                body = json.loads(raw)
            return response.status, dict(response.headers), body

    async def get(self, path: str, **kwargs: Any) -> tuple[int, dict[str, str], Any]:
        return await self.call("GET", path, **kwargs)

    async def put(self, path: str, **kwargs: Any) -> tuple[int, dict[str, str], Any]:
        return await self.call("PUT", path, **kwargs)

    async def ok(self, method: str, path: str, **kwargs: Any) -> Any:
        status, _, body = await self.call(method, path, **kwargs)
        assert status == 200, (method, path, status, body)
        return body


@asynccontextmanager
async def api_client(agent: DevAgent) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(session, agent.address)


async def wait_job_status(api: Api, job_id: str, status: str, *, timeout: float = 30.0) -> Any:
    async def probe() -> Any:
        code, _, body = await api.get(f"/v1/job/{job_id}")
        return body if code == 200 and body["Status"] == status else None

    return await eventually(probe, timeout=timeout)


async def job_allocations(api: Api, job_id: str) -> list[dict[str, Any]]:
    allocations: list[dict[str, Any]] = await api.ok("GET", f"/v1/job/{job_id}/allocations")
    return allocations
