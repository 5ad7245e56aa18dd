"""JSON Schema of every kind, for ``nomad-pipeline schema`` and editors validating manifests."""

from __future__ import annotations

import copy
import functools
from typing import Any

from nomad_pipeline.resources.meta import API_VERSION
from nomad_pipeline.resources.registry import KINDS


def json_schemas() -> dict[str, dict[str, Any]]:
    """``{Kind: JSON Schema}``, a fresh copy each call (building them takes a while)."""
    return copy.deepcopy(_build_schemas())


@functools.cache
def _build_schemas() -> dict[str, dict[str, Any]]:
    """``{Kind: JSON Schema}``; apiVersion and kind are constants, as an editor needs them.

    ``apiVersion`` may be left out of a manifest (it defaults to the one version there is).
    """
    schemas: dict[str, dict[str, Any]] = {}
    for name, kind in KINDS.items():
        schema = kind.model_json_schema(by_alias=True, mode="validation")
        properties = schema.setdefault("properties", {})
        properties["apiVersion"] = {"const": API_VERSION, "default": API_VERSION}
        properties["kind"] = {"const": name}
        required = schema.setdefault("required", [])
        if "kind" not in required:
            required.append("kind")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["title"] = name
        schemas[name] = schema
    return schemas
