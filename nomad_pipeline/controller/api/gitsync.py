"""``POST /v1/gitrepositories/{name}/sync?namespace=NS``: ask for an immediate GitOps sync.

Like ``flux reconcile``: the route writes the current time into the GitRepository's
``nomad-pipeline.io/reconcile-requested-at`` annotation (a metadata change, so the generation
stays); the reconciler is woken by that write, syncs, and copies the value it handled into
``status.last_handled_reconcile_at``. Answers ``202 {"requested_at": "<value>"}`` at once
(the sync is not awaited); 404 for an unknown namespace or repository.
"""

from __future__ import annotations

from datetime import UTC, datetime

from aiohttp import web

from nomad_pipeline.controller.api import STORE
from nomad_pipeline.controller.api.native import shielded
from nomad_pipeline.controller.api.seed import namespace_scope
from nomad_pipeline.errors import Conflict
from nomad_pipeline.resources.kinds import RECONCILE_REQUESTED_ANNOTATION, GitRepository
from nomad_pipeline.store.interface import Store

# Writes of the annotation that may lose a race with other writers before giving up.
_WRITE_ATTEMPTS = 5


def setup(app: web.Application) -> None:
    """Add the sync route (``build_api(extra_routes=[gitsync.setup])``)."""
    app.router.add_post("/v1/gitrepositories/{name}/sync", request_sync)


async def mark_reconcile_requested(store: Store, namespace: str, name: str) -> str:
    """Set the reconcile-requested annotation to now (with the resource-version precondition,
    retried on a lost race); returns the value written."""
    for _ in range(_WRITE_ATTEMPTS):
        repository = await store.get(GitRepository, namespace, name)
        requested_at = datetime.now(UTC).isoformat()
        annotations = {
            **repository.metadata.annotations,
            RECONCILE_REQUESTED_ANNOTATION: requested_at,
        }
        metadata = repository.metadata.model_copy(update={"annotations": annotations})
        try:
            await store.update(repository.model_copy(update={"metadata": metadata}))
        except Conflict:
            continue
        return requested_at
    raise Conflict(
        f"GitRepository {namespace}/{name} kept changing; sync was not requested after "
        f"{_WRITE_ATTEMPTS} attempts",
        field="metadata.resource_version",
    )


async def request_sync(request: web.Request) -> web.Response:
    """Ask for an immediate sync of a GitRepository."""
    namespace = await namespace_scope(request, allow_all=False)
    assert namespace is not None
    store = request.app[STORE]
    requested_at = await shielded(
        request.app, mark_reconcile_requested(store, namespace, request.match_info["name"])
    )
    return web.json_response({"requested_at": requested_at}, status=202)
