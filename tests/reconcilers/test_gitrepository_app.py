"""GitOps through the whole controller (dev agent + ControllerApp): the GitRepository controller
is wired in, the sync route and ``nomad-pipeline sync`` ask for an immediate reconcile, and
``get gitrepositories`` shows revision and readiness."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from pathlib import Path

from run_harness import Stack
from test_gitrepository import Repo, flow_yaml

from nomad_pipeline.cli.main import main
from nomad_pipeline.resources.kinds import Flow, GitRepository

DEADLINE = 30.0


async def cli(address: str, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(
        main, [*argv, "--addr", address], stdin=io.StringIO(""), stdout=out, stderr=err
    )
    return code, out.getvalue(), err.getvalue()


async def wait_repository(
    stack: Stack, until: Callable[[GitRepository], bool], what: str
) -> GitRepository:
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    while True:
        repository = await stack.app.store.get(GitRepository, "default", "apps")
        if until(repository):
            return repository
        if loop.time() > end:
            raise AssertionError(f"GitRepository never got to: {what}; {repository.status!r}")
        await asyncio.sleep(0.02)


async def command_of(stack: Stack, name: str) -> str:
    flow = await stack.app.store.get(Flow, "default", name)
    assert flow.spec.inline is not None
    return flow.spec.inline.steps[0].run


async def test_sync_requests_and_get_through_the_running_controller(
    stack: Stack, tmp_path: Path
) -> None:
    repo = Repo(tmp_path / "repo")
    repo.write("build.yaml", flow_yaml("build", command="one"))
    first = repo.commit()
    await stack.app.store.create(
        GitRepository.model_validate(
            {
                "kind": "GitRepository",
                "metadata": {"name": "apps", "namespace": "default"},
                # An hour: every later sync in this test happens only because it was asked for.
                "spec": {"url": repo.url, "interval": "1h"},
            }
        )
    )
    await wait_repository(stack, lambda r: r.status.last_applied_revision == first, "first sync")
    assert await command_of(stack, "build") == "one"

    repo.write("build.yaml", flow_yaml("build", command="two"))
    second = repo.commit()
    async with stack.http.post(f"{stack.address}/v1/gitrepositories/apps/sync") as response:
        answer = await response.json()
        assert response.status == 202, answer
    synced = await wait_repository(
        stack, lambda r: r.status.last_applied_revision == second, "sync by the route"
    )
    assert synced.status.last_handled_reconcile_at == answer["requested_at"]
    assert await command_of(stack, "build") == "two"

    repo.write("build.yaml", flow_yaml("build", command="three"))
    third = repo.commit()
    code, out, err = await cli(stack.address, "sync", "apps")
    assert code == 0, err
    assert "requested" in out
    await wait_repository(
        stack, lambda r: r.status.last_applied_revision == third, "sync by the CLI"
    )
    assert await command_of(stack, "build") == "three"

    code, out, err = await cli(stack.address, "get", "gitrepositories")
    assert code == 0, err
    header, row = out.splitlines()[:2]
    assert header.split()[:4] == ["NAME", "URL", "READY", "REVISION"]
    assert row.split()[:4] == ["apps", repo.url, "True", third]

    async with stack.http.post(f"{stack.address}/v1/gitrepositories/nope/sync") as response:
        assert response.status == 404
