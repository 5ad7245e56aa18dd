"""The seed's v1 API over real HTTP: its shapes and status codes, mapped onto our resources."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from controller_api_helpers import API, Api, run

from nomad_pipeline.resources.kinds import Run

SEED_INLINE_FLOW = {
    "id": "terraform-provider-nomad",
    "namespace": "jrasell",
    "variable": [
        {"name": "go_version", "type": "string", "default": "1.25.4"},
        {"name": "trigger.git_sha", "type": "string", "required": True},
    ],
    "inline": {
        "id": "test-compile",
        "runner": {
            "nomad_on_demand": {
                "namespace": "default",
                "image": "jrasell/nomad-pipeline-runner:latest",
                "artifact": [
                    {
                        "source": "git::https://github.com/jrasell/terraform-provider-nomad",
                        "destination": "terraform-provider-nomad",
                        "options": {"ref": "${var.trigger.git_sha}"},
                    }
                ],
                "resource": {"cpu": 1000, "memory": 1024},
            }
        },
        "step": [
            {"id": "setup", "run": "echo go ${var.go_version}"},
            {"id": "run_build", "run": "go build"},
            {
                "id": "failure_notification",
                "condition": 'inline.steps.run_build.status == "failed"',
                "run": "echo failed ${var.trigger.git_sha}",
            },
        ],
    },
}


async def test_namespaces_create_list_get_delete(api: Api) -> None:
    status, body = await api.call(
        "POST", "/v1/namespaces", json={"namespace": {"id": "jrasell", "description": "mine"}}
    )
    assert status == 201, body
    assert body == {"namespace": {"id": "jrasell", "description": "mine"}}
    status, body = await api.call("POST", "/v1/namespaces", json={"namespace": {"id": "jrasell"}})
    assert status == 409, body
    status, body = await api.call("GET", "/v1/namespaces")
    assert status == 200
    assert body["namespaces"] == [
        {"id": "default", "description": "The default namespace"},
        {"id": "jrasell", "description": "mine"},
    ]
    status, body = await api.call("GET", "/v1/namespaces/jrasell")
    assert body == {"namespace": {"id": "jrasell", "description": "mine"}}
    # The same object through the native API.
    status, native = await api.call("GET", f"{API}/namespaces/jrasell")
    assert native["spec"]["description"] == "mine"

    status, body = await api.call("DELETE", "/v1/namespaces/default")
    assert status == 400
    status, body = await api.call("DELETE", "/v1/namespaces/jrasell")
    assert (status, body) == (200, {})
    status, body = await api.call("GET", "/v1/namespaces/jrasell")
    assert status == 404
    assert set(body["error"]) >= {"code", "message"}


async def test_inline_flow_round_trips_in_seed_shape(api: Api) -> None:
    await api.call("POST", "/v1/namespaces", json={"namespace": {"id": "jrasell"}})
    status, body = await api.call("POST", "/v1/flows", json={"flow": SEED_INLINE_FLOW})
    assert status == 201, body
    flow = body["flow"]
    assert flow["id"] == "terraform-provider-nomad"
    assert flow["inline"]["id"] == "test-compile"
    assert [step["id"] for step in flow["inline"]["step"]] == [
        "setup",
        "run_build",
        "failure_notification",
    ]
    assert flow["inline"]["step"][2]["condition"] == 'inline.steps.run_build.status == "failed"'
    runner = flow["inline"]["runner"]["nomad_on_demand"]
    assert runner["image"] == "jrasell/nomad-pipeline-runner:latest"
    assert runner["resource"] == {"cpu": 1000, "memory": 1024}
    assert runner["artifact"][0]["options"] == {"ref": "${var.trigger.git_sha}"}
    assert flow["variable"][1] == {
        "name": "trigger.git_sha",
        "type": "string",
        "default": None,
        "required": True,
    }

    status, body = await api.call("POST", "/v1/flows", json={"flow": SEED_INLINE_FLOW})
    assert status == 409

    status, body = await api.call("GET", "/v1/flows", namespace="jrasell")
    assert body == {
        "flows": [{"id": "terraform-provider-nomad", "namespace": "jrasell", "type": "inline"}]
    }
    status, body = await api.call("GET", "/v1/flows")
    assert body == {"flows": []}
    status, body = await api.call("GET", "/v1/flows", namespace="*")
    assert len(body["flows"]) == 1
    status, body = await api.call("GET", "/v1/flows/terraform-provider-nomad", namespace="*")
    assert status == 400
    status, body = await api.call("GET", "/v1/flows/terraform-provider-nomad", namespace="jrasell")
    assert status == 200
    assert body["flow"]["inline"] == flow["inline"]

    status, native = await api.call(
        "GET", f"{API}/namespaces/jrasell/flows/terraform-provider-nomad"
    )
    assert native["spec"]["inline"]["runner"]["driver"] == "docker"
    assert native["spec"]["inline"]["steps"][1]["name"] == "run_build"

    status, body = await api.call(
        "DELETE", "/v1/flows/terraform-provider-nomad", namespace="jrasell"
    )
    assert (status, body) == (200, {})


async def test_specification_flow_maps_raw_jobspec_and_variable_names(api: Api) -> None:
    seed = {
        "id": "deploy",
        "variables": [{"name": "env", "type": "string", "default": "dev"}],
        "specification": [
            {
                "id": "step1",
                "job": {
                    "raw": 'job "x" { type = "batch" }',
                    "name_format": "${nomad_pipeline.run_id}-step1",
                    "variables": {"environment": "env"},
                },
            },
            {
                "id": "step2",
                "condition": 'specifications.step1.status == "failed"',
                "job": {"raw": 'job "y" {}', "path": "step2.nomad.hcl"},
            },
        ],
    }
    status, body = await api.call("POST", "/v1/flows", json={"flow": seed})
    assert status == 201, body
    spec = body["flow"]["specification"]
    assert spec[0]["job"]["variables"] == {"environment": "env"}
    assert spec[0]["job"]["raw"] == 'job "x" { type = "batch" }'
    assert spec[1]["job"]["path"] == "step2.nomad.hcl"
    assert body["flow"]["namespace"] == "default"
    _, native = await api.call("GET", f"{API}/namespaces/default/flows/deploy")
    steps = native["spec"]["specification"]["steps"]
    assert steps[0]["job"]["variables"] == {"environment": "${var.env}"}
    assert steps[0]["job"]["hcl"] == 'job "x" { type = "batch" }'
    assert steps[1]["job"]["source"] == 'job "y" {}'
    _, stubs = await api.call("GET", "/v1/flows")
    assert stubs["flows"][0]["type"] == "specification"


async def test_flow_with_unreadable_jobspec_path_names_the_field(api: Api) -> None:
    seed = {"id": "deploy", "specification": [{"id": "s", "job": {"path": "missing.hcl"}}]}
    status, body = await api.call("POST", "/v1/flows", json={"flow": seed})
    assert status == 400, body
    assert body["error"]["field"] == "spec.specification.steps[0].job.path"
    assert "missing.hcl" in body["error"]["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "flow"),
        ({"flow": {"namespace": "default", "inline": {}}}, "flow.id"),
        ({"flow": {"id": "x", "namespace": "nope", "inline": {}}}, None),
    ],
)
async def test_bad_flow_requests(api: Api, body: dict[str, object], field: str | None) -> None:
    status, answer = await api.call("POST", "/v1/flows", json=body)
    assert status in (400, 404), answer
    assert answer["error"].get("field") == field


async def test_flow_namespace_must_match_the_query(api: Api) -> None:
    await api.call("POST", "/v1/namespaces", json={"namespace": {"id": "other"}})
    flow = {**SEED_INLINE_FLOW, "namespace": "other"}
    status, body = await api.call("POST", "/v1/flows", json={"flow": flow}, namespace="default")
    assert status == 400
    assert "does not match" in body["error"]["message"]


async def test_runs_list_get_delete_in_seed_shape(api: Api) -> None:
    await api.apply(run("01j00000000000000000000001"), run("01j00000000000000000000002"))
    status, body = await api.call("GET", "/v1/runs")
    assert status == 200
    assert [stub["id"] for stub in body["runs"]] == [
        "01j00000000000000000000001",
        "01j00000000000000000000002",
    ]
    stub = body["runs"][0]
    assert set(stub) == {"id", "namespace", "flow_id", "status", "trigger", "create_time"}
    assert (stub["flow_id"], stub["status"], stub["trigger"]) == ("hello", "pending", "manual")

    status, body = await api.call("GET", "/v1/runs/01j00000000000000000000001")
    assert status == 200
    seed_run = body["run"]
    assert seed_run["variables"] == {"greeting": "hello"}
    assert seed_run["end_time"] == "0001-01-01T00:00:00Z"
    assert seed_run["inline_run"]["inline"] == [
        {
            "id": "say",
            "status": "pending",
            "exit_code": 0,
            "start_time": "0001-01-01T00:00:00Z",
            "end_time": "0001-01-01T00:00:00Z",
        }
    ]
    # An unfinished run is deleted too: its finalizer has the run reconciler stop its jobs
    # first (these tests run the API alone, so the test finishes the deletion in its place).
    status, body = await api.call("DELETE", "/v1/runs/01j00000000000000000000001")
    assert (status, body) == (200, {})
    marked = await api.store.get(Run, "default", "01j00000000000000000000001")
    assert marked.metadata.deletion_timestamp is not None
    await api.finish_deletion(Run, "default", "01j00000000000000000000001")
    status, _ = await api.call("GET", "/v1/runs/01j00000000000000000000001")
    assert status == 404
    status, body = await api.call("GET", "/v1/runs", namespace="missing")
    assert status == 404


async def test_triggers_create_list_get_delete(api: Api) -> None:
    trigger = {
        "id": "nightly",
        "namespace": "default",
        "flow": "terraform-provider-nomad",
        "source": {"id": "every-minute", "provider": "cron", "config": {"crons": ["*/1 * * * *"]}},
    }
    status, body = await api.call("POST", "/v1/triggers", json={"trigger": trigger})
    assert status == 404, body
    assert body["error"]["field"] == "trigger.flow"

    await api.call("POST", "/v1/flows", json={"flow": {**SEED_INLINE_FLOW, "namespace": "default"}})
    status, body = await api.call("POST", "/v1/triggers", json={"trigger": trigger})
    assert status == 201, body
    assert body["trigger"]["source"]["id"] == "every-minute"
    assert body["trigger"]["source"]["provider"] == "cron"
    config = json.loads(base64.b64decode(body["trigger"]["source"]["config"]))
    assert config["crons"] == ["*/1 * * * *"]

    # The seed's Go client sends config as base64 bytes.
    encoded = base64.b64encode(
        json.dumps({"provider": "github", "repository": "o/r", "events": ["push"]}).encode()
    ).decode()
    hook = {
        "id": "on-push",
        "flow": "terraform-provider-nomad",
        "source": {"id": "github-push", "provider": "git-webhook", "config": encoded},
    }
    status, body = await api.call("POST", "/v1/triggers", json={"trigger": hook})
    assert status == 201, body
    _, native = await api.call("GET", f"{API}/namespaces/default/triggers/on-push")
    assert native["spec"]["source"]["webhook"]["repository"] == "o/r"

    status, body = await api.call("POST", "/v1/triggers", json={"trigger": trigger})
    assert status == 409
    status, body = await api.call("GET", "/v1/triggers")
    assert body["triggers"] == [
        {"id": "nightly", "namespace": "default", "flow": "terraform-provider-nomad"},
        {"id": "on-push", "namespace": "default", "flow": "terraform-provider-nomad"},
    ]
    status, body = await api.call("GET", "/v1/triggers/nightly")
    assert body["trigger"]["flow"] == "terraform-provider-nomad"
    status, body = await api.call("DELETE", "/v1/triggers/nightly")
    assert (status, body) == (200, {})


async def test_bad_trigger_provider_names_the_field(api: Api, tmp_path: Path) -> None:
    trigger = {"id": "t", "flow": "f", "source": {"provider": "carrier-pigeon", "config": {}}}
    status, body = await api.call("POST", "/v1/triggers", json={"trigger": trigger})
    assert status == 400
    assert body["error"]["field"] == "trigger.source.provider"


async def test_namespace_holding_a_seed_flow_is_not_deleted(api: Api) -> None:
    await api.call("POST", "/v1/namespaces", json={"namespace": {"id": "jrasell"}})
    await api.call("POST", "/v1/flows", json={"flow": SEED_INLINE_FLOW})
    status, body = await api.call("DELETE", "/v1/namespaces/jrasell")
    assert status == 409, body


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (
            "/v1/namespaces",
            {"namespace": {"id": "x", "descripton": "typo"}},
            "namespace.descripton",
        ),
        ("/v1/namespaces", {"namespace": {"id": "x"}, "extra": 1}, "extra"),
        (
            "/v1/flows",
            {"flow": {"id": "x", "inline": {"step": [{"id": "a", "run": "b", "cond": "c"}]}}},
            "flow.inline.step[0].cond",
        ),
        (
            "/v1/flows",
            {"flow": {"id": "x", "specification": [{"id": "a", "job": {"raw": "j", "pth": "p"}}]}},
            "flow.specification[0].job.pth",
        ),
        (
            "/v1/triggers",
            {"trigger": {"id": "t", "flow": "f", "source": {"provider": "cron", "cfg": {}}}},
            "trigger.source.cfg",
        ),
    ],
)
async def test_unknown_seed_fields_are_refused(
    api: Api, path: str, body: dict[str, object], field: str
) -> None:
    status, answer = await api.call("POST", path, json=body)
    assert status == 400, answer
    assert answer["error"]["field"] == field
    assert "unknown field" in answer["error"]["message"]
