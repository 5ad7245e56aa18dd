"""Webhook deliveries for triggers: ``POST /v1/triggers/{id}/webhooks?namespace=NS``.

Answers, all JSON:
- ``201 {"run": "<name>"}``: the delivery started a run (created, not awaited);
- ``200 {"run": "<name>"}``: a repeated delivery ID; the run it started before, nothing new;
- ``202 {"ignored": "<reason>"}``: authenticated, but the trigger does not want it (event,
  branch, path, repository filters, a suspended trigger);
- 401 bad or missing signature/token (nothing happens), 404 unknown trigger, 400 a trigger
  without a webhook source or a malformed body, 413 a body over 5 MB.

A trigger without a ``secret`` accepts unauthenticated deliveries, as the seed did; its Ready
condition says so. Repeated deliveries are recognised by the provider's delivery ID: the ID is
recorded in the trigger's status with the resource-version precondition before the run is
created (so two concurrent copies cannot both start one), and a run carrying that ID in
``spec.trigger.delivery_id`` answers any later copy.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from aiohttp import web

from nomad_pipeline.controller import webhooks
from nomad_pipeline.controller.api import STORE
from nomad_pipeline.controller.api.native import shielded
from nomad_pipeline.controller.api.runs import create_run
from nomad_pipeline.controller.api.seed import namespace_scope
from nomad_pipeline.controller.secrets import SecretResolver
from nomad_pipeline.errors import Conflict, Invalid, TooLarge
from nomad_pipeline.resources.kinds import Flow, Run, RunTrigger, Trigger
from nomad_pipeline.resources.meta import API_GROUP
from nomad_pipeline.resources.ulid import new_ulid, ulid_for
from nomad_pipeline.store.interface import Store

MAX_WEBHOOK_BYTES = 5 * 1024 * 1024
# Delivery IDs remembered per trigger; providers redeliver within hours, not thousands later.
REMEMBERED_DELIVERIES = 200
TRIGGER_LABEL = f"{API_GROUP}/trigger"
SECRET_RESOLVER = web.AppKey("secret_resolver", SecretResolver)
_RECORD_ATTEMPTS = 10


def setup(app: web.Application) -> None:
    """Add the webhook route (``build_api(extra_routes=[triggerhooks.setup])``)."""
    app.router.add_post("/v1/triggers/{id}/webhooks", receive)


def secret_resolver_setup(resolver: SecretResolver) -> Callable[[web.Application], None]:
    """A route setup installing ``resolver`` (with a Nomad client for Nomad-variable secrets);
    without one, only ``from_env`` secrets resolve."""

    def install(app: web.Application) -> None:
        app[SECRET_RESOLVER] = resolver

    return install


async def _read_body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_WEBHOOK_BYTES:
        raise TooLarge(f"webhook body of {request.content_length} bytes is over the 5 MB limit")
    body = await request.content.read(MAX_WEBHOOK_BYTES + 1)
    if len(body) > MAX_WEBHOOK_BYTES:
        raise TooLarge("webhook body is over the 5 MB limit")
    return body


async def _existing_run(store: Store, trigger: Trigger, delivery_id: str) -> Run | None:
    runs = await store.list(
        Run, trigger.metadata.namespace, selector={TRIGGER_LABEL: trigger.metadata.name}
    )
    return next((r for r in runs.items if r.spec.trigger.delivery_id == delivery_id), None)


async def _record_delivery(store: Store, trigger: Trigger, delivery_id: str) -> bool:
    """Record the delivery ID (CAS); False when another copy of it got there first."""
    for _ in range(_RECORD_ATTEMPTS):
        seen = trigger.status.last_delivery_ids
        if delivery_id in seen:
            return False
        status = trigger.status.model_copy(
            update={"last_delivery_ids": [*seen, delivery_id][-REMEMBERED_DELIVERIES:]}
        )
        try:
            await store.update_status(trigger.model_copy(update={"status": status}))
            return True
        except Conflict:
            trigger = await store.get(Trigger, trigger.metadata.namespace, trigger.metadata.name)
    raise Conflict(f"trigger {trigger.metadata.name} kept changing; redeliver the webhook")


async def receive(request: web.Request) -> web.Response:
    namespace = await namespace_scope(request, allow_all=False)
    assert namespace is not None
    store = request.app[STORE]
    body = await _read_body(request)
    trigger = await store.get(Trigger, namespace, request.match_info["id"])
    hook = trigger.spec.source.webhook
    if hook is None:
        raise Invalid(
            f"trigger {namespace}/{trigger.metadata.name} has no webhook source",
            field="spec.source.webhook",
        )
    if hook.secret is not None:
        resolver = request.app.get(SECRET_RESOLVER) or SecretResolver(None)
        secret = await resolver.resolve(hook.secret, field="spec.source.webhook.secret")
        webhooks.verify(
            hook.provider,
            secret=secret,
            body=body,
            headers=request.headers,
            signature_header=hook.signature_header,
        )
    delivery = webhooks.parse(
        hook.provider, body=body, headers=request.headers, variable_paths=hook.variables
    )
    reason = "the trigger is suspended" if trigger.spec.suspend else None
    reason = reason or webhooks.ignore_reason(
        delivery,
        repository=hook.repository,
        events=hook.events,
        branches=hook.branches,
        paths=hook.paths,
    )
    if reason is not None:
        return web.json_response({"ignored": reason}, status=202)
    flow = await store.get(Flow, namespace, trigger.spec.flow)

    async def start() -> web.Response:
        if delivery.delivery_id:
            existing = await _existing_run(store, trigger, delivery.delivery_id)
            if existing is not None:
                return web.json_response({"run": existing.metadata.name}, status=200)
            await _record_delivery(store, trigger, delivery.delivery_id)
        # Without a delivery ID nothing identifies a repeat: every copy is a new delivery.
        seed = f"{trigger.metadata.uid}/webhook/{delivery.delivery_id or new_ulid()}"
        run = await create_run(
            store,
            flow,
            {
                **trigger.spec.variables,
                **{f"trigger.{name}": value for name, value in delivery.variables.items()},
            },
            trigger=RunTrigger(
                type="webhook",
                name=trigger.metadata.name,
                delivery_id=delivery.delivery_id or None,
                event=delivery.event,
            ),
            name=ulid_for(datetime.now(UTC), seed),
            labels={TRIGGER_LABEL: trigger.metadata.name},
        )
        return web.json_response({"run": run.metadata.name}, status=201)

    return await shielded(request.app, start())
