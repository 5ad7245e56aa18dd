"""Rules an object must pass before it is written, beyond what its model validates alone.

- An object in a namespace that does not exist is refused (Invalid, naming the namespace).
- A namespace that still holds objects is not deleted (Conflict), nor is ``default``.
- A Run and a GitRepository are created with their controller's finalizer
  (:func:`with_initial_finalizers`), so deleting one first lets its reconciler clean up: a run's
  Nomad jobs are stopped, a pruning repository's objects deleted.
- A flow's specification jobs carry their jobspec content: a ``path`` is resolved to content by
  the manifest loader at load time, so a bare path arriving over the API is refused (Invalid,
  naming the field), since the server cannot read the client's files.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Sequence
from typing import TypeVar

from nomad_pipeline.errors import AlreadyExists, Conflict, Invalid, NomadPipelineError, NotFound
from nomad_pipeline.resources.kinds import Flow, GitRepository, Namespace, Run
from nomad_pipeline.resources.meta import API_GROUP, Resource
from nomad_pipeline.resources.registry import KINDS
from nomad_pipeline.store.interface import Store

R = TypeVar("R", bound=Resource)

DEFAULT_NAMESPACE = "default"

# The run reconciler stops the run's Nomad jobs and deletes its logs, then removes this.
STOP_JOBS_FINALIZER = f"{API_GROUP}/stop-jobs"
# The GitRepository reconciler deletes the objects it applied (with ``spec.prune``), then
# removes this.
PRUNE_FINALIZER = f"{API_GROUP}/prune"

INITIAL_FINALIZERS: dict[str, str] = {
    Run.KIND: STOP_JOBS_FINALIZER,
    GitRepository.KIND: PRUNE_FINALIZER,
}


def with_initial_finalizers(obj: R) -> R:
    """``obj`` as it is to be created: with its kind's finalizer (part of the create itself,
    never a second write). Other kinds, and objects that already carry it, are returned as is."""
    finalizer = INITIAL_FINALIZERS.get(obj.kind)
    if finalizer is None or finalizer in obj.metadata.finalizers:
        return obj
    metadata = obj.metadata.model_copy(update={"finalizers": [*obj.metadata.finalizers, finalizer]})
    return obj.model_copy(update={"metadata": metadata})


async def admit(store: Store, obj: Resource, *, namespaces_in_batch: Collection[str] = ()) -> None:
    """Raise the first rule ``obj`` breaks; ``namespaces_in_batch`` count as existing."""
    if type(obj).NAMESPACED:
        await _check_namespace_exists(store, obj.metadata.namespace, namespaces_in_batch)
    if isinstance(obj, Flow):
        check_flow(obj)


async def admit_all(
    store: Store, objects: Sequence[Resource], *, namespaces_in_batch: Collection[str] = ()
) -> None:
    """Admit every object; one Invalid lists every refusal as ``items[i]: field: reason``."""
    problems: list[NomadPipelineError] = []
    fields: list[str] = []
    for index, obj in enumerate(objects):
        try:
            await admit(store, obj, namespaces_in_batch=namespaces_in_batch)
        except NomadPipelineError as error:
            problems.append(error)
            fields.append(f"items[{index}]" + (f".{error.field}" if error.field else ""))
    if not problems:
        return
    if len(problems) == 1 and len(objects) == 1:
        raise problems[0]
    message = "; ".join(
        f"{field}: {problem.message}" for field, problem in zip(fields, problems, strict=True)
    )
    raise Invalid(f"{len(problems)} of {len(objects)} objects refused: {message}", field=fields[0])


def check_flow(flow: Flow) -> None:
    if flow.spec.specification is None:
        return
    for index, step in enumerate(flow.spec.specification.steps):
        job = step.job
        if job.path is not None and job.source is None:
            raise Invalid(
                f"jobspec path {job.path!r} was not loaded: send its content in 'source' (or "
                "use 'hcl' or 'json'); the CLI reads the file when it loads the manifest",
                field=f"spec.specification.steps[{index}].job.path",
            )


async def check_deletable(store: Store, kind: type[Resource], namespace: str, name: str) -> None:
    """Refuse to delete ``default`` or a namespace that still holds objects. (A running run may
    be deleted: its finalizer has the run reconciler stop its Nomad jobs first.)"""
    if not issubclass(kind, Namespace):
        return
    if name == DEFAULT_NAMESPACE:
        raise Invalid("the default namespace cannot be deleted", field="metadata.name")
    held: list[str] = []
    for other in KINDS.values():
        if not other.NAMESPACED:
            continue
        listed = await store.list(other, name)
        if listed.items:
            held.append(f"{len(listed.items)} {other.PLURAL}")
    if held:
        raise Conflict(f"namespace {name!r} is not empty: it holds {', '.join(held)}")


async def ensure_default_namespace(store: Store) -> None:
    """Create the ``default`` namespace if it is missing, as the seed always has one."""
    try:
        await store.get(Namespace, "", DEFAULT_NAMESPACE)
        return
    except NotFound:
        pass
    default = Namespace.model_validate(
        {
            "apiVersion": "nomad-pipeline.io/v1",
            "kind": "Namespace",
            "metadata": {"name": DEFAULT_NAMESPACE},
            "spec": {"description": "The default namespace"},
        }
    )
    # Cluster-scoped objects are stored under namespace "" (bypassing the name pattern).
    default = default.model_copy(
        update={"metadata": default.metadata.model_copy(update={"namespace": ""})}
    )
    # Another controller (or a restart racing this one) may have created it meanwhile.
    with contextlib.suppress(AlreadyExists):
        await store.create(default)


async def _check_namespace_exists(
    store: Store, namespace: str, namespaces_in_batch: Collection[str]
) -> None:
    if namespace in namespaces_in_batch:
        return
    try:
        await store.get(Namespace, "", namespace)
    except NotFound:
        raise Invalid(
            f"namespace {namespace!r} does not exist; create it first", field="metadata.namespace"
        ) from None
