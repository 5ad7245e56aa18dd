"""Starting, cancelling and re-running runs (the seed's run endpoints, plus rerun).

- ``POST /v1/flows/{id}/run?namespace=NS`` with ``{"variables": {...}}`` (body optional) creates
  a Run of the flow, variables type-checked against it (400 naming ``variables.<name>``), and
  answers ``201 {"run_id": "<ulid>"}``.
- ``PUT /v1/runs/{id}/cancel?namespace=NS`` sets ``spec.cancel`` on the run; the run reconciler
  then stops every Nomad job of the run. 409 when the run already finished; cancelling twice is
  not an error. Answers ``{"run_id": ...}``.
- ``POST /v1/runs/{id}/rerun?namespace=NS&from_failed=true`` creates a new run of the same flow
  snapshot with the same variables; ``from_failed`` reuses the steps that succeeded. Answers
  ``201 {"run_id": ...}``.

A Run created natively (``apply``) runs just the same: the reconciler does not care who made it.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from nomad_pipeline.controller import admission
from nomad_pipeline.controller.api import STORE
from nomad_pipeline.controller.api.errors import query_flag, read_json_object
from nomad_pipeline.controller.api.native import shielded
from nomad_pipeline.controller.api.seed import namespace_scope
from nomad_pipeline.errors import Conflict, Invalid
from nomad_pipeline.resources.kinds import (
    FLOW_LABEL,
    TERMINAL_PHASES,
    Flow,
    Run,
    RunSpec,
    RunTrigger,
)
from nomad_pipeline.resources.meta import ObjectMeta
from nomad_pipeline.resources.ulid import new_ulid
from nomad_pipeline.resources.variables import check_run_variables
from nomad_pipeline.store.interface import Store

# A write that keeps conflicting with the reconciler's status writes is retried this often.
_WRITE_ATTEMPTS = 10


def setup(app: web.Application) -> None:
    """Add the run routes (``build_api(extra_routes=[runs.setup])``)."""
    app.router.add_post("/v1/flows/{id}/run", run_flow)
    app.router.add_put("/v1/runs/{id}/cancel", cancel_run)
    app.router.add_post("/v1/runs/{id}/rerun", rerun)


async def create_run(
    store: Store,
    flow: Flow,
    variables: dict[str, Any],
    *,
    trigger: RunTrigger | None = None,
    rerun_of: str | None = None,
    from_failed: bool = False,
    name: str | None = None,
    labels: dict[str, str] | None = None,
) -> Run:
    """Create a run of ``flow`` (a snapshot of its spec) with checked ``variables``.

    ``name`` (a ULID) makes creation idempotent for callers that may retry one event (triggers):
    the second create raises AlreadyExists instead of starting a second run.
    """
    checked = check_run_variables(flow.spec, variables)
    run = Run(
        metadata=ObjectMeta(
            name=name or new_ulid(),
            namespace=flow.metadata.namespace,
            labels={**(labels or {}), FLOW_LABEL: flow.metadata.name},
        ),
        spec=RunSpec(
            flow=flow.metadata.name,
            flow_spec=flow.spec,
            variables=checked,
            trigger=trigger or RunTrigger(),
            rerun_of=rerun_of,
            from_failed=from_failed,
        ),
    )
    await admission.admit(store, run)
    return await store.create(admission.with_initial_finalizers(run))


async def request_cancel(store: Store, namespace: str, name: str) -> bool:
    """Ask for the run to be cancelled (``spec.cancel``; the run reconciler stops its Nomad
    jobs). False when it already finished; asking twice is not an error. Retries writes that
    lose a race with the reconciler's status writes."""
    for _ in range(_WRITE_ATTEMPTS):
        run = await store.get(Run, namespace, name)
        if run.status.phase in TERMINAL_PHASES:
            return False
        if run.spec.cancel or run.metadata.deleting:
            # A run being deleted has its jobs stopped already (its spec can no longer change).
            return True
        cancelled = run.model_copy(update={"spec": run.spec.model_copy(update={"cancel": True})})
        try:
            await store.update(cancelled)
            return True
        except Conflict:
            continue
    raise Conflict(f"run {namespace}/{name} kept changing; try the cancel again")


async def run_flow(request: web.Request) -> web.Response:
    namespace = await namespace_scope(request, allow_all=False)
    assert namespace is not None
    store = request.app[STORE]
    flow = await store.get(Flow, namespace, request.match_info["id"])
    variables: Any = {}
    if request.can_read_body and (await request.read()).strip():
        body = await read_json_object(request)
        unknown = sorted(set(body) - {"variables"})
        if unknown:
            raise Invalid(f"unknown field {unknown[0]!r}: the body holds only variables")
        variables = body.get("variables") or {}
    if not isinstance(variables, dict):
        raise Invalid("variables must be a JSON object", field="variables")
    run = await shielded(request.app, create_run(store, flow, variables))
    return web.json_response({"run_id": run.metadata.name}, status=201)


async def cancel_run(request: web.Request) -> web.Response:
    namespace = await namespace_scope(request, allow_all=False)
    assert namespace is not None
    store = request.app[STORE]
    name = request.match_info["id"]

    async def cancel() -> None:
        if not await request_cancel(store, namespace, name):
            raise Conflict(f"run {namespace}/{name} already finished; nothing to cancel")

    await shielded(request.app, cancel())
    return web.json_response({"run_id": name})


async def rerun(request: web.Request) -> web.Response:
    namespace = await namespace_scope(request, allow_all=False)
    assert namespace is not None
    store = request.app[STORE]
    original = await store.get(Run, namespace, request.match_info["id"])
    from_failed = query_flag(request, "from_failed")
    flow = Flow(
        metadata=ObjectMeta(name=original.spec.flow, namespace=namespace),
        spec=original.spec.flow_spec,
    )
    # The original's variables already passed the checks; only trigger.* ones are undeclared.
    run = await shielded(
        request.app,
        create_run(
            store,
            flow,
            {k: v for k, v in original.spec.variables.items() if v is not None},
            trigger=original.spec.trigger,
            rerun_of=original.metadata.name,
            from_failed=from_failed,
        ),
    )
    return web.json_response({"run_id": run.metadata.name}, status=201)
