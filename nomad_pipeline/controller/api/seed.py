"""The seed's v1 HTTP API, with its request and response shapes and status codes.

Objects travel in the seed's JSON field names (``{"flow": {"id", "namespace", "variable",
"inline" | "specification"}}``) and are mapped to and from our resources, so the seed's users'
calls keep working. ``?namespace=`` selects a namespace (default ``default``); ``*`` lists every
namespace and is refused where one object is addressed. A namespace that does not exist is 404.
Creating an object that exists is 409; deleting answers ``{}``.

Run creation, cancel, logs and webhooks are other route modules (``build_api(extra_routes=)``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from collections.abc import Collection
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from pydantic import ValidationError

from nomad_pipeline.controller import admission
from nomad_pipeline.controller.api import STORE
from nomad_pipeline.controller.api.errors import read_json_object
from nomad_pipeline.controller.api.native import shielded
from nomad_pipeline.errors import Invalid, NotFound
from nomad_pipeline.resources import manifests
from nomad_pipeline.resources.kinds import (
    Flow,
    InlineStep,
    Namespace,
    Run,
    SpecificationStep,
    Trigger,
)
from nomad_pipeline.resources.meta import API_GROUP, API_VERSION, Resource
from nomad_pipeline.resources.validation import invalid_from
from nomad_pipeline.store.interface import Store

R = TypeVar("R", bound=Resource)

ALL_NAMESPACES = "*"
# Go's zero time, which the seed prints for a time that has not happened yet.
ZERO_TIME = "0001-01-01T00:00:00Z"
# The seed names a trigger's source; we keep that id so a GET answers what was posted.
SOURCE_ID_ANNOTATION = f"{API_GROUP}/seed-source-id"
# A jobspec variable's value in the seed names a flow variable; ours is a template.
_PLAIN_VARIABLE_TEMPLATE = re.compile(r"^\$\{var\.([A-Za-z0-9_.]+)\}$")
# The seed's JSON field names at each level (``variables`` is accepted beside ``variable``).
_FLOW_FIELDS = ("id", "namespace", "variable", "variables", "inline", "specification")
_VARIABLE_FIELDS = ("name", "type", "default", "required", "description")
_RUNNER_FIELDS = ("namespace", "image", "artifact", "resource", "driver")


def setup_seed_routes(app: web.Application) -> None:
    app.router.add_post("/v1/namespaces", create_namespace)
    app.router.add_get("/v1/namespaces", list_namespaces)
    app.router.add_get("/v1/namespaces/{id}", get_namespace)
    app.router.add_delete("/v1/namespaces/{id}", delete_namespace)
    app.router.add_post("/v1/flows", create_flow)
    app.router.add_get("/v1/flows", list_flows)
    app.router.add_get("/v1/flows/{id}", get_flow)
    app.router.add_delete("/v1/flows/{id}", delete_flow)
    app.router.add_get("/v1/runs", list_runs)
    app.router.add_get("/v1/runs/{id}", get_run)
    app.router.add_delete("/v1/runs/{id}", delete_run)
    app.router.add_post("/v1/triggers", create_trigger)
    app.router.add_get("/v1/triggers", list_triggers)
    app.router.add_get("/v1/triggers/{id}", get_trigger)
    app.router.add_delete("/v1/triggers/{id}", delete_trigger)


# ---- helpers --------------------------------------------------------------------------------


def requested_namespace(request: web.Request) -> str:
    return request.query.get("namespace") or admission.DEFAULT_NAMESPACE


async def namespace_scope(request: web.Request, *, allow_all: bool) -> str | None:
    """The namespace a request addresses (None: every namespace); it must exist."""
    namespace = requested_namespace(request)
    if namespace == ALL_NAMESPACES:
        if not allow_all:
            raise Invalid("wildcard namespace not allowed here", field="namespace")
        return None
    await request.app[STORE].get(Namespace, "", namespace)
    return namespace


def _time(value: datetime | None) -> str:
    if value is None:
        return ZERO_TIME
    return value.isoformat().replace("+00:00", "Z")


def _build(kind: type[R], wire: dict[str, Any], where: str) -> R:
    try:
        return kind.model_validate(wire)
    except ValidationError as error:
        raise invalid_from(error, prefix=where) from None


def _object(body: dict[str, Any], key: str, allowed: Collection[str]) -> dict[str, Any]:
    _check_known(body, "", (key,))
    value = body.get(key)
    if not isinstance(value, dict):
        raise Invalid(f"the request body needs {key!r}: an object", field=key)
    _check_known(value, key, allowed)
    return value


def _check_known(value: dict[str, Any], prefix: str, allowed: Collection[str]) -> None:
    """Unknown fields are errors, never silently dropped (a misspelt key must be reported)."""
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        path = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise Invalid(f"{path}: unknown field (known: {', '.join(sorted(allowed))})", field=path)


def _text(value: Any, field: str, *, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise Invalid(f"{field} must be a non-empty string", field=field)
    return value


def _list(value: Any, field: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise Invalid(f"{field} must be a list", field=field)
    return value


def _dict(value: Any, field: str, allowed: Collection[str] | None = None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Invalid(f"{field} must be an object", field=field)
    if allowed is not None:
        _check_known(value, field, allowed)
    return value


async def _create(store: Store, obj: R) -> R:
    await admission.admit(store, obj)
    return await store.create(obj)


async def _listed(request: web.Request, kind: type[R]) -> list[R]:
    """The objects of ``kind`` in the requested namespace (``*``: all), in the store's order."""
    namespace = await namespace_scope(request, allow_all=True)
    return (await request.app[STORE].list(kind, namespace)).items


async def _read(request: web.Request, kind: type[R]) -> R:
    """The object of ``kind`` named by the path's ``id`` in the requested namespace."""
    namespace = await namespace_scope(request, allow_all=False)
    return await request.app[STORE].get(kind, namespace or "", request.match_info["id"])


async def _delete(request: web.Request, kind: type[Resource]) -> web.Response:
    namespace = await namespace_scope(request, allow_all=False)
    name = request.match_info["id"]
    store = request.app[STORE]

    async def delete() -> None:
        await admission.check_deletable(store, kind, namespace or "", name)
        await store.delete(kind, namespace or "", name)

    await shielded(request.app, delete())
    return web.json_response({})


# ---- namespaces -----------------------------------------------------------------------------


def namespace_to_seed(namespace: Namespace) -> dict[str, Any]:
    return {"id": namespace.metadata.name, "description": namespace.spec.description}


async def create_namespace(request: web.Request) -> web.Response:
    """Create a namespace: ``{"namespace": {"id", "description"}}``."""
    seed = _object(await read_json_object(request), "namespace", ("id", "description"))
    wire = {
        "apiVersion": API_VERSION,
        "kind": "Namespace",
        "metadata": {"name": _text(seed.get("id"), "namespace.id")},
        "spec": {
            "description": _text(seed.get("description"), "namespace.description", required=False)
        },
    }
    namespace = _build(Namespace, wire, "namespace")
    created = await shielded(request.app, _create(request.app[STORE], namespace))
    return web.json_response({"namespace": namespace_to_seed(created)}, status=201)


async def list_namespaces(request: web.Request) -> web.Response:
    """List namespaces."""
    listed = await request.app[STORE].list(Namespace, "")
    items = sorted(listed.items, key=lambda namespace: namespace.metadata.name)
    return web.json_response({"namespaces": [namespace_to_seed(ns) for ns in items]})


async def get_namespace(request: web.Request) -> web.Response:
    """Read a namespace."""
    namespace = await request.app[STORE].get(Namespace, "", request.match_info["id"])
    return web.json_response({"namespace": namespace_to_seed(namespace)})


async def delete_namespace(request: web.Request) -> web.Response:
    """Delete a namespace (400 for ``default``, 409 while it holds objects)."""
    name = request.match_info["id"]
    store = request.app[STORE]

    async def delete() -> None:
        await admission.check_deletable(store, Namespace, "", name)
        await store.delete(Namespace, "", name)

    await shielded(request.app, delete())
    return web.json_response({})


# ---- flows ----------------------------------------------------------------------------------


def _job_variable_template(value: Any, field: str) -> str:
    """The seed maps a jobspec variable to a flow variable name; ours is a template."""
    text = _text(value, field)
    return text if "${" in text else f"${{var.{text}}}"


def flow_from_seed(seed: dict[str, Any], namespace: str) -> Flow:
    spec: dict[str, Any] = {}
    variables = seed.get("variable", seed.get("variables"))
    spec["variables"] = [
        {
            key: value
            for key, value in _dict(variable, f"flow.variable[{index}]", _VARIABLE_FIELDS).items()
            if value is not None
        }
        for index, variable in enumerate(_list(variables, "flow.variable"))
    ]
    inline = seed.get("inline")
    specification = seed.get("specification")
    if inline is not None:
        spec["inline"] = _inline_from_seed(_dict(inline, "flow.inline", ("id", "runner", "step")))
    if specification is not None:
        spec["specification"] = {
            "steps": [
                _spec_step_from_seed(
                    _dict(step, f"flow.specification[{index}]", ("id", "condition", "job")), index
                )
                for index, step in enumerate(_list(specification, "flow.specification"))
            ]
        }
    wire = {
        "apiVersion": API_VERSION,
        "kind": "Flow",
        "metadata": {"name": _text(seed.get("id"), "flow.id"), "namespace": namespace},
        "spec": spec,
    }
    return _build(Flow, wire, "flow")


def _inline_from_seed(inline: dict[str, Any]) -> dict[str, Any]:
    runner = _dict(
        _dict(inline.get("runner"), "flow.inline.runner", ("nomad_on_demand",)).get(
            "nomad_on_demand"
        ),
        "flow.inline.runner.nomad_on_demand",
    )
    _check_known(runner, "flow.inline.runner.nomad_on_demand", _RUNNER_FIELDS)
    resource = _dict(
        runner.get("resource"), "flow.inline.runner.nomad_on_demand.resource", ("cpu", "memory")
    )
    image = runner.get("image") or None
    ours_runner: dict[str, Any] = {
        "namespace": runner.get("namespace") or "default",
        # The seed always ran its runner in a container image; without one, run the host's.
        "driver": runner.get("driver") or ("docker" if image else "raw_exec"),
        "artifacts": [
            {
                key: value
                for key, value in _dict(
                    artifact,
                    f"flow.inline.runner.nomad_on_demand.artifact[{index}]",
                    ("source", "destination", "options"),
                ).items()
                if value is not None
            }
            for index, artifact in enumerate(
                _list(runner.get("artifact"), "flow.inline.runner.nomad_on_demand.artifact")
            )
        ],
        "resources": {key: value for key, value in resource.items() if value},
    }
    if image:
        ours_runner["image"] = image
    steps = []
    for index, step in enumerate(_list(inline.get("step"), "flow.inline.step")):
        seed_step = _dict(step, f"flow.inline.step[{index}]", ("id", "condition", "run"))
        ours: dict[str, Any] = {
            "name": seed_step.get("id"),
            "run": seed_step.get("run"),
        }
        if seed_step.get("condition"):
            ours["condition"] = seed_step["condition"]
        steps.append(ours)
    result: dict[str, Any] = {"runner": ours_runner, "steps": steps}
    if inline.get("id"):
        result["job_id"] = inline["id"]
    return result


def _spec_step_from_seed(step: dict[str, Any], index: int) -> dict[str, Any]:
    where = f"flow.specification[{index}].job"
    job = _dict(step.get("job"), where, ("name_format", "path", "raw", "variables"))
    raw = job.get("raw") or None
    path = job.get("path") or None
    ours_job: dict[str, Any] = {
        "variables": {
            name: _job_variable_template(value, f"{where}.variables.{name}")
            for name, value in _dict(job.get("variables"), f"{where}.variables").items()
        }
    }
    if path is not None:
        # Without ``raw`` the server reads the path (as the seed's server did); see create_flow.
        ours_job["path"] = path
        if raw is not None:
            ours_job["source"] = raw
    elif raw is not None:
        ours_job["hcl"] = raw
    if job.get("name_format"):
        ours_job["name_format"] = job["name_format"]
    ours: dict[str, Any] = {"name": step.get("id"), "job": ours_job}
    if step.get("condition"):
        ours["condition"] = step["condition"]
    return ours


def flow_to_seed(flow: Flow) -> dict[str, Any]:
    spec = flow.spec
    seed: dict[str, Any] = {
        "id": flow.metadata.name,
        "namespace": flow.metadata.namespace,
        "variable": [
            {
                "name": variable.name,
                "type": variable.type,
                "default": variable.default,
                "required": variable.required,
            }
            for variable in spec.variables
        ],
        "inline": None,
        "specification": None,
    }
    if spec.inline is not None:
        runner = spec.inline.runner
        seed["inline"] = {
            "id": spec.inline.job_id or flow.metadata.name,
            "runner": {
                "nomad_on_demand": {
                    "namespace": runner.namespace,
                    "image": runner.image or "",
                    "artifact": [
                        {
                            "source": artifact.source,
                            "destination": artifact.destination,
                            "options": artifact.options,
                        }
                        for artifact in runner.artifacts
                    ],
                    "resource": {"cpu": runner.resources.cpu, "memory": runner.resources.memory},
                }
            },
            "step": [_inline_step_to_seed(step) for step in spec.inline.steps],
        }
    if spec.specification is not None:
        seed["specification"] = [_spec_step_to_seed(step) for step in spec.specification.steps]
    return seed


def _inline_step_to_seed(step: InlineStep) -> dict[str, Any]:
    return {"id": step.name, "condition": step.condition or "", "run": step.run}


def _spec_step_to_seed(step: SpecificationStep) -> dict[str, Any]:
    job = step.job
    raw = json.dumps(job.json_) if job.json_ is not None else job.hcl or job.source or ""
    variables = {}
    for name, template in job.variables.items():
        plain = _PLAIN_VARIABLE_TEMPLATE.match(template)
        variables[name] = plain.group(1) if plain else template
    return {
        "id": step.name,
        "condition": step.condition or "",
        "job": {
            "name_format": job.name_format or "",
            "path": job.path or "",
            "raw": raw,
            "variables": variables,
        },
    }


def flow_type(flow: Flow) -> str:
    return "inline" if flow.spec.inline is not None else "specification"


async def create_flow(request: web.Request) -> web.Response:
    """Create a flow: ``{"flow": {"id", "namespace", "variable", "inline"|"specification"}}``."""
    seed = _object(await read_json_object(request), "flow", _FLOW_FIELDS)
    query_namespace = request.query.get("namespace")
    flow_namespace = seed.get("namespace")
    if query_namespace and flow_namespace and query_namespace != flow_namespace:
        raise Invalid(
            f"flow specification namespace {flow_namespace!r} does not match request "
            f"namespace {query_namespace!r}",
            field="flow.namespace",
        )
    namespace = flow_namespace or query_namespace or admission.DEFAULT_NAMESPACE
    if namespace == ALL_NAMESPACES:
        raise Invalid("wildcard namespace not allowed here", field="namespace")
    await request.app[STORE].get(Namespace, "", namespace)
    flow = flow_from_seed(seed, namespace)
    # The seed's server read jobspec paths relative to its own working directory; a path it
    # cannot find is refused naming the field.
    await asyncio.to_thread(manifests.resolve_job_sources, flow, bases=[Path.cwd()])
    created = await shielded(request.app, _create(request.app[STORE], flow))
    return web.json_response({"flow": flow_to_seed(created)}, status=201)


async def list_flows(request: web.Request) -> web.Response:
    """List flows as ``{"flows": [{"id", "namespace", "type"}]}``."""
    items = sorted(await _listed(request, Flow), key=lambda flow: flow.key)
    stubs = [
        {"id": flow.metadata.name, "namespace": flow.metadata.namespace, "type": flow_type(flow)}
        for flow in items
    ]
    return web.json_response({"flows": stubs})


async def get_flow(request: web.Request) -> web.Response:
    """Read a flow."""
    return web.json_response({"flow": flow_to_seed(await _read(request, Flow))})


async def delete_flow(request: web.Request) -> web.Response:
    """Delete a flow."""
    return await _delete(request, Flow)


# ---- runs -----------------------------------------------------------------------------------


def _run_trigger(run: Run) -> str:
    trigger = run.spec.trigger
    return trigger.name or trigger.type


def run_stub(run: Run) -> dict[str, Any]:
    return {
        "id": run.metadata.name,
        "namespace": run.metadata.namespace,
        "flow_id": run.spec.flow,
        "status": run.status.phase,
        "trigger": _run_trigger(run),
        "create_time": _time(run.metadata.creation_timestamp),
    }


def run_to_seed(run: Run) -> dict[str, Any]:
    seed = {
        **run_stub(run),
        "start_time": _time(run.status.start_time),
        "end_time": _time(run.status.end_time),
        "variables": run.spec.variables,
    }
    flow_spec = run.spec.flow_spec
    steps = {step.name: step for step in run.status.steps}
    if flow_spec.inline is not None:
        seed["inline_run"] = {
            "id": flow_spec.inline.job_id or run.spec.flow,
            "inline": [
                {
                    "id": name,
                    "status": steps[name].phase if name in steps else "pending",
                    "exit_code": (steps[name].exit_code or 0) if name in steps else 0,
                    "start_time": _time(steps[name].start_time if name in steps else None),
                    "end_time": _time(steps[name].end_time if name in steps else None),
                }
                for name in flow_spec.step_names
            ],
        }
    else:
        seed["spec_run"] = {
            "spec": [
                {
                    "id": name,
                    "nomad_job_id": (steps[name].nomad_job_id or "") if name in steps else "",
                    "nomad_job_namespace": (steps[name].nomad_namespace or "")
                    if name in steps
                    else "",
                    "status": steps[name].phase if name in steps else "pending",
                    "start_time": _time(steps[name].start_time if name in steps else None),
                    "end_time": _time(steps[name].end_time if name in steps else None),
                }
                for name in flow_spec.step_names
            ]
        }
    return seed


async def list_runs(request: web.Request) -> web.Response:
    """List runs as stubs, oldest first."""
    # Run names are ULIDs: sorting by name sorts by creation time.
    items = sorted(await _listed(request, Run), key=lambda run: run.metadata.name)
    return web.json_response({"runs": [run_stub(run) for run in items]})


async def get_run(request: web.Request) -> web.Response:
    """Read a run with its steps."""
    return web.json_response({"run": run_to_seed(await _read(request, Run))})


async def delete_run(request: web.Request) -> web.Response:
    """Delete a run (200 ``{}``).

    An unfinished run has its Nomad jobs stopped by the run reconciler before it is gone.
    """
    return await _delete(request, Run)


# ---- triggers -------------------------------------------------------------------------------


def _trigger_config(value: Any) -> dict[str, Any]:
    """The seed sends ``config`` as bytes (base64 of JSON in Go's encoding) or an object."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            decoded = json.loads(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            raise Invalid(
                "trigger.source.config must be an object or base64-encoded JSON",
                field="trigger.source.config",
            ) from None
        if isinstance(decoded, dict):
            return decoded
    raise Invalid("trigger.source.config must be an object", field="trigger.source.config")


def trigger_from_seed(seed: dict[str, Any], namespace: str) -> Trigger:
    source = _dict(seed.get("source"), "trigger.source", ("id", "provider", "config"))
    if not source:
        raise Invalid("trigger source cannot be empty", field="trigger.source")
    provider = _text(source.get("provider"), "trigger.source.provider")
    config = _trigger_config(source.get("config"))
    ours_source: dict[str, Any]
    if provider == "cron":
        ours_source = {"cron": {"schedules": config.get("crons", config.get("schedules"))}}
        if config.get("timezone"):
            ours_source["cron"]["timezone"] = config["timezone"]
    elif provider == "git-webhook":
        if config.get("secret"):
            raise Invalid(
                "a webhook secret is not stored in objects: apply a Trigger whose "
                "spec.source.webhook.secret names an environment variable or Nomad variable",
                field="trigger.source.config.secret",
            )
        webhook = {
            key: config[key] for key in ("provider", "repository", "events") if config.get(key)
        }
        ours_source = {"webhook": webhook}
    else:
        raise Invalid(
            f"unknown trigger provider {provider!r}: use cron or git-webhook",
            field="trigger.source.provider",
        )
    annotations = {SOURCE_ID_ANNOTATION: source["id"]} if source.get("id") else {}
    wire = {
        "apiVersion": API_VERSION,
        "kind": "Trigger",
        "metadata": {
            "name": _text(seed.get("id"), "trigger.id"),
            "namespace": namespace,
            "annotations": annotations,
        },
        "spec": {"flow": _text(seed.get("flow"), "trigger.flow"), "source": ours_source},
    }
    return _build(Trigger, wire, "trigger")


def trigger_to_seed(trigger: Trigger) -> dict[str, Any]:
    source = trigger.spec.source
    config: dict[str, Any]
    if source.cron is not None:
        provider = "cron"
        config = {"crons": source.cron.schedules, "timezone": source.cron.timezone}
    elif source.webhook is not None:
        provider = "git-webhook"
        config = {
            "provider": source.webhook.provider,
            "repository": source.webhook.repository or "",
            "events": source.webhook.events,
        }
    else:
        assert source.git is not None
        provider = "git"
        config = {"url": source.git.url, "branch": source.git.branch}
    encoded = base64.b64encode(json.dumps(config).encode()).decode()
    return {
        "id": trigger.metadata.name,
        "namespace": trigger.metadata.namespace,
        "flow": trigger.spec.flow,
        "source": {
            "id": trigger.metadata.annotations.get(SOURCE_ID_ANNOTATION, source.type),
            "provider": provider,
            "config": encoded,
        },
    }


async def create_trigger(request: web.Request) -> web.Response:
    """Create a trigger: ``{"trigger": {"id", "namespace", "flow", "source"}}``."""
    seed = _object(
        await read_json_object(request), "trigger", ("id", "namespace", "flow", "source")
    )
    namespace = seed.get("namespace") or requested_namespace(request)
    if namespace == ALL_NAMESPACES:
        raise Invalid("wildcard namespace not allowed here", field="namespace")
    store = request.app[STORE]
    await store.get(Namespace, "", namespace)
    trigger = trigger_from_seed(seed, namespace)
    try:
        await store.get(Flow, namespace, trigger.spec.flow)
    except NotFound:
        raise NotFound(
            f"flow {trigger.spec.flow!r} not found in namespace {namespace!r}",
            field="trigger.flow",
        ) from None
    created = await shielded(request.app, _create(store, trigger))
    return web.json_response({"trigger": trigger_to_seed(created)}, status=201)


async def list_triggers(request: web.Request) -> web.Response:
    """List triggers as ``{"triggers": [{"id", "namespace", "flow"}]}``."""
    items = sorted(await _listed(request, Trigger), key=lambda trigger: trigger.key)
    stubs = [
        {"id": t.metadata.name, "namespace": t.metadata.namespace, "flow": t.spec.flow}
        for t in items
    ]
    return web.json_response({"triggers": stubs})


async def get_trigger(request: web.Request) -> web.Response:
    """Read a trigger."""
    return web.json_response({"trigger": trigger_to_seed(await _read(request, Trigger))})


async def delete_trigger(request: web.Request) -> web.Response:
    """Delete a trigger."""
    return await _delete(request, Trigger)
