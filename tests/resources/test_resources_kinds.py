"""Round-trips of every kind and a table of bad manifests answered with the exact field path."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from nomad_pipeline.errors import Invalid
from nomad_pipeline.resources.kinds import Flow, FlowSpec, Namespace, Run, Trigger
from nomad_pipeline.resources.manifests import load_text, parse_object
from nomad_pipeline.resources.meta import Resource
from nomad_pipeline.resources.registry import KINDS

NAMESPACE = """
apiVersion: nomad-pipeline.io/v1
kind: Namespace
metadata: {name: team-a, labels: {owner: a}}
spec: {description: Team A}
"""

INLINE_FLOW = """
apiVersion: nomad-pipeline.io/v1
kind: Flow
metadata: {name: build-test, namespace: default, labels: {team: a}, annotations: {note: x}}
spec:
  variables:
    - {name: go_version, type: string, default: "1.22"}
    - {name: trigger.git_sha, type: string, required: true}
    - {name: count, type: number, default: 3}
    - {name: flags, type: map, default: {a: 1}}
  timeout: 1h30m
  concurrency: {max: 2, policy: cancel-oldest}
  run_retention: {keep_last: 5, max_age: 7d}
  inline:
    job_id: test-compile
    runner:
      namespace: default
      driver: docker
      image: example/runner:latest
      artifacts:
        - source: git::https://example.com/repo
          destination: repo
          options: {ref: "${var.trigger.git_sha}"}
      resources: {cpu: 500, memory: 512}
    steps:
      - {name: setup, run: "echo go${var.go_version}", env: {SHA: "${var.trigger.git_sha}"}}
      - {name: build, run: make, timeout: 5m, retries: 2}
      - name: notify
        condition: steps.build.status == "failed"
        run: echo failed ${run.id} ${nomad_pipeline.run_id}
"""

SPEC_FLOW = """
apiVersion: nomad-pipeline.io/v1
kind: Flow
metadata: {name: cascade}
spec:
  variables: [{name: env, default: prod}]
  specification:
    steps:
      - name: one
        job:
          hcl: 'job "one" {}'
          name_format: "${nomad_pipeline.run_id}-one"
          variables: {target: "${var.env}"}
      - name: two
        needs: [one]
        job: {json: {Job: {ID: two}}}
      - name: three
        needs: [one]
        job: {path: three.nomad.hcl, source: 'job "three" {}'}
      - name: handler
        needs: [two, three]
        condition: specifications.two.status == "failed" or steps.three.exit_code != 0
        job: {hcl: 'job "h" {}'}
"""

RUN = """
apiVersion: nomad-pipeline.io/v1
kind: Run
metadata: {name: 01j00000000000000000000000, namespace: default}
spec:
  flow: cascade
  flow_spec:
    variables: [{name: env, type: string, required: true}]
    specification:
      steps: [{name: one, job: {hcl: 'job "one" {}'}}]
  variables: {env: prod, trigger.git_sha: abc}
  trigger: {type: webhook, name: on-push, delivery_id: d-1, event: push}
  rerun_of: 01h00000000000000000000000
  from_failed: true
status:
  phase: running
  start_time: "2026-01-01T00:00:00Z"
  observed_generation: 1
  conditions:
    - {type: Ready, status: "False", reason: Running, message: step one running}
  steps:
    - name: one
      phase: running
      nomad_job_id: 01j00000000000000000000000-one
      nomad_namespace: default
      alloc_id: 5f1c
      attempts: 1
      start_time: "2026-01-01T00:00:01Z"
"""

CRON_TRIGGER = """
apiVersion: nomad-pipeline.io/v1
kind: Trigger
metadata: {name: nightly, namespace: default}
spec:
  flow: cascade
  variables: {env: staging}
  source:
    cron:
      schedules: ["*/5 * * * *", "@daily"]
      timezone: Europe/Berlin
      concurrency_policy: forbid
      starting_deadline: 10m
status:
  next_fire_time: "2026-01-01T00:05:00Z"
  last_run: 01j00000000000000000000000
"""

WEBHOOK_TRIGGER = """
apiVersion: nomad-pipeline.io/v1
kind: Trigger
metadata: {name: hook, namespace: default}
spec:
  flow: cascade
  suspend: true
  source:
    webhook:
      provider: generic
      events: [deploy]
      secret: {from_nomad_variable: {path: secrets/hook, key: hmac}}
      signature_header: X-Signature
      variables: {sha: $.head_commit.id, first: "commits[0].message"}
"""

GIT_TRIGGER = """
apiVersion: nomad-pipeline.io/v1
kind: Trigger
metadata: {name: poll, namespace: default}
spec:
  flow: cascade
  source: {git: {url: "file:///srv/repo.git", branch: main, interval: 30s}}
"""

GIT_REPOSITORY = """
apiVersion: nomad-pipeline.io/v1
kind: GitRepository
metadata: {name: platform, namespace: default}
spec:
  url: https://example.com/platform.git
  ref: {tag: v1.2.0}
  path: deploy/pipelines
  interval: 5m
  prune: true
  secret_ref: {from_env: GIT_TOKEN}
status:
  last_fetched_revision: abc
  file_errors: [{path: bad.yaml, message: "document 1: kind: field required"}]
"""

ALL_KINDS = [
    NAMESPACE,
    INLINE_FLOW,
    SPEC_FLOW,
    RUN,
    CRON_TRIGGER,
    WEBHOOK_TRIGGER,
    GIT_TRIGGER,
    GIT_REPOSITORY,
]


@pytest.mark.parametrize("text", ALL_KINDS)
def test_every_kind_round_trips_through_the_wire(text: str) -> None:
    data = yaml.safe_load(text)
    kind = KINDS[data["kind"]]
    obj = kind.model_validate(data)
    wire = obj.to_wire()
    again = kind.model_validate(wire)
    assert again == obj
    assert again.to_wire() == wire
    assert wire["apiVersion"] == "nomad-pipeline.io/v1"
    assert wire["kind"] == data["kind"]
    # Everything the manifest said survives (the wire only adds defaults).
    _assert_contains(wire["spec"], data["spec"])


def _assert_contains(wire: Any, given: Any) -> None:
    if isinstance(given, dict):
        for key, value in given.items():
            _assert_contains(wire[key], value)
    elif isinstance(given, list):
        assert len(wire) == len(given)
        for left, right in zip(wire, given, strict=True):
            _assert_contains(left, right)
    else:
        assert wire == given or str(wire) == str(given)


def test_status_round_trips_when_read_from_the_store() -> None:
    run = Run.model_validate(yaml.safe_load(RUN))
    assert run.status.phase == "running"
    step = run.status.step("one")
    assert step is not None and step.attempts == 1
    assert Run.model_validate(run.to_wire()).status == run.status


def test_manifest_status_is_ignored_on_load() -> None:
    [manifest] = load_text(RUN, filename="run.yaml")
    assert manifest.obj.status.phase == "pending"
    assert manifest.obj.status.steps == []


def test_namespace_is_cluster_scoped() -> None:
    namespace = Namespace.model_validate(
        {"kind": "Namespace", "metadata": {"name": "team-a", "namespace": "ignored"}}
    )
    assert namespace.metadata.namespace == ""
    assert namespace.key == ("", "team-a")
    assert Namespace.NAMESPACED is False


def test_flow_dependencies_sequential_and_dag() -> None:
    spec_flow = Flow.model_validate(yaml.safe_load(SPEC_FLOW))
    assert spec_flow.spec.dependencies() == {
        "one": [],
        "two": ["one"],
        "three": ["one"],
        "handler": ["two", "three"],
    }
    inline_flow = Flow.model_validate(yaml.safe_load(INLINE_FLOW))
    assert inline_flow.spec.dependencies() == {
        "setup": [],
        "build": ["setup"],
        "notify": ["build"],
    }
    assert inline_flow.spec.step_names == ["setup", "build", "notify"]


def test_inline_runner_defaults_to_raw_exec() -> None:
    spec = FlowSpec.model_validate({"inline": {"steps": [{"name": "a", "run": "true"}]}})
    assert spec.inline is not None
    assert spec.inline.runner.driver == "raw_exec"
    assert spec.inline.runner.image is None


def test_trigger_source_type() -> None:
    trigger = Trigger.model_validate(yaml.safe_load(CRON_TRIGGER))
    assert trigger.spec.source.type == "cron"
    assert trigger.spec.source.cron is not None
    assert trigger.spec.source.cron.schedules == ["*/5 * * * *", "@daily"]


def test_json_jobspec_may_be_given_as_text() -> None:
    spec = FlowSpec.model_validate(
        {"specification": {"steps": [{"name": "a", "job": {"json": '{"Job": {"ID": "a"}}'}}]}}
    )
    assert spec.specification is not None
    assert spec.specification.steps[0].job.text() == {"Job": {"ID": "a"}}


def _flow(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "nomad-pipeline.io/v1",
        "kind": "Flow",
        "metadata": {"name": "f", "namespace": "default"},
        "spec": spec,
    }


def _inline(*steps: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return _flow({"inline": {"steps": list(steps)}, **extra})


def _spec(*steps: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return _flow({"specification": {"steps": list(steps)}, **extra})


def _trigger(source: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "Trigger", "metadata": {"name": "t"}, "spec": {"flow": "f", "source": source}}


HCL_JOB = {"hcl": 'job "x" {}'}

# (object, exact field path, a fragment of the message)
BAD_OBJECTS: list[tuple[dict[str, Any], str, str]] = [
    ({"metadata": {"name": "x"}}, "kind", "field required"),
    ({"kind": "Flw", "metadata": {"name": "x"}}, "kind", "unknown kind 'Flw'"),
    (
        {"kind": "Namespace", "apiVersion": "v2", "metadata": {"name": "x"}},
        "apiVersion",
        "unsupported apiVersion",
    ),
    ({"kind": "Namespace", "metadata": {"name": "Bad_Name!"}}, "metadata.name", "lower-case"),
    (
        {"kind": "Namespace", "metadata": {"name": "x"}, "spec": {"descr": "y"}},
        "spec.descr",
        "unknown field",
    ),
    (
        {
            "kind": "Flow",
            "metadata": {"name": "f", "namespace": ""},
            "spec": {"inline": {"steps": [{"name": "a", "run": "x"}]}},
        },
        "metadata.namespace",
        "needs a namespace",
    ),
    (
        _inline({"name": "a", "run": "x"}, {"name": "b"}),
        "spec.inline.steps[1].run",
        "field required",
    ),
    (_inline({"name": "a", "run": "x", "cmd": "y"}), "spec.inline.steps[0].cmd", "unknown field"),
    (_flow({}), "spec", "exactly one of inline or specification"),
    (
        _flow(
            {
                "inline": {"steps": [{"name": "a", "run": "x"}]},
                "specification": {"steps": [{"name": "a", "job": HCL_JOB}]},
            }
        ),
        "spec",
        "exactly one of inline or specification",
    ),
    (_inline(), "spec.inline.steps", "at least 1"),
    (
        _inline({"name": "a", "run": "x"}, {"name": "a", "run": "y"}),
        "spec.inline.steps[1].name",
        "duplicate step name 'a'",
    ),
    (_inline({"name": "bad name", "run": "x"}), "spec.inline.steps[0].name", "invalid step name"),
    (
        _inline({"name": "a", "run": "x", "needs": ["zz"]}),
        "spec.inline.steps[0].needs[0]",
        "unknown step 'zz'",
    ),
    (
        _inline({"name": "a", "run": "x", "needs": ["a"]}),
        "spec.inline.steps[0].needs[0]",
        "cannot need itself",
    ),
    (
        _inline(
            {"name": "a", "run": "x", "needs": ["c"]},
            {"name": "b", "run": "x", "needs": ["a"]},
            {"name": "c", "run": "x", "needs": ["b"]},
        ),
        "spec.inline.steps[1].needs",
        "needs form a cycle: a -> c -> b -> a",
    ),
    (
        _inline({"name": "a", "run": "x", "condition": "steps.a.status =="}),
        "spec.inline.steps[0].condition",
        "expected a value",
    ),
    (
        _inline(
            {"name": "a", "run": "x"}, {"name": "b", "run": "x", "condition": "steps.zz.status"}
        ),
        "spec.inline.steps[1].condition",
        "step 'zz' does not exist",
    ),
    (
        _inline(
            {"name": "a", "run": "x", "condition": "steps.b.status == 'x'"},
            {"name": "b", "run": "x"},
        ),
        "spec.inline.steps[0].condition",
        "does not run before",
    ),
    (
        _inline(
            {"name": "a", "run": "x"}, {"name": "b", "run": "x", "condition": "steps.a.colour"}
        ),
        "spec.inline.steps[1].condition",
        "unknown step field 'colour'",
    ),
    (
        _inline({"name": "a", "run": "x", "condition": "os.system"}),
        "spec.inline.steps[0].condition",
        "unknown name 'os.system'",
    ),
    (
        _inline({"name": "a", "run": "x", "condition": "var.nope == 1"}),
        "spec.inline.steps[0].condition",
        "unknown variable 'nope'",
    ),
    (
        _inline({"name": "a", "run": "echo ${var.missing}"}),
        "spec.inline.steps[0].run",
        "unknown variable 'missing'",
    ),
    (
        _inline({"name": "a", "run": "echo ${HOME}"}),
        "spec.inline.steps[0].run",
        "invalid reference",
    ),
    (
        _inline({"name": "a", "run": "echo ${steps.a.status}"}),
        "spec.inline.steps[0].run",
        "step results are for conditions",
    ),
    (
        _inline({"name": "a", "run": "x", "env": {"1BAD": "v"}}),
        "spec.inline.steps[0].env",
        "invalid environment variable name",
    ),
    (
        _inline({"name": "a", "run": "x", "timeout": "soon"}),
        "spec.inline.steps[0].timeout",
        "invalid duration 'soon'",
    ),
    (
        _inline({"name": "a", "run": "x", "retries": -1}),
        "spec.inline.steps[0].retries",
        "greater than or equal to 0",
    ),
    (_inline({"name": "a", "run": "x"}, timeout="0s"), "spec.timeout", "greater than zero"),
    (
        _inline({"name": "a", "run": "x"}, concurrency={"max": 0}),
        "spec.concurrency.max",
        "greater than or equal to 1",
    ),
    (
        _inline({"name": "a", "run": "x"}, concurrency={"policy": "drop"}),
        "spec.concurrency.policy",
        "'queue', 'skip' or 'cancel-oldest'",
    ),
    (
        _flow({"inline": {"runner": {"driver": "docker"}, "steps": [{"name": "a", "run": "x"}]}}),
        "spec.inline.runner.image",
        "docker driver needs an image",
    ),
    (
        _flow({"inline": {"runner": {"driver": "podman"}, "steps": [{"name": "a", "run": "x"}]}}),
        "spec.inline.runner.driver",
        "'raw_exec', 'exec' or 'docker'",
    ),
    (
        _flow(
            {
                "inline": {
                    "runner": {"artifacts": [{"source": "s", "options": {"ref": "${var.x}"}}]},
                    "steps": [{"name": "a", "run": "x"}],
                }
            }
        ),
        "spec.inline.runner.artifacts[0].options.ref",
        "unknown variable 'x'",
    ),
    (
        _inline(
            {"name": "a", "run": "x"},
            variables=[{"name": "n", "type": "number", "default": "five"}],
        ),
        "spec.variables[0].default",
        "expected a number",
    ),
    (
        _inline({"name": "a", "run": "x"}, variables=[{"name": "n", "type": "float"}]),
        "spec.variables[0].type",
        "'string', 'number', 'bool', 'list', 'map' or 'object'",
    ),
    (
        _inline({"name": "a", "run": "x"}, variables=[{"name": "n"}, {"name": "n"}]),
        "spec.variables[1].name",
        "duplicate variable 'n'",
    ),
    (
        _inline({"name": "a", "run": "x"}, variables=[{"name": "bad-name"}]),
        "spec.variables[0].name",
        "invalid variable name",
    ),
    (
        _spec({"name": "a", "job": {}}),
        "spec.specification.steps[0].job",
        "exactly one of path, hcl or json is required",
    ),
    (
        _spec({"name": "a", "job": {"hcl": "x", "path": "y"}}),
        "spec.specification.steps[0].job",
        "(got path, hcl)",
    ),
    (
        _spec({"name": "a", "job": {"hcl": "x", "source": "y"}}),
        "spec.specification.steps[0].job.source",
        "set path",
    ),
    (
        _spec({"name": "a", "job": {"json": "{not json"}}),
        "spec.specification.steps[0].job.json",
        "not valid JSON",
    ),
    (
        _spec({"name": "a", "job": {**HCL_JOB, "variables": {"v": "${var.nope}"}}}),
        "spec.specification.steps[0].job.variables.v",
        "unknown variable 'nope'",
    ),
    (
        _spec({"name": "a", "job": {**HCL_JOB, "name_format": "${run.colour}"}}),
        "spec.specification.steps[0].job.name_format",
        "run has",
    ),
    (_trigger({}), "spec.source", "exactly one of cron, webhook or git"),
    (
        _trigger({"cron": {"schedules": ["* * *"]}}),
        "spec.source.cron.schedules",
        "invalid cron expression '* * *'",
    ),
    (
        _trigger({"cron": {"schedules": ["0 0 * * * *"]}}),
        "spec.source.cron.schedules",
        "expected 5 fields",
    ),
    (
        _trigger({"cron": {"schedules": ["@reboot"]}}),
        "spec.source.cron.schedules",
        "unknown cron macro",
    ),
    (_trigger({"cron": {"schedules": []}}), "spec.source.cron.schedules", "at least 1"),
    (
        _trigger({"cron": {"schedules": ["@hourly"], "timezone": "Mars/Olympus"}}),
        "spec.source.cron.timezone",
        "unknown time zone 'Mars/Olympus'",
    ),
    (
        _trigger({"cron": {"schedules": ["@hourly"], "concurrency_policy": "never"}}),
        "spec.source.cron.concurrency_policy",
        "'allow', 'forbid' or 'replace'",
    ),
    (
        _trigger({"webhook": {"provider": "bitbucket"}}),
        "spec.source.webhook.provider",
        "'github', 'gitlab' or 'generic'",
    ),
    (
        _trigger({"webhook": {"provider": "github", "secret": {}}}),
        "spec.source.webhook.secret",
        "exactly one of from_env or from_nomad_variable",
    ),
    (
        _trigger({"webhook": {"provider": "github", "secret": "hunter2"}}),
        "spec.source.webhook.secret",
        "valid dictionary",
    ),
    (
        _trigger({"webhook": {"provider": "github", "signature_header": "X"}}),
        "spec.source.webhook.signature_header",
        "only the generic provider",
    ),
    (
        _trigger({"webhook": {"provider": "generic", "variables": {"a": "$..x y"}}}),
        "spec.source.webhook.variables.a",
        "invalid JSONPath-like",
    ),
    (
        _trigger({"git": {"url": "u", "interval": "often"}}),
        "spec.source.git.interval",
        "invalid duration",
    ),
    (
        {
            "kind": "GitRepository",
            "metadata": {"name": "g"},
            "spec": {"url": "u", "ref": {"branch": "a", "tag": "b"}},
        },
        "spec.ref",
        "exactly one of branch, tag or commit",
    ),
    (
        {"kind": "GitRepository", "metadata": {"name": "g"}, "spec": {"url": "u", "path": "../x"}},
        "spec.path",
        "inside the repository",
    ),
    (
        {
            "kind": "Run",
            "metadata": {"name": "r"},
            "spec": {
                "flow": "f",
                "variables": {"n": "x"},
                "flow_spec": {
                    "variables": [{"name": "n", "type": "number"}],
                    "inline": {"steps": [{"name": "a", "run": "x"}]},
                },
            },
        },
        "spec.variables.n",
        "expected a number",
    ),
]


@pytest.mark.parametrize(
    ("data", "field", "fragment"),
    BAD_OBJECTS,
    ids=[f"{i}-{case[1]}" for i, case in enumerate(BAD_OBJECTS)],
)
def test_bad_objects_name_the_exact_field(data: dict[str, Any], field: str, fragment: str) -> None:
    with pytest.raises(Invalid) as caught:
        parse_object(data, source="flow.yaml", document=2)
    error = caught.value
    assert error.field == field, error.message
    assert error.message.startswith(f"flow.yaml: document 2: {field}: "), error.message
    assert fragment in error.message


def test_every_problem_is_listed() -> None:
    with pytest.raises(Invalid) as caught:
        parse_object(_inline({"name": "a"}, {"run": "x"}))
    assert caught.value.message == (
        "spec.inline.steps[0].run: field required; spec.inline.steps[1].name: field required"
    )


def test_kinds_are_resources() -> None:
    for kind in KINDS.values():
        assert issubclass(kind, Resource)
        assert kind.model_fields["kind"].default == kind.KIND


def test_run_steps_carry_every_field_on_the_wire() -> None:
    run = Run.model_validate(yaml.safe_load(RUN))
    [step] = run.to_wire()["status"]["steps"]
    assert set(step) == {
        "name",
        "phase",
        "nomad_job_id",
        "nomad_namespace",
        "alloc_id",
        "exit_code",
        "attempts",
        "start_time",
        "end_time",
        "message",
    }
    assert step["exit_code"] is None
    assert step["phase"] == "running"
