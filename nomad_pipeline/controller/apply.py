"""Create-or-update by name, as ``kubectl apply`` does (used by the API and by GitOps sync).

- ``created``: no object of that kind, namespace and name existed.
- ``configured``: spec, labels or annotations differ from the stored object.
- ``unchanged``: they are equal; nothing is written.

``status`` in the input is ignored (only the controller writes it). An incoming
``metadata.resource_version`` is an optimistic-concurrency guard: it must equal the stored one,
otherwise Conflict (409). Without one, apply retries a write that lost a race with another
writer, since the caller asked for "this content", not for "this content over that version".
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from nomad_pipeline.controller.admission import admit, admit_all, with_initial_finalizers
from nomad_pipeline.errors import Conflict, Invalid, NotFound
from nomad_pipeline.resources.meta import API_GROUP, Resource
from nomad_pipeline.store.interface import Store

ApplyAction = Literal["created", "configured", "unchanged"]

# The last field manager (``apply --field-manager``, GitOps sync) that wrote the object; kept when
# a later apply names no manager, ignored when comparing annotations.
FIELD_MANAGER_ANNOTATION = f"{API_GROUP}/field-manager"

# Attempts at an unconditional update that keeps losing the race against other writers.
_UNCONDITIONAL_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class ApplyResult:
    action: ApplyAction
    object: Resource


async def apply(
    store: Store,
    obj: Resource,
    *,
    dry_run: bool = False,
    field_manager: str | None = None,
    namespaces_in_batch: Collection[str] = (),
) -> ApplyResult:
    """Create or update ``obj`` by name. ``namespaces_in_batch`` are namespaces applied in the
    same request before this object (they need not exist yet during a dry run)."""
    obj = normalize(obj)
    await admit(store, obj, namespaces_in_batch=namespaces_in_batch)
    attempts = 1 if obj.metadata.resource_version is not None else _UNCONDITIONAL_ATTEMPTS
    for attempt in range(1, attempts + 1):
        try:
            return await _apply_once(store, obj, dry_run=dry_run, field_manager=field_manager)
        except Conflict:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable: the last attempt returns or raises")


async def apply_all(
    store: Store,
    objects: Sequence[Resource],
    *,
    dry_run: bool = False,
    field_manager: str | None = None,
) -> list[ApplyResult]:
    """Admit every object first (reporting all that fail), then apply namespaces before the
    objects that live in them. Results come back in the order of ``objects``."""
    normalized = [normalize(obj) for obj in objects]
    namespaces = {obj.metadata.name for obj in normalized if not type(obj).NAMESPACED}
    await admit_all(store, normalized, namespaces_in_batch=namespaces)
    order = sorted(range(len(normalized)), key=lambda index: type(normalized[index]).NAMESPACED)
    results: dict[int, ApplyResult] = {}
    for index in order:
        results[index] = await apply(
            store,
            normalized[index],
            dry_run=dry_run,
            field_manager=field_manager,
            namespaces_in_batch=namespaces,
        )
    return [results[index] for index in range(len(normalized))]


def normalize(obj: Resource) -> Resource:
    """Cluster-scoped objects live in namespace ``""``; status is the controller's to write."""
    kind = type(obj)
    update: dict[str, Any] = {"status": default_status(kind)}
    if not kind.NAMESPACED and obj.metadata.namespace != "":
        update["metadata"] = obj.metadata.model_copy(update={"namespace": ""})
    return obj.model_copy(update=update)


def default_status(kind: type[Resource]) -> Any:
    field = kind.model_fields["status"]
    if field.is_required():
        raise Invalid(f"kind {kind.KIND} has no default status to start from", field="status")
    return field.get_default(call_default_factory=True)


async def _apply_once(
    store: Store, obj: Resource, *, dry_run: bool, field_manager: str | None
) -> ApplyResult:
    kind = type(obj)
    wanted_version = obj.metadata.resource_version
    try:
        existing = await store.get(kind, obj.metadata.namespace, obj.metadata.name)
    except NotFound:
        existing = None
    if existing is None:
        if wanted_version is not None:
            raise Conflict(
                f"{kind.KIND} {_display(obj)} does not exist, but metadata.resource_version "
                f"{wanted_version} was given",
                field="metadata.resource_version",
            )
        fresh = with_initial_finalizers(_with_manager(obj, obj.metadata.annotations, field_manager))
        if dry_run:
            return ApplyResult("created", fresh)
        return ApplyResult("created", await store.create(fresh))

    if wanted_version is not None and wanted_version != existing.metadata.resource_version:
        raise Conflict(
            f"{kind.KIND} {_display(obj)} was modified: metadata.resource_version is "
            f"{existing.metadata.resource_version}, the request carries {wanted_version}",
            field="metadata.resource_version",
        )
    if is_unchanged(existing, obj):
        return ApplyResult("unchanged", existing)

    manager = field_manager or existing.metadata.annotations.get(FIELD_MANAGER_ANNOTATION)
    metadata = existing.metadata.model_copy(
        update={
            "labels": dict(obj.metadata.labels),
            "annotations": _annotations_with_manager(obj.metadata.annotations, manager),
        }
    )
    updated = existing.model_copy(update={"metadata": metadata, "spec": obj.spec})
    if dry_run:
        if _dump(existing.spec) != _dump(obj.spec):
            bumped = metadata.model_copy(update={"generation": existing.metadata.generation + 1})
            updated = updated.model_copy(update={"metadata": bumped})
        return ApplyResult("configured", updated)
    return ApplyResult("configured", await store.update(updated))


def is_unchanged(existing: Resource, incoming: Resource) -> bool:
    stored_annotations = {
        key: value
        for key, value in existing.metadata.annotations.items()
        if key != FIELD_MANAGER_ANNOTATION
    }
    incoming_annotations = {
        key: value
        for key, value in incoming.metadata.annotations.items()
        if key != FIELD_MANAGER_ANNOTATION
    }
    return (
        existing.metadata.labels == incoming.metadata.labels
        and stored_annotations == incoming_annotations
        and _dump(existing.spec) == _dump(incoming.spec)
    )


def _with_manager(obj: Resource, annotations: dict[str, str], manager: str | None) -> Resource:
    if manager is None:
        return obj
    metadata = obj.metadata.model_copy(
        update={"annotations": _annotations_with_manager(annotations, manager)}
    )
    return obj.model_copy(update={"metadata": metadata})


def _annotations_with_manager(annotations: dict[str, str], manager: str | None) -> dict[str, str]:
    merged = {key: value for key, value in annotations.items() if key != FIELD_MANAGER_ANNOTATION}
    if manager is not None:
        merged[FIELD_MANAGER_ANNOTATION] = manager
    return merged


def _dump(value: object) -> object:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value


def _display(obj: Resource) -> str:
    if obj.metadata.namespace:
        return f"{obj.metadata.namespace}/{obj.metadata.name}"
    return obj.metadata.name
