"""Helpers for the API tests: a client bound to a running server and object builders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp

from nomad_pipeline.resources.kinds import Run
from nomad_pipeline.resources.meta import Resource
from nomad_pipeline.store.interface import Store

API = "/apis/nomad-pipeline.io/v1"


@dataclass
class Api:
    """A running API server, its store, and a session bound to its address."""

    address: str
    store: Store
    session: aiohttp.ClientSession

    async def call(
        self, method: str, path: str, *, json: Any = None, data: bytes | None = None, **query: str
    ) -> tuple[int, Any]:
        async with self.session.request(
            method, self.address + path, json=json, data=data, params=query or None
        ) as response:
            body = await response.json(content_type=None)
            return response.status, body

    async def apply(self, *items: dict[str, Any], dry_run: bool = False) -> tuple[int, Any]:
        return await self.call(
            "PUT", f"{API}/apply", json={"items": list(items)}, dry_run=str(dry_run).lower()
        )

    async def finish_run(self, namespace: str, name: str) -> None:
        """Mark a run succeeded, as the run reconciler would (runs are deleted once finished)."""
        stored = await self.store.get(Run, namespace, name)
        await self.store.update_status(
            stored.model_copy(
                update={"status": stored.status.model_copy(update={"phase": "success"})}
            )
        )

    async def finish_deletion(self, kind: type[Resource], namespace: str, name: str) -> None:
        """Remove every finalizer of an object being deleted, as its reconciler does once it
        cleaned up (these tests run the API alone); the store then deletes it."""
        stored = await self.store.get(kind, namespace, name)
        assert stored.metadata.deletion_timestamp is not None, "the object is not being deleted"
        await self.store.update(
            stored.model_copy(
                update={"metadata": stored.metadata.model_copy(update={"finalizers": []})}
            )
        )


def namespace(name: str, description: str = "") -> dict[str, Any]:
    return {
        "apiVersion": "nomad-pipeline.io/v1",
        "kind": "Namespace",
        "metadata": {"name": name},
        "spec": {"description": description},
    }


def inline_flow(
    name: str, namespace: str = "default", *, run: str = "echo hello", **metadata: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "nomad-pipeline.io/v1",
        "kind": "Flow",
        "metadata": {"name": name, "namespace": namespace, **metadata},
        "spec": {
            "variables": [{"name": "greeting", "type": "string", "default": "hi"}],
            "inline": {"steps": [{"name": "say", "run": run}]},
        },
    }


def spec_flow(name: str, job: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "nomad-pipeline.io/v1",
        "kind": "Flow",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"specification": {"steps": [{"name": "deploy", "job": job}]}},
    }


def trigger(name: str, flow: str, namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "nomad-pipeline.io/v1",
        "kind": "Trigger",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"flow": flow, "source": {"cron": {"schedules": ["*/5 * * * *"]}}},
    }


def run(name: str, flow: str = "hello", namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "nomad-pipeline.io/v1",
        "kind": "Run",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "flow": flow,
            "flow_spec": inline_flow(flow, namespace)["spec"],
            "variables": {"greeting": "hello"},
        },
    }


def git_repository(name: str, namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "nomad-pipeline.io/v1",
        "kind": "GitRepository",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"url": "https://example.com/pipelines.git"},
    }
