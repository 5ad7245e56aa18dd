"""``sync GITREPO [--wait]`` against the real sync route.

No GitOps reconciler runs here: the test answers the request the way the reconciler does, by
writing the repository's status, and checks what the CLI prints and how it exits.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cli_harness import DEFAULT_NAMESPACE_MANIFEST, Controller, start_controller

from nomad_pipeline.controller.api import gitsync
from nomad_pipeline.resources.kinds import RECONCILE_REQUESTED_ANNOTATION, GitRepository
from nomad_pipeline.resources.meta import Condition

DEADLINE = 30.0

REPOSITORY = (
    DEFAULT_NAMESPACE_MANIFEST
    + """\
---
apiVersion: nomad-pipeline.io/v1
kind: GitRepository
metadata: {name: infra, namespace: default}
spec: {url: "file:///srv/infra.git", ref: {branch: main}, path: manifests}
"""
)


@pytest.fixture
async def with_sync(tmp_path: Path) -> AsyncIterator[Controller]:
    routes: list[Any] = [gitsync.setup]
    async for running in start_controller(tmp_path, routes):
        applied = await running.cli("apply", "-f", "-", stdin=REPOSITORY)
        assert applied.code == 0, applied.err
        yield running


async def requested_mark(controller: Controller, previous: str | None = None) -> str:
    """The annotation value the sync route wrote (polled: the CLI runs in another thread)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while True:
        repository = await controller.store.get(GitRepository, "default", "infra")
        mark = repository.metadata.annotations.get(RECONCILE_REQUESTED_ANNOTATION)
        if mark is not None and mark != previous:
            return mark
        assert loop.time() < deadline, "the sync was never requested"
        await asyncio.sleep(0.02)


async def answer(controller: Controller, mark: str, *, ready: bool) -> None:
    """Write the status a sync leaves behind, as the GitOps reconciler does."""
    repository = await controller.store.get(GitRepository, "default", "infra")
    condition = Condition(
        type="Ready",
        status="True" if ready else "False",
        reason="Applied" if ready else "FetchFailed",
        message="" if ready else "repository not found",
    )
    status = repository.status.model_copy(
        update={
            "last_handled_reconcile_at": mark,
            "last_applied_revision": "main@sha1:abc123" if ready else None,
            "conditions": [condition],
        }
    )
    await controller.store.update_status(repository.model_copy(update={"status": status}))


async def test_sync_requests_a_reconcile(with_sync: Controller) -> None:
    result = await with_sync.cli("sync", "infra")
    assert (result.code, result.err) == (0, "")
    assert result.out == "gitrepository.nomad-pipeline.io/infra sync requested\n"
    assert await requested_mark(with_sync)

    missing = await with_sync.cli("sync", "nope")
    assert missing.code == 1
    assert missing.err.startswith("error: NotFound: ")


async def test_sync_wait_reports_the_revision_or_the_failure(with_sync: Controller) -> None:
    waiting = asyncio.create_task(with_sync.cli("sync", "infra", "--wait"))
    mark = await requested_mark(with_sync)
    await answer(with_sync, mark, ready=True)
    result = await asyncio.wait_for(waiting, DEADLINE)
    assert result.code == 0, result.err
    assert result.out.splitlines() == [
        "gitrepository.nomad-pipeline.io/infra sync requested",
        "gitrepository.nomad-pipeline.io/infra synced: revision main@sha1:abc123",
    ]

    failing = asyncio.create_task(with_sync.cli("sync", "infra", "--wait"))
    second = await requested_mark(with_sync, previous=mark)
    await answer(with_sync, second, ready=False)
    result = await asyncio.wait_for(failing, DEADLINE)
    assert result.code == 1
    assert result.err == (
        "error: SyncFailed: gitrepository.nomad-pipeline.io/infra is not ready after the sync: "
        "repository not found\n"
    )
