"""An OpenAPI 3.1 document of this API, generated from the live route table and the models.

Paths and methods come from the application's router (so routes added by other modules appear
too), summaries from the handlers' docstrings, and component schemas from
``resources.schema.json_schemas()`` (the schemas ``nomad-pipeline schema`` prints; OpenAPI 3.1
schemas are JSON Schema), their ``$defs`` hoisted into ``components.schemas``.
"""

from __future__ import annotations

import inspect
import json
import re
from typing import Any

from aiohttp import web

from nomad_pipeline.resources.registry import KINDS
from nomad_pipeline.resources.schema import json_schemas

_PATH_PARAMETER = re.compile(r"{(\w+)(?::[^}]*)?}")
_COMPONENT_PREFIX = "#/components/schemas/"

# Query parameters by path prefix; everything else is described by the path and the body.
_NATIVE_LIST_QUERY = [
    ("labelSelector", "Exact label matches, `a=b,c=d`."),
    ("watch", "`true` streams NDJSON watch events instead of answering a list."),
    ("resource_version", "Watch from this store version (without it: list, then watch)."),
]
_SEED_QUERY = [("namespace", "The namespace (default `default`; `*` lists every namespace).")]


def _kind_schemas() -> tuple[dict[str, Any], dict[str, Any]]:
    """Component schemas of every kind and of the models they use; a ref to each kind."""
    # Each kind's schema is a standalone document whose refs point at its own "$defs"; in the
    # OpenAPI document they all live under components.schemas.
    text = json.dumps(json_schemas()).replace('"#/$defs/', f'"{_COMPONENT_PREFIX}')
    components: dict[str, Any] = {}
    for name, schema in json.loads(text).items():
        components.update(schema.pop("$defs", {}))
        schema.pop("$schema", None)
        components[name] = schema
    refs = {name: {"$ref": f"{_COMPONENT_PREFIX}{name}"} for name in KINDS}
    return components, refs


def _query(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": {"type": "string"},
    }


def _operation(route: web.AbstractRoute, path: str, kind_refs: dict[str, Any]) -> dict[str, Any]:
    doc = inspect.getdoc(route.handler) or ""
    summary = doc.splitlines()[0] if doc else f"{route.method} {path}"
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _PATH_PARAMETER.findall(path)
    ]
    if path.startswith("/apis/") and route.method == "GET" and not path.endswith("{name}"):
        parameters += [_query(name, text) for name, text in _NATIVE_LIST_QUERY]
    if path.startswith("/v1/") and path != "/v1/openapi.json":
        parameters += [_query(name, text) for name, text in _SEED_QUERY]
    operation: dict[str, Any] = {
        "summary": summary,
        "operationId": f"{route.method.lower()}_{getattr(route.handler, '__name__', 'handler')}",
        "responses": {
            "default": {
                "description": 'An error: `{"error": {code, reason, message, field}}`.',
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
            "200": {"description": "Success.", "content": {"application/json": {}}},
        },
    }
    if path.startswith("/apis/") and route.method == "DELETE":
        operation["responses"]["202"] = {
            "description": "Accepted: finalizers hold the object; it is answered marked for "
            "deletion (`metadata.deletion_timestamp`) and goes once they are removed.",
            "content": {"application/json": {}},
        }
    if len(doc.splitlines()) > 1:
        operation["description"] = doc
    if parameters:
        operation["parameters"] = parameters
    if path.endswith("/apply") and route.method == "PUT":
        operation["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["items"],
                        "properties": {
                            "items": {"type": "array", "items": {"oneOf": list(kind_refs.values())}}
                        },
                    }
                }
            },
        }
    return operation


def openapi_document(app: web.Application) -> dict[str, Any]:
    definitions, kind_refs = _kind_schemas()
    paths: dict[str, dict[str, Any]] = {}
    for resource in app.router.resources():
        path = _PATH_PARAMETER.sub(lambda match: "{" + match.group(1) + "}", resource.canonical)
        for route in resource:
            if route.method in ("HEAD", "*"):
                continue
            paths.setdefault(path, {})[route.method.lower()] = _operation(route, path, kind_refs)
    schemas: dict[str, Any] = dict(definitions)
    schemas["Error"] = {
        "type": "object",
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "reason", "message"],
                "properties": {
                    "code": {"type": "integer"},
                    "reason": {"type": "string"},
                    "message": {"type": "string"},
                    "field": {"type": "string"},
                },
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "nomad-pipeline controller API",
            "version": "v1",
            "description": "Native resource API under /apis/nomad-pipeline.io/v1 and the seed's "
            "v1 API under /v1.",
        },
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": schemas},
    }
