"""Deleting a GitRepository (real git repositories, the real store): its ``prune`` finalizer
deletes what it applied when ``prune`` is on and keeps it when off, as Flux does."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from run_harness import Stack
from test_gitrepository import OWNER, REQUEST, Env, Repo, flow_yaml, new_env

from nomad_pipeline.controller.apply import apply
from nomad_pipeline.errors import NotFound
from nomad_pipeline.reconcilers.gitrepository import OWNER_LABEL
from nomad_pipeline.resources.kinds import Flow, GitRepository, Namespace

NAMESPACE_YAML = """\
apiVersion: nomad-pipeline.io/v1
kind: Namespace
metadata:
  name: team
"""
DEADLINE = 30.0


@pytest.fixture
async def env(tmp_path: Path) -> Env:
    return await new_env(tmp_path)


async def applied_repository(env: Env, *, prune: bool) -> GitRepository:
    """The repository applied as a user would (so with its finalizer) and synced once."""
    env.repo.write("ns.yaml", NAMESPACE_YAML)
    env.repo.write("build.yaml", flow_yaml("build"))
    env.repo.write("team/deploy.yaml", flow_yaml("deploy", namespace="team"))
    env.repo.commit()
    repository = GitRepository.model_validate(
        {
            "kind": "GitRepository",
            "metadata": {"name": "apps", "namespace": "default"},
            "spec": {"url": env.repo.url, "interval": "1m", "prune": prune},
        }
    )
    await apply(env.store, repository)
    synced = await env.reconcile()
    assert synced.metadata.finalizers == ["nomad-pipeline.io/prune"]
    assert synced.status.last_applied_revision is not None, synced.status
    return synced


async def owned(env: Env) -> list[str]:
    names: list[str] = []
    for kind in (Namespace, Flow):
        listed = await env.store.list(kind, None, selector={OWNER_LABEL: OWNER})
        names += [f"{kind.KIND}/{item.metadata.name}" for item in listed.items]
    return sorted(names)


async def test_deleting_a_pruning_repository_deletes_what_it_applied(env: Env) -> None:
    await applied_repository(env, prune=True)
    # Not applied by the repository: never touched.
    await env.store.create(
        Flow.model_validate(
            {
                "metadata": {"name": "mine", "namespace": "default"},
                "spec": {"inline": {"steps": [{"name": "a", "run": "true"}]}},
            }
        )
    )
    assert await owned(env) == ["Flow/build", "Flow/deploy", "Namespace/team"]

    marked = await env.store.delete(GitRepository, "default", "apps")
    assert marked.metadata.deleting
    await env.reconciler.reconcile(REQUEST)

    assert await owned(env) == []
    with pytest.raises(NotFound):
        await env.repository()
    assert await env.flow("mine") is not None


@pytest.mark.parametrize(
    ("prune", "suspend"), [(False, False), (True, True)], ids=["no-prune", "suspended"]
)
async def test_deleting_a_repository_without_prune_keeps_its_objects(
    env: Env, prune: bool, suspend: bool
) -> None:
    await applied_repository(env, prune=prune)
    if suspend:
        await env.update_spec(suspend=True)
    # A commit after the deletion is never applied: the repository only finalizes now.
    env.repo.write("late.yaml", flow_yaml("late"))
    env.repo.commit()
    env.clock.advance(61)

    await env.store.delete(GitRepository, "default", "apps")
    await env.reconciler.reconcile(REQUEST)

    with pytest.raises(NotFound):
        await env.repository()
    assert await owned(env) == ["Flow/build", "Flow/deploy", "Namespace/team"]
    assert await env.flow("late") is None


async def test_deleting_through_the_running_controller_prunes(stack: Stack, tmp_path: Path) -> None:
    repo = Repo(tmp_path / "repo")
    repo.write("build.yaml", flow_yaml("build"))
    repo.commit()
    item = {
        "apiVersion": "nomad-pipeline.io/v1",
        "kind": "GitRepository",
        "metadata": {"name": "apps", "namespace": "default"},
        "spec": {"url": repo.url, "interval": "1h", "prune": True},
    }
    base = f"{stack.address}/apis/nomad-pipeline.io/v1"
    async with stack.http.put(f"{base}/apply", json={"items": [item]}) as response:
        assert response.status == 200, await response.text()
    await poll(lambda: flow_exists(stack, "build"), True, "the flow applied")

    async with stack.http.delete(f"{base}/namespaces/default/gitrepositories/apps") as response:
        body = await response.json()
        assert response.status == 202, body
        assert body["metadata"]["deletion_timestamp"]

    await poll(lambda: flow_exists(stack, "build"), False, "the flow pruned")
    await poll(lambda: repository_exists(stack), False, "the repository deleted")


async def flow_exists(stack: Stack, name: str) -> bool:
    try:
        await stack.app.store.get(Flow, "default", name)
    except NotFound:
        return False
    return True


async def repository_exists(stack: Stack) -> bool:
    try:
        await stack.app.store.get(GitRepository, "default", "apps")
    except NotFound:
        return False
    return True


async def poll(check: Callable[[], Awaitable[bool]], wanted: bool, what: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    while await check() != wanted:
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
