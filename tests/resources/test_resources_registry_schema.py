"""Kind names users may type, and the JSON Schemas editors validate manifests with."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from nomad_pipeline.errors import Invalid
from nomad_pipeline.resources.kinds import Flow, GitRepository, Namespace, Run, Trigger
from nomad_pipeline.resources.meta import API_VERSION, Resource
from nomad_pipeline.resources.registry import KINDS, kind_for
from nomad_pipeline.resources.schema import json_schemas

EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"

ALIASES: list[tuple[str, type[Resource]]] = [
    ("flow", Flow),
    ("flows", Flow),
    ("Flow", Flow),
    ("FLOWS", Flow),
    ("run", Run),
    ("runs", Run),
    ("Run", Run),
    ("trigger", Trigger),
    ("triggers", Trigger),
    ("Trigger", Trigger),
    ("namespace", Namespace),
    ("namespaces", Namespace),
    ("ns", Namespace),
    ("Namespace", Namespace),
    ("gitrepository", GitRepository),
    ("gitrepositories", GitRepository),
    ("gitrepo", GitRepository),
    ("GitRepository", GitRepository),
]


@pytest.mark.parametrize(("name", "kind"), ALIASES)
def test_kind_for_accepts_every_spelling(name: str, kind: type[Resource]) -> None:
    assert kind_for(name) is kind


def test_unknown_kind_lists_the_known_ones() -> None:
    with pytest.raises(Invalid) as caught:
        kind_for("pods")
    assert caught.value.message == (
        "unknown kind 'pods'; known kinds: namespace/namespaces/ns, flow/flows, run/runs, "
        "trigger/triggers, gitrepository/gitrepositories/gitrepo"
    )
    assert caught.value.field == "kind"


def test_kinds_registry() -> None:
    assert {
        "Namespace": Namespace,
        "Flow": Flow,
        "Run": Run,
        "Trigger": Trigger,
        "GitRepository": GitRepository,
    } == KINDS


def test_every_kind_has_a_schema_with_constant_envelope() -> None:
    schemas = json_schemas()
    assert set(schemas) == set(KINDS)
    for name, schema in schemas.items():
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["properties"]["kind"] == {"const": name}
        assert schema["properties"]["apiVersion"]["const"] == API_VERSION
        assert "kind" in schema["required"]


def test_example_manifests_validate_against_the_schemas() -> None:
    schemas = json_schemas()
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            jsonschema.validate(document, schemas[document["kind"]])


def test_schema_refuses_unknown_fields_and_wrong_kind() -> None:
    schema = json_schemas()["Namespace"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"kind": "Namespace", "metadata": {"name": "a"}, "oops": 1}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"kind": "Flow", "metadata": {"name": "a"}}, schema)
