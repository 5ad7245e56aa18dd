"""GitOps sync against real git repositories in tmp_path (git CLI) and the real memory store.

The reconciler is called directly, on a clock the test moves, so "the interval passed" and "a
sync was requested" are decided by the test, not by waiting.
"""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from nomad_pipeline.controller.runtime import Request
from nomad_pipeline.controller.secrets import SecretResolver
from nomad_pipeline.reconcilers.gitrepository import OWNER_LABEL, GitRepositoryReconciler
from nomad_pipeline.reconcilers.gitsource import GitMirrors
from nomad_pipeline.resources.kinds import (
    RECONCILE_REQUESTED_ANNOTATION,
    Flow,
    GitRepository,
    Namespace,
    Trigger,
)
from nomad_pipeline.resources.meta import ObjectMeta
from nomad_pipeline.store.memory import MemoryStore

REPO_ROOT = Path(__file__).resolve().parents[2]
OWNER = "default.apps"
REQUEST = Request("GitRepository", "default", "apps")


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Repo:
    """A local git repository the test commits to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True)
        self.git("init", "--quiet", "--initial-branch=main")
        self.git("config", "user.email", "dev@example.com")
        self.git("config", "user.name", "Dev")

    @property
    def url(self) -> str:
        return f"file://{self.path}"

    def git(self, *args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=self.path, check=True, capture_output=True, text=True
        )
        return done.stdout.strip()

    def write(self, relative: str, text: str) -> None:
        target = self.path / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def remove(self, relative: str) -> None:
        (self.path / relative).unlink()

    def commit(self, message: str = "change") -> str:
        self.git("add", "--all")
        self.git("commit", "--quiet", "--allow-empty", "-m", message)
        return self.git("rev-parse", "HEAD")


def flow_yaml(name: str, command: str = "true", namespace: str = "default") -> str:
    return f"""\
apiVersion: nomad-pipeline.io/v1
kind: Flow
metadata:
  name: {name}
  namespace: {namespace}
spec:
  inline:
    runner: {{driver: raw_exec}}
    steps:
      - name: a
        run: "{command}"
"""


SEED_HCL_FLOW = """\
flow "seed-hcl" {
  namespace = "default"
  inline "seed-hcl-job" {
    runner {
      nomad_on_demand {
        namespace = "default"
      }
    }
    step "hello" {
      run = "echo hello"
    }
  }
}
"""


class Env:
    def __init__(self, tmp_path: Path, store: MemoryStore) -> None:
        self.store = store
        self.clock = Clock()
        self.repo = Repo(tmp_path / "repo")
        self.reconciler = GitRepositoryReconciler(
            store,
            mirrors=GitMirrors(tmp_path / "git-cache"),
            secrets=SecretResolver(None),
            clock=self.clock,
        )

    async def create_repository(self, **spec: Any) -> GitRepository:
        repository = GitRepository.model_validate(
            {
                "kind": "GitRepository",
                "metadata": {"name": "apps", "namespace": "default"},
                "spec": {"url": self.repo.url, "interval": "1m", **spec},
            }
        )
        created: GitRepository = await self.store.create(repository)
        return created

    async def update_spec(self, **spec: Any) -> None:
        current = await self.repository()
        changed = current.model_copy(
            update={"spec": current.spec.model_copy(update=spec)}, deep=True
        )
        await self.store.update(changed)

    async def repository(self) -> GitRepository:
        found: GitRepository = await self.store.get(GitRepository, "default", "apps")
        return found

    async def reconcile(self) -> GitRepository:
        await self.reconciler.reconcile(REQUEST)
        return await self.repository()

    async def next_interval(self) -> GitRepository:
        self.clock.advance(61)
        return await self.reconcile()

    async def flow(self, name: str, namespace: str = "default") -> Flow | None:
        flows = await self.store.list(Flow, namespace)
        return next((f for f in flows.items if f.metadata.name == name), None)


async def new_env(tmp_path: Path) -> Env:
    """A memory store holding the default namespace, and the repositories' scratch space."""
    store = MemoryStore()
    await store.start()
    await store.create(Namespace(metadata=ObjectMeta(name="default", namespace=""), spec={}))
    return Env(tmp_path, store)


@pytest.fixture
async def env(tmp_path: Path) -> Env:
    return await new_env(tmp_path)


def ready(repository: GitRepository) -> tuple[str, str, str]:
    condition = repository.status.condition("Ready")
    assert condition is not None
    return condition.status, condition.reason, condition.message


async def test_add_change_and_remove_a_flow_without_prune(env: Env) -> None:
    env.repo.write("flows/build.yaml", flow_yaml("build"))
    env.repo.write("flows/seed.hcl", SEED_HCL_FLOW)
    env.repo.write("README.md", "not a manifest")
    first = env.repo.commit("add build")
    await env.create_repository(path="flows")

    repository = await env.reconcile()

    build = await env.flow("build")
    assert build is not None
    assert build.metadata.labels[OWNER_LABEL] == OWNER
    assert build.metadata.annotations["nomad-pipeline.io/field-manager"] == (
        "gitrepository/default/apps"
    )
    seeded = await env.flow("seed-hcl")
    assert seeded is not None and seeded.spec.inline is not None
    assert repository.status.last_fetched_revision == first
    assert repository.status.last_applied_revision == first
    assert repository.status.file_errors == []
    assert ready(repository)[:2] == ("True", "Applied")
    assert repository.status.observed_generation == repository.metadata.generation

    env.repo.write("flows/build.yaml", flow_yaml("build", command="make"))
    second = env.repo.commit("change build")
    repository = await env.next_interval()
    build = await env.flow("build")
    assert build is not None and build.spec.inline is not None
    assert build.spec.inline.steps[0].run == "make"
    assert build.metadata.generation == 2
    assert repository.status.last_applied_revision == second

    env.repo.remove("flows/build.yaml")
    third = env.repo.commit("remove build")
    repository = await env.next_interval()
    assert await env.flow("build") is not None, "prune is off: the flow stays"
    assert repository.status.last_applied_revision == third
    assert ready(repository)[0] == "True"


async def test_prune_deletes_owned_objects_that_left_the_repository(env: Env) -> None:
    env.repo.write("build.yaml", flow_yaml("build"))
    env.repo.write("test.yaml", flow_yaml("test"))
    env.repo.commit()
    await env.create_repository(prune=True)
    await env.reconcile()
    assert await env.flow("build") is not None and await env.flow("test") is not None

    env.repo.remove("build.yaml")
    env.repo.commit("remove build")
    repository = await env.next_interval()

    assert await env.flow("build") is None
    assert await env.flow("test") is not None
    status, reason, message = ready(repository)
    assert (status, reason) == ("True", "Applied")
    assert "pruned 1" in message


async def test_a_broken_file_does_not_block_the_others_and_stops_pruning(env: Env) -> None:
    env.repo.write("a-good.yaml", flow_yaml("good"))
    env.repo.write("old.yaml", flow_yaml("old"))
    env.repo.commit()
    await env.create_repository(prune=True)
    await env.reconcile()

    env.repo.remove("old.yaml")
    env.repo.write("b-broken.yaml", "kind: Flow\nmetadata: {name: broken}\nspec: {inline: 3}\n")
    env.repo.write("c-also-good.yaml", flow_yaml("also-good"))
    env.repo.write("d-not-yaml.yaml", "key: [unclosed\n")
    revision = env.repo.commit("break one")
    before = await env.repository()
    repository = await env.next_interval()

    assert await env.flow("good") is not None
    assert await env.flow("also-good") is not None
    assert await env.flow("broken") is None
    assert await env.flow("old") is not None, "a file failed to load: nothing is pruned"
    assert [error.path for error in repository.status.file_errors] == [
        "b-broken.yaml",
        "d-not-yaml.yaml",
    ]
    assert "spec.inline" in repository.status.file_errors[0].message
    status, reason, message = ready(repository)
    assert (status, reason) == ("False", "ApplyFailed")
    assert "pruning skipped" in message
    assert repository.status.last_fetched_revision == revision
    assert repository.status.last_applied_revision == before.status.last_applied_revision

    env.repo.remove("b-broken.yaml")
    env.repo.remove("d-not-yaml.yaml")
    fixed = env.repo.commit("fix")
    repository = await env.next_interval()
    assert await env.flow("old") is None
    assert repository.status.file_errors == []
    assert repository.status.last_applied_revision == fixed
    assert ready(repository)[0] == "True"


async def test_an_unowned_object_with_a_clashing_name_is_never_touched(env: Env) -> None:
    mine = Flow.model_validate(
        {
            "kind": "Flow",
            "metadata": {"name": "build", "namespace": "default", "labels": {"team": "ops"}},
            "spec": {
                "inline": {
                    "runner": {"driver": "raw_exec"},
                    "steps": [{"name": "x", "run": "hand-made"}],
                }
            },
        }
    )
    stored = await env.store.create(mine)
    env.repo.write("build.yaml", flow_yaml("build", command="from-git"))
    env.repo.write("other.yaml", flow_yaml("other"))
    env.repo.commit()
    await env.create_repository(prune=True)

    repository = await env.reconcile()

    after = await env.flow("build")
    assert after is not None
    assert after.metadata.resource_version == stored.metadata.resource_version
    assert after.metadata.labels == {"team": "ops"}
    assert [error.path for error in repository.status.file_errors] == ["build.yaml"]
    assert "conflict: Flow default/build exists and is not managed" in (
        repository.status.file_errors[0].message
    )
    assert await env.flow("other") is not None
    assert ready(repository)[:2] == ("False", "ApplyFailed")

    # Pruning never removes it either: it does not carry our label.
    env.repo.remove("build.yaml")
    env.repo.commit()
    repository = await env.next_interval()
    assert (await env.flow("build")) is not None
    assert repository.status.file_errors == []


async def test_objects_declared_twice_are_reported(env: Env) -> None:
    env.repo.write("a.yaml", flow_yaml("build"))
    env.repo.write("b.yaml", flow_yaml("build", command="other"))
    env.repo.commit()
    await env.create_repository()
    repository = await env.reconcile()
    assert [(e.path, e.message) for e in repository.status.file_errors] == [
        ("b.yaml", "Flow default/build is also declared in a.yaml")
    ]


@pytest.mark.parametrize("ref_kind", ["branch", "tag", "commit"])
async def test_ref_by_branch_tag_and_commit(env: Env, ref_kind: str) -> None:
    env.repo.write("flow.yaml", flow_yaml("build", command="v1"))
    v1 = env.repo.commit("v1")
    env.repo.git("tag", "v1.0")
    env.repo.git("checkout", "--quiet", "-b", "release")
    env.repo.write("flow.yaml", flow_yaml("build", command="release"))
    release = env.repo.commit("release")
    env.repo.git("checkout", "--quiet", "main")
    env.repo.write("flow.yaml", flow_yaml("build", command="main"))
    env.repo.commit("main moves on")
    ref, expected_sha, expected_run = {
        "branch": ({"branch": "release"}, release, "release"),
        "tag": ({"tag": "v1.0"}, v1, "v1"),
        "commit": ({"commit": v1}, v1, "v1"),
    }[ref_kind]
    await env.create_repository(ref=ref)

    repository = await env.reconcile()

    assert repository.status.last_applied_revision == expected_sha
    build = await env.flow("build")
    assert build is not None and build.spec.inline is not None
    assert build.spec.inline.steps[0].run == expected_run


async def test_an_unknown_ref_is_a_fetch_failure(env: Env) -> None:
    env.repo.write("flow.yaml", flow_yaml("build"))
    env.repo.commit()
    await env.create_repository(ref={"branch": "nope"})
    repository = await env.reconcile()
    status, reason, message = ready(repository)
    assert (status, reason) == ("False", "FetchFailed")
    assert "refs/heads/nope" in message
    assert repository.status.last_fetched_revision is None
    assert await env.flow("build") is None


async def test_suspend_pauses_the_sync(env: Env) -> None:
    env.repo.write("flow.yaml", flow_yaml("build"))
    env.repo.commit()
    await env.create_repository(suspend=True)

    repository = await env.reconcile()
    assert await env.flow("build") is None
    assert ready(repository)[:2] == ("False", "Suspended")
    assert repository.status.last_fetched_revision is None

    await env.update_spec(suspend=False)
    repository = await env.reconcile()
    assert await env.flow("build") is not None
    assert ready(repository)[:2] == ("True", "Applied")


async def test_a_sync_request_reconciles_before_the_interval(env: Env) -> None:
    env.repo.write("flow.yaml", flow_yaml("build", command="one"))
    env.repo.commit()
    await env.create_repository()
    await env.reconcile()

    env.repo.write("flow.yaml", flow_yaml("build", command="two"))
    second = env.repo.commit()
    env.clock.advance(5)
    result = await env.reconciler.reconcile(REQUEST)
    assert result.requeue_after == pytest.approx(55.0)
    repository = await env.repository()
    assert repository.status.last_applied_revision != second, "not due yet: nothing fetched"

    current = await env.repository()
    requested_at = "2026-03-01T12:00:05+00:00"
    annotated = current.model_copy(deep=True)
    annotated.metadata.annotations[RECONCILE_REQUESTED_ANNOTATION] = requested_at
    await env.store.update(annotated)
    repository = await env.reconcile()

    assert repository.status.last_applied_revision == second
    assert repository.status.last_handled_reconcile_at == requested_at
    build = await env.flow("build")
    assert build is not None and build.spec.inline is not None
    assert build.spec.inline.steps[0].run == "two"


async def test_the_examples_directory_syncs_namespaces_first(env: Env) -> None:
    shutil.copytree(REPO_ROOT / "manifests" / "examples", env.repo.path / "deploy")
    env.repo.commit("examples")
    await env.create_repository(path="deploy")

    repository = await env.reconcile()

    assert repository.status.file_errors == [], repository.status.file_errors
    namespace = await env.store.get(Namespace, "", "examples")
    assert namespace.metadata.labels[OWNER_LABEL] == OWNER
    flows = (await env.store.list(Flow, "examples")).items
    assert {flow.metadata.name for flow in flows} >= {"sequential"}
    assert all(flow.metadata.labels[OWNER_LABEL] == OWNER for flow in flows)
    sequential = next(flow for flow in flows if flow.metadata.name == "sequential")
    assert sequential.spec.specification is not None
    assert all(step.job.source for step in sequential.spec.specification.steps)
    triggers = (await env.store.list(Trigger, None)).items
    assert triggers and all(t.metadata.labels[OWNER_LABEL] == OWNER for t in triggers)


async def test_files_leading_outside_the_checkout_are_refused(env: Env, tmp_path: Path) -> None:
    secret = tmp_path / "outside.yaml"
    secret.write_text(flow_yaml("stolen"))
    env.repo.write("good.yaml", flow_yaml("good"))
    (env.repo.path / "link.yaml").symlink_to(secret)
    env.repo.write(
        "spec.yaml",
        """\
kind: Flow
metadata: {name: sneaky}
spec:
  specification:
    steps:
      - name: s
        job: {path: ../../../../../../etc/hostname}
""",
    )
    env.repo.commit()
    await env.create_repository()

    repository = await env.reconcile()

    assert await env.flow("good") is not None
    assert await env.flow("stolen") is None
    assert await env.flow("sneaky") is None
    errors = {error.path: error.message for error in repository.status.file_errors}
    assert set(errors) == {"link.yaml", "spec.yaml"}
    assert "outside the repository" in errors["link.yaml"]
    assert "outside" in errors["spec.yaml"]
