"""Contract test: the dev agent's responses validate against Nomad's OpenAPI schemas.

The schemas come from ``../shared/reference/nomad-openapi.yaml`` (hashicorp/nomad-openapi),
converted from OpenAPI 3.0 to JSON Schema: ``$ref``s into ``#/components/schemas`` resolve
inside one root document. Where the OpenAPI spec and the real server (nomad-api.md) disagree,
nomad-api.md wins; each deviation is listed in ``DEVIATIONS`` below and applied explicitly.
"""

from __future__ import annotations

import base64
import functools
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from devagent_http_support import (
    Api,
    batch_job,
    job_allocations,
    wait_job_status,
)

# Where the OpenAPI document and the real server disagree (nomad-api.md wins):
DEVIATIONS = {
    # nomad-api.md §0: Go encodes nil slices and maps as null, which the generated schemas
    # (no "nullable") do not allow; every array and object may therefore be null.
    "nil-collections": "arrays and objects may be null",
    # Go []byte fields (Job.Payload) encode nil as null, not as a base64 string.
    "nil-bytes": "byte strings may be null",
    # nomad-api.md §0: zero timestamps (TaskState.FinishedAt of a running task) are null
    # in current servers; date-time strings may therefore be null.
    "zero-times": "date-time strings may be null",
    # Go pointer fields (*time.Duration, *bool) are null when unset, as api.TaskGroup's
    # durations after Canonicalize and DesiredTransition's flags (nomad-api.md §5.1: "each a
    # bool or null"); the generated schemas type them as plain integers and booleans.
    "pointer-fields": "the POINTER_FIELDS below may be null",
    # nomad-api.md §7.2: DELETE /v1/var/:path answers 204 with no body, not the documented
    # {"Index": N}; there is nothing to validate.
    "var-delete-204": "DELETE /v1/var/:path has no body",
    # nomad-api.md §1.3: the spec declares `index` as a header; the server reads ?index=.
    # This test does not send `index`, so it does not matter here; noted for completeness.
    "index-is-a-query-parameter": "blocking index is a query parameter",
}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    kind = schema.get("type")
    if kind in ("array", "object") or (
        kind == "string" and schema.get("format") in ("date-time", "byte")
    ):
        return {**schema, "type": [kind, "null"]}
    return schema


def to_json_schema(node: Any) -> Any:
    """OpenAPI 3.0 schema objects into JSON Schema (Draft 7), applying the deviations."""
    if isinstance(node, list):
        return [to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: to_json_schema(value) for key, value in node.items()}
    if "$ref" in converted:
        # Draft 7 ignores siblings of $ref; the referenced schema may still be null.
        return {"anyOf": [{"$ref": converted["$ref"]}, {"type": "null"}]}
    if converted.get("nullable") is True:
        converted.pop("nullable")
        kind = converted.get("type")
        if isinstance(kind, str):
            converted["type"] = [kind, "null"]
    return _nullable(converted)


# DEVIATIONS["pointer-fields"]: schema fields that are Go pointers.
POINTER_FIELDS = {
    "TaskGroup": (
        "ShutdownDelay",
        "MaxRunDuration",
        "StopAfterClientDisconnect",
        "MaxClientDisconnect",
    ),
    "DesiredTransition": ("Migrate", "Reschedule", "ForceReschedule", "NoShutdownDelay"),
}


class Contract:
    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        schemas = to_json_schema(document["components"]["schemas"])
        for name, fields in POINTER_FIELDS.items():
            properties = schemas[name]["properties"]
            for field_name in fields:
                if field_name in properties:
                    kind = properties[field_name]["type"]
                    properties[field_name] = {**properties[field_name], "type": [kind, "null"]}
        self.components = {"schemas": schemas}

    def schema(self, path: str, method: str) -> dict[str, Any]:
        operation = self.document["paths"][path][method]
        response = operation["responses"]["200"]
        if "$ref" in response:
            name = response["$ref"].rsplit("/", 1)[1]
            response = self.document["components"]["responses"][name]
        content = response["content"]["application/json"]["schema"]
        schema: dict[str, Any] = to_json_schema(content)
        return schema

    def validate(self, body: Any, path: str, method: str = "get") -> None:
        schema = {**self.schema(path, method), "components": self.components}
        error = jsonschema.exceptions.best_match(
            jsonschema.Draft7Validator(schema).iter_errors(body)
        )
        if error is not None:
            # anyOf (our nullable $refs) hides the real failure one level down.
            while error.context:
                error = jsonschema.exceptions.best_match(error.context)
            where = "/".join(str(p) for p in error.absolute_path)
            pytest.fail(f"{method.upper()} {path}: at {where or '<root>'}: {error.message}")


@functools.cache
def load_contract(path: Path) -> Contract:
    """Parsed once per session: the document is 250 KB of YAML."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return Contract(yaml.load(path.read_text(), Loader=loader))


@pytest.fixture
def contract(shared_reference: Path) -> Contract:
    return load_contract(shared_reference / "nomad-openapi.yaml")


async def test_cluster_endpoints(contract: Contract, api: Api) -> None:
    contract.validate(await api.ok("GET", "/v1/status/leader"), "/status/leader")
    contract.validate(await api.ok("GET", "/v1/status/peers"), "/status/peers")
    contract.validate(await api.ok("GET", "/v1/regions"), "/regions")
    nodes = await api.ok("GET", "/v1/nodes")
    contract.validate(nodes, "/nodes")
    node_id = nodes[0]["ID"]
    contract.validate(await api.ok("GET", f"/v1/node/{node_id}"), "/node/{nodeId}")
    contract.validate(
        await api.ok("GET", f"/v1/node/{node_id}/allocations"), "/node/{nodeId}/allocations"
    )
    await api.ok("PUT", "/v1/namespace/ci", json_body={"Name": "ci", "Description": "d"})
    contract.validate(await api.ok("GET", "/v1/namespaces"), "/namespaces")
    contract.validate(await api.ok("GET", "/v1/namespace/ci"), "/namespace/{namespaceName}")


async def test_variable_endpoints(contract: Contract, api: Api) -> None:
    written = await api.ok("PUT", "/v1/var/contract/x", json_body={"Items": {"k": "v"}})
    contract.validate(written, "/var/{path}", "put")
    contract.validate(await api.ok("GET", "/v1/var/contract/x"), "/var/{path}")
    contract.validate(await api.ok("GET", "/v1/vars"), "/vars")
    status, _, body = await api.call("DELETE", "/v1/var/contract/x")
    assert (status, body) == (204, "")  # DEVIATIONS["var-delete-204"]


async def test_job_evaluation_and_allocation_endpoints(contract: Contract, api: Api) -> None:
    registered = await api.ok("POST", "/v1/jobs", json_body={"Job": batch_job("c-job", "true")})
    contract.validate(registered, "/jobs", "post")
    await wait_job_status(api, "c-job", "dead")
    contract.validate(await api.ok("GET", "/v1/jobs"), "/jobs")
    contract.validate(await api.ok("GET", "/v1/job/c-job"), "/job/{jobName}")
    contract.validate(
        await api.ok("GET", "/v1/job/c-job/allocations"), "/job/{jobName}/allocations"
    )
    contract.validate(
        await api.ok("GET", "/v1/job/c-job/evaluations"), "/job/{jobName}/evaluations"
    )
    contract.validate(await api.ok("GET", "/v1/job/c-job/summary"), "/job/{jobName}/summary")
    contract.validate(await api.ok("GET", "/v1/job/c-job/versions"), "/job/{jobName}/versions")
    (stub,) = await job_allocations(api, "c-job")
    contract.validate(await api.ok("GET", "/v1/allocations"), "/allocations")
    allocation = await api.ok("GET", f"/v1/allocation/{stub['ID']}")
    contract.validate(allocation, "/allocation/{allocID}")
    contract.validate(await api.ok("GET", "/v1/evaluations"), "/evaluations")
    eval_id = registered["EvalID"]
    contract.validate(await api.ok("GET", f"/v1/evaluation/{eval_id}"), "/evaluation/{evalID}")
    contract.validate(
        await api.ok("GET", f"/v1/evaluation/{eval_id}/allocations"),
        "/evaluation/{evalID}/allocations",
    )
    contract.validate(
        await api.ok("POST", f"/v1/allocation/{stub['ID']}/stop"),
        "/allocation/{allocID}/stop",
        "post",
    )
    contract.validate(await api.ok("DELETE", "/v1/job/c-job"), "/job/{jobName}", "delete")


async def test_dispatch_parse_and_validate(contract: Contract, api: Api) -> None:
    parent = batch_job("c-param", "true", parameterized={"Payload": "optional"})
    await api.ok("POST", "/v1/job/c-param", json_body={"Job": parent})
    dispatched = await api.ok(
        "POST",
        "/v1/job/c-param/dispatch",
        json_body={"Payload": base64.b64encode(b"x").decode()},
    )
    contract.validate(dispatched, "/job/{jobName}/dispatch", "post")
    parsed = await api.ok(
        "POST",
        "/v1/jobs/parse",
        json_body={
            "JobHCL": 'job "p" {\n  group "g" {\n    task "t" {\n      driver = "raw_exec"\n'
            '      config {\n        command = "/bin/true"\n      }\n    }\n  }\n}\n',
            "Canonicalize": True,
        },
    )
    contract.validate(parsed, "/jobs/parse", "post")
    validated = await api.ok("POST", "/v1/validate/job", json_body={"Job": parsed})
    contract.validate(validated, "/validate/job", "post")


async def test_system_gc(contract: Contract, api: Api) -> None:
    # The document declares a 200 without content for PUT /system/gc: the body is empty.
    operation = contract.document["paths"]["/system/gc"]["put"]
    name = operation["responses"]["200"]["$ref"].rsplit("/", 1)[1]
    assert "content" not in contract.document["components"]["responses"][name]
    status, _, body = await api.put("/v1/system/gc")
    assert (status, body) == (200, "")
