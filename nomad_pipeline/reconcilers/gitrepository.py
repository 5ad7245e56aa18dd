"""The GitRepository reconciler: GitOps sync of manifests from a git repository.

Each reconcile fetches the remote (a bare mirror, :class:`GitMirrors`), resolves the ref to a
commit, exports that commit's tree into a fresh temporary directory, loads every manifest under
``spec.path`` file by file, and applies each object through the API's own apply logic, labelled
as owned by this repository. Level-triggered: the owner label is the inventory, so pruning
(``prune: true``) deletes exactly the owned objects no file declares any more.

Rules that keep a repository from doing harm:
- an object that exists without our owner label is never touched (reported as a conflict in
  ``status.file_errors``), even when a file declares the same kind, namespace and name;
- one file that fails to load or apply does not stop the others, but pruning is skipped while
  any file fails to load (its objects are unknown, so they must not be deleted);
- manifest files and jobspec paths that lead outside the checkout (symlinks, ``..``) are refused.

A fetch is due ``spec.interval`` after the previous one, at once after a spec change, or when
the ``nomad-pipeline.io/reconcile-requested-at`` annotation carries a value not yet handled.

Deletion (as Flux's Kustomization): a GitRepository is created with the finalizer
``nomad-pipeline.io/prune``. Once it is being deleted nothing is fetched or applied any more;
with ``prune: true`` every object it owns is deleted (the pruning code with nothing declared),
and the finalizer is removed when that succeeded; with ``prune: false`` (or ``suspend: true``)
the objects stay and the finalizer is removed at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nomad_pipeline.controller.admission import PRUNE_FINALIZER
from nomad_pipeline.controller.apply import apply
from nomad_pipeline.controller.manager import watch_store
from nomad_pipeline.controller.runtime import Controller, Request, Result, Runnable
from nomad_pipeline.controller.secrets import SecretResolver
from nomad_pipeline.errors import Conflict, Invalid, NotFound
from nomad_pipeline.reconcilers.gitsource import GitError, GitMirrors
from nomad_pipeline.resources.durations import parse_duration
from nomad_pipeline.resources.kinds import (
    RECONCILE_REQUESTED_ANNOTATION,
    FileError,
    GitRepository,
)
from nomad_pipeline.resources.manifests import JOBSPEC_SUFFIXES, MANIFEST_SUFFIXES, load_paths
from nomad_pipeline.resources.meta import API_GROUP, Condition, Resource, ready_condition
from nomad_pipeline.resources.registry import KINDS
from nomad_pipeline.store.interface import Store

logger = logging.getLogger(__name__)

# Value: ``<namespace>.<name>`` of the GitRepository that applied the object.
OWNER_LABEL = f"{API_GROUP}/gitrepository"

ObjectKey = tuple[str, str, str]  # kind, namespace, name


def owner_value(repository: GitRepository) -> str:
    return f"{repository.metadata.namespace}.{repository.metadata.name}"


def field_manager_for(repository: GitRepository) -> str:
    return f"gitrepository/{repository.metadata.namespace}/{repository.metadata.name}"


def _describe(kind: str, namespace: str, name: str) -> str:
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


@dataclass
class SyncOutcome:
    """What one pass over the checkout did."""

    applied: int = 0
    pruned: int = 0
    file_errors: list[FileError] = field(default_factory=list)
    # Files that did not load: their objects are unknown, so nothing may be pruned.
    load_failures: int = 0
    prune_errors: list[str] = field(default_factory=list)


def manifest_files(root: Path, relative: str) -> list[str]:
    """Manifest files under ``root/relative`` (a file or a directory, recursively), as paths
    relative to ``root``, sorted; hidden entries and Nomad jobspecs are skipped as the loader
    does for directories. Raises Invalid when the path is missing or leaves ``root``."""
    resolved_root = root.resolve()
    start = (root / relative).resolve()
    if not start.is_relative_to(resolved_root):
        raise Invalid(f"{relative}: leads outside the repository", field="spec.path")
    if start.is_file():
        return [str(start.relative_to(resolved_root))]
    if not start.is_dir():
        raise Invalid(f"{relative}: no such file or directory in the repository", field="spec.path")
    found: list[str] = []
    for directory, subdirectories, files in os.walk(start):
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
        for name in files:
            if name.startswith(".") or not name.endswith(MANIFEST_SUFFIXES):
                continue
            if name.endswith(JOBSPEC_SUFFIXES):
                continue
            found.append(str((Path(directory) / name).relative_to(resolved_root)))
    return sorted(found)


def _load_file(root: Path, relative: str) -> list[Resource]:
    """The objects of one manifest file; Invalid for a file that escapes the checkout."""
    if not (root / relative).resolve().is_relative_to(root.resolve()):
        raise Invalid(f"{relative}: a symbolic link leading outside the repository", field="path")
    return [manifest.obj for manifest in load_paths([relative], cwd=root, confine_to=root)]


def _load_tree(root: Path, relative: str) -> tuple[list[tuple[str, Resource]], list[FileError]]:
    """Every object under ``relative`` with its file, and the files that failed to load.
    Blocking file I/O: run in a thread."""
    objects: list[tuple[str, Resource]] = []
    errors: list[FileError] = []
    try:
        files = manifest_files(root, relative)
    except Invalid as exc:
        return [], [FileError(path=relative, message=exc.message)]
    for file in files:
        try:
            objects.extend((file, obj) for obj in _load_file(root, file))
        except Invalid as exc:
            errors.append(FileError(path=file, message=exc.message))
    return objects, errors


class GitRepositoryReconciler:
    def __init__(
        self,
        store: Store,
        *,
        mirrors: GitMirrors,
        secrets: SecretResolver,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._mirrors = mirrors
        self._secrets = secrets
        self._clock = clock

    async def reconcile(self, request: Request) -> Result:
        try:
            repository = await self._store.get(GitRepository, request.namespace, request.name)
        except NotFound:
            return Result()
        if repository.metadata.deleting:
            return await self._finalize(repository)
        now = self._clock()
        generation = repository.metadata.generation
        if repository.spec.suspend:
            await self._write_status(
                repository,
                conditions=repository.status.with_condition(
                    ready_condition("False", "Suspended", "suspended", now, generation),
                ),
            )
            return Result()
        interval = parse_duration(repository.spec.interval)
        requested = repository.metadata.annotations.get(RECONCILE_REQUESTED_ANNOTATION)
        status = repository.status
        if (
            status.observed_generation == generation
            and status.last_handled_reconcile_at == requested
            and status.last_fetch_time is not None
            and (ready := status.condition("Ready")) is not None
            and ready.reason != "Suspended"
        ):
            # Woken by our own status write or a metadata change: the next fetch is not due yet.
            remaining = (status.last_fetch_time + interval - now).total_seconds()
            if remaining > 0:
                return Result(requeue_after=remaining)
        await self._sync(repository, now, requested)
        return Result(requeue_after=interval.total_seconds())

    async def _sync(self, repository: GitRepository, now: datetime, requested: str | None) -> None:
        spec = repository.spec
        generation = repository.metadata.generation
        try:
            secret = (
                await self._secrets.resolve(spec.secret_ref, field="spec.secret_ref")
                if spec.secret_ref is not None
                else None
            )
            commit = await self._mirrors.resolve(
                spec.url,
                branch=spec.ref.branch,
                tag=spec.ref.tag,
                commit=spec.ref.commit,
                secret=secret,
            )
        except (GitError, Invalid) as exc:
            reason = "FetchFailed" if isinstance(exc, GitError) else "SecretUnavailable"
            logger.info(
                "git repository fetch failed",
                extra={"gitrepository": owner_value(repository), "error": exc.message},
            )
            await self._write_status(
                repository,
                last_fetch_time=now,
                last_handled_reconcile_at=requested,
                conditions=repository.status.with_condition(
                    ready_condition("False", reason, exc.message, now, generation)
                ),
            )
            return
        outcome = await self._apply_commit(repository, commit.sha)
        fully_applied = not outcome.file_errors and not outcome.prune_errors
        # One write at the end: a crash before it leaves the request unhandled, so it is redone.
        await self._write_status(
            repository,
            last_fetched_revision=commit.sha,
            last_fetch_time=now,
            file_errors=outcome.file_errors,
            last_handled_reconcile_at=requested,
            last_applied_revision=(
                commit.sha if fully_applied else repository.status.last_applied_revision
            ),
            conditions=repository.status.with_condition(
                self._ready_condition(repository, commit.sha, outcome, now)
            ),
        )
        logger.info(
            "git repository synced",
            extra={
                "gitrepository": owner_value(repository),
                "revision": commit.sha,
                "applied": outcome.applied,
                "pruned": outcome.pruned,
                "file_errors": len(outcome.file_errors),
            },
        )

    def _ready_condition(
        self, repository: GitRepository, sha: str, outcome: SyncOutcome, now: datetime
    ) -> Condition:
        generation = repository.metadata.generation
        summary = f"applied {outcome.applied} objects at {sha}"
        if outcome.pruned:
            summary += f", pruned {outcome.pruned}"
        if repository.spec.prune and outcome.load_failures:
            summary += (
                f"; pruning skipped: {outcome.load_failures} file(s) failed to load, so their "
                "objects are unknown"
            )
        if outcome.file_errors:
            first = outcome.file_errors[0]
            # Loader messages already start with the file's path.
            detail = (
                first.message
                if first.message.startswith(first.path)
                else f"{first.path}: {first.message}"
            )
            message = f"{summary}; {len(outcome.file_errors)} file error(s), first {detail}"
            return ready_condition("False", "ApplyFailed", message, now, generation)
        if outcome.prune_errors:
            message = f"{summary}; pruning failed: {'; '.join(outcome.prune_errors)}"
            return ready_condition("False", "PruneFailed", message, now, generation)
        return ready_condition("True", "Applied", summary, now, generation)

    async def _apply_commit(self, repository: GitRepository, sha: str) -> SyncOutcome:
        scratch = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="np-gitrepo-"))
        try:
            tree = scratch / "tree"
            await self._mirrors.export(repository.spec.url, sha, tree)
            objects, load_errors = await asyncio.to_thread(_load_tree, tree, repository.spec.path)
        finally:
            await asyncio.to_thread(shutil.rmtree, scratch, True)
        outcome = SyncOutcome(file_errors=list(load_errors), load_failures=len(load_errors))
        desired = await self._apply_objects(repository, objects, outcome)
        if repository.spec.prune and not outcome.load_failures:
            await self._prune(repository, desired, outcome)
        return outcome

    async def _apply_objects(
        self,
        repository: GitRepository,
        objects: Sequence[tuple[str, Resource]],
        outcome: SyncOutcome,
    ) -> set[ObjectKey]:
        """Apply every object (namespaces first); returns the keys the repository declares."""
        owner = owner_value(repository)
        manager = field_manager_for(repository)
        declared: dict[ObjectKey, str] = {}
        # Namespaces first, so the objects in them pass admission; file order otherwise.
        for file, obj in sorted(objects, key=lambda item: type(item[1]).NAMESPACED):
            kind = type(obj)
            key = (kind.KIND, obj.metadata.namespace, obj.metadata.name)
            shown = _describe(*key)
            if key in declared:
                outcome.file_errors.append(
                    FileError(path=file, message=f"{shown} is also declared in {declared[key]}")
                )
                continue
            declared[key] = file
            try:
                existing = await self._store.get(kind, obj.metadata.namespace, obj.metadata.name)
            except NotFound:
                existing = None
            if existing is not None and existing.metadata.labels.get(OWNER_LABEL) != owner:
                holder = existing.metadata.labels.get(OWNER_LABEL)
                outcome.file_errors.append(
                    FileError(
                        path=file,
                        message=(
                            f"conflict: {shown} exists and is not managed by this GitRepository"
                            + (f" (it belongs to GitRepository {holder})" if holder else "")
                            + "; left untouched"
                        ),
                    )
                )
                continue
            labelled = obj.model_copy(
                update={
                    "metadata": obj.metadata.model_copy(
                        update={"labels": {**obj.metadata.labels, OWNER_LABEL: owner}}
                    )
                }
            )
            try:
                await apply(self._store, labelled, field_manager=manager)
            except (Invalid, Conflict, NotFound) as exc:
                outcome.file_errors.append(FileError(path=file, message=f"{shown}: {exc.message}"))
                continue
            outcome.applied += 1
        return set(declared)

    async def _prune(
        self, repository: GitRepository, desired: set[ObjectKey], outcome: SyncOutcome
    ) -> None:
        """Delete owned objects no file declares; namespaces last (they must be empty)."""
        selector = {OWNER_LABEL: owner_value(repository)}
        kinds = sorted(KINDS.values(), key=lambda kind: not kind.NAMESPACED)
        for kind in kinds:
            owned = await self._store.list(kind, None, selector=selector)
            for obj in owned.items:
                key = (kind.KIND, obj.metadata.namespace, obj.metadata.name)
                # Already being deleted (a run stopping its jobs): asked once is enough.
                if key in desired or obj.metadata.deleting:
                    continue
                try:
                    await self._store.delete(
                        kind,
                        obj.metadata.namespace,
                        obj.metadata.name,
                        resource_version=obj.metadata.resource_version,
                    )
                except NotFound:
                    continue
                except Conflict as exc:
                    outcome.prune_errors.append(f"{_describe(*key)}: {exc.message}")
                    continue
                outcome.pruned += 1
                logger.info(
                    "pruned an object that left the repository",
                    extra={"gitrepository": owner_value(repository), "object": _describe(*key)},
                )

    async def _finalize(self, repository: GitRepository) -> Result:
        """Being deleted: with ``prune`` (and not suspended), delete every owned object
        (nothing is declared any more), then remove our finalizer; the store then deletes the
        repository. If an object could not be deleted (a stale read, a conflict) the finalizer
        is kept and the pass retried with backoff."""
        if PRUNE_FINALIZER not in repository.metadata.finalizers:
            return Result()
        # A suspended repository touches nothing, on deletion too (as Flux).
        if repository.spec.prune and not repository.spec.suspend:
            outcome = SyncOutcome()
            await self._prune(repository, set(), outcome)
            if outcome.prune_errors:
                raise Conflict(
                    f"GitRepository {owner_value(repository)} is being deleted but not every "
                    f"object it applied could be: {'; '.join(outcome.prune_errors)}"
                )
        remaining = [name for name in repository.metadata.finalizers if name != PRUNE_FINALIZER]
        metadata = repository.metadata.model_copy(update={"finalizers": remaining})
        await self._store.update(repository.model_copy(update={"metadata": metadata}))
        logger.info(
            "git repository finalized for deletion",
            extra={"gitrepository": owner_value(repository), "pruned": repository.spec.prune},
        )
        return Result()

    async def _write_status(self, repository: GitRepository, **changes: Any) -> GitRepository:
        """Write status fields with the resource-version precondition; skip no-op writes."""
        updates = {"observed_generation": repository.metadata.generation, **changes}
        status = repository.status.model_copy(update=updates)
        if status == repository.status:
            return repository
        return await self._store.update_status(repository.model_copy(update={"status": status}))


def gitrepository_controller(
    store: Store,
    *,
    mirrors: GitMirrors,
    secrets: SecretResolver,
    clock: Callable[[], datetime],
    workers: int = 2,
) -> Sequence[Runnable]:
    """The GitRepository controller and its store watch, ready for the manager."""
    reconciler = GitRepositoryReconciler(store, mirrors=mirrors, secrets=secrets, clock=clock)
    controller = Controller("gitrepositories", reconciler, workers=workers)
    return [watch_store(store, GitRepository, controller.enqueue), controller]
