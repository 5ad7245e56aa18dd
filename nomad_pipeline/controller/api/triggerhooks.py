"""Webhook deliveries for triggers: ``POST /v1/triggers/{id}/webhooks?namespace=NS``.

Answers, all JSON:
- ``201 {"run": "<name>"}``: the delivery started a run (created, not awaited);
- ``200 {"run": "<name>"}``: a repeated delivery ID; the run it started before, nothing new;
- ``202 {"ignored": "<reason>"}``: authenticated, but the trigger does not want it (event,
  branch, path, repository filters, a suspended trigger);
- 401 bad or missing signature/token (nothing happens), 404 unknown trigger, 400 a trigger
  without a webhook source or a malformed body, 413 a body over 5 MB.

A trigger without a ``secret`` accepts unauthenticated deliveries, as the seed did; its Ready
condition says so. Repeated deliveries are recognised by the provider's delivery ID: the ID and
the run name it starts are recorded in the trigger's status with the resource-version
precondition before the run is created; every later copy (concurrent, or after a crash between
the record and the create) creates that same name, so one run exists and later copies get 200.
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
from nomad_pipeline.errors import AlreadyExists, Conflict, Invalid, TooLarge
from nomad_pipeline.resources.kinds import TRIGGER_LABEL, Flow, RunTrigger, Trigger
from nomad_pipeline.resources.ulid import new_ulid, ulid_for
from nomad_pipeline.store.interface import Store

MAX_WEBHOOK_BYTES = 5 * 1024 * 1024
# Delivery IDs remembered per trigger; providers redeliver within hours, not thousands later.
REMEMBERED_DELIVERIES = 200
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


async def _record_delivery(store: Store, trigger: Trigger, delivery_id: str, run_name: str) -> str:
    """Record that ``delivery_id`` starts ``run_name`` (CAS), before the run is created; the
    run name recorded by an earlier copy of the delivery when there is one. Every copy then
    creates the same run name, so one run exists however many copies arrive, concurrently or
    after a crash between the record and the create."""
    for _ in range(_RECORD_ATTEMPTS):
        seen = trigger.status.last_deliveries
        if delivery_id in seen:
            return seen[delivery_id]
        recent = list(seen.items())[-(REMEMBERED_DELIVERIES - 1) :]
        status = trigger.status.model_copy(
            update={"last_deliveries": {**dict(recent), delivery_id: run_name}}
        )
        try:
            await store.update_status(trigger.model_copy(update={"status": status}))
            return run_name
        except Conflict:
            trigger = await store.get(Trigger, trigger.metadata.namespace, trigger.metadata.name)
    raise Conflict(f"trigger {trigger.metadata.name} kept changing; redeliver the webhook")


async def receive(request: web.Request) -> web.Response:
    """Receive a webhook delivery for a trigger: start a run, or say why it was ignored."""
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
        # Without a delivery ID nothing identifies a repeat: every copy is a new delivery.
        seed = f"{trigger.metadata.uid}/webhook/{delivery.delivery_id or new_ulid()}"
        name = ulid_for(datetime.now(UTC), seed)
        if delivery.delivery_id:
            name = await _record_delivery(store, trigger, delivery.delivery_id, name)
        try:
            run = await create_run(
                store,
                flow,
                {
                    **trigger.spec.variables,
                    **{f"trigger.{key}": value for key, value in delivery.variables.items()},
                },
                trigger=RunTrigger(
                    type="webhook",
                    name=trigger.metadata.name,
                    delivery_id=delivery.delivery_id or None,
                    event=delivery.event,
                ),
                name=name,
                labels={TRIGGER_LABEL: trigger.metadata.name},
            )
        except AlreadyExists:
            return web.json_response({"run": name}, status=200)
        return web.json_response({"run": run.metadata.name}, status=201)

    return await shielded(request.app, start())
