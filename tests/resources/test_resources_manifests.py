"""Loading manifests: YAML, JSON, directories, stdin, the seed's HCL, jobspec paths, errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml

from nomad_pipeline.errors import Invalid
from nomad_pipeline.resources.kinds import Flow, Namespace, Trigger
from nomad_pipeline.resources.manifests import Manifest, load_paths, load_text, parse_object
from nomad_pipeline.resources.meta import Resource

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "manifests" / "examples"

NAMESPACE_DOC = "kind: Namespace\nmetadata: {name: team-a}\n"
FLOW_DOC = """\
apiVersion: nomad-pipeline.io/v1
kind: Flow
metadata: {name: f, namespace: team-a}
spec:
  inline:
    steps:
      - {name: a, run: echo a}
"""


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _names(manifests: list[Manifest]) -> list[tuple[str, str]]:
    return [(m.obj.kind, m.obj.metadata.name) for m in manifests]


def test_yaml_multi_document_with_documents_numbered(tmp_path: Path) -> None:
    _write(tmp_path / "all.yaml", f"---\n{NAMESPACE_DOC}---\n# empty\n---\n{FLOW_DOC}")
    manifests = load_paths(["all.yaml"], cwd=tmp_path)
    assert _names(manifests) == [("Namespace", "team-a"), ("Flow", "f")]
    assert [(m.source, m.document) for m in manifests] == [("all.yaml", 1), ("all.yaml", 3)]


def test_error_names_file_document_and_field(tmp_path: Path) -> None:
    bad = FLOW_DOC.replace("{name: a, run: echo a}", "{name: a, run: echo a}\n      - {name: b}")
    _write(tmp_path / "flow.yaml", f"{NAMESPACE_DOC}---\n{bad}")
    with pytest.raises(Invalid) as caught:
        load_paths(["flow.yaml"], cwd=tmp_path)
    assert caught.value.message == "flow.yaml: document 2: spec.inline.steps[1].run: field required"
    assert caught.value.field == "spec.inline.steps[1].run"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "kind: Namespace\nmetadata: {name: a}\nmetadata: {name: b}\n",
            "x.yaml: document 1: invalid YAML at line 3, column 1: duplicate key 'metadata'",
        ),
        (f"{NAMESPACE_DOC}---\nkind: [\n", "x.yaml: document 2: invalid YAML at line 5"),
        ("- 1\n- 2\n", "x.yaml: document 1: [0]: expected an object, got int"),
        ("just text\n", "x.yaml: document 1: expected an object, got a string"),
        ("items: {}\n", "x.yaml: document 1: items: expected a list"),
        ("kind: List\nitems: []\nextra: 1\n", "x.yaml: document 1: extra: unknown field"),
    ],
)
def test_yaml_errors(tmp_path: Path, text: str, message: str) -> None:
    _write(tmp_path / "x.yaml", text)
    with pytest.raises(Invalid) as caught:
        load_paths([tmp_path / "x.yaml"], cwd=tmp_path)
    assert caught.value.message.replace(str(tmp_path) + "/", "").startswith(message)


def test_json_object_list_and_items(tmp_path: Path) -> None:
    namespace = yaml.safe_load(NAMESPACE_DOC)
    flow = yaml.safe_load(FLOW_DOC)
    _write(tmp_path / "one.json", json.dumps(namespace))
    _write(tmp_path / "list.json", json.dumps([namespace, flow]))
    _write(
        tmp_path / "items.json", json.dumps({"apiVersion": "v1", "kind": "List", "items": [flow]})
    )
    assert _names(load_paths(["one.json"], cwd=tmp_path)) == [("Namespace", "team-a")]
    assert _names(load_paths(["list.json"], cwd=tmp_path)) == [
        ("Namespace", "team-a"),
        ("Flow", "f"),
    ]
    assert _names(load_paths(["items.json"], cwd=tmp_path)) == [("Flow", "f")]
    flow["spec"]["inline"]["steps"][0]["shell"] = "bash"
    _write(tmp_path / "bad.json", json.dumps({"items": [namespace, flow]}))
    with pytest.raises(Invalid) as caught:
        load_paths(["bad.json"], cwd=tmp_path)
    assert caught.value.message == (
        "bad.json: document 1: items[1].spec.inline.steps[0].shell: unknown field"
    )
    _write(tmp_path / "broken.json", "{")
    with pytest.raises(Invalid, match=r"broken.json: invalid JSON: Expecting"):
        load_paths(["broken.json"], cwd=tmp_path)


def test_directory_and_recursive(tmp_path: Path) -> None:
    _write(tmp_path / "m" / "a.yaml", NAMESPACE_DOC)
    _write(tmp_path / "m" / "b.yml", FLOW_DOC)
    _write(tmp_path / "m" / "notes.txt", "not a manifest")
    _write(tmp_path / "m" / ".hidden.yaml", "broken: [")
    _write(tmp_path / "m" / "job.nomad.hcl", 'job "x" {}')
    _write(tmp_path / "m" / "sub" / "c.yaml", FLOW_DOC.replace("name: f", "name: g"))
    _write(tmp_path / "m" / ".git" / "d.yaml", "broken: [")
    assert _names(load_paths(["m"], cwd=tmp_path)) == [("Namespace", "team-a"), ("Flow", "f")]
    recursive = load_paths(["m"], cwd=tmp_path, recursive=True)
    assert _names(recursive) == [("Namespace", "team-a"), ("Flow", "f"), ("Flow", "g")]
    assert recursive[2].source == "m/sub/c.yaml"


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(Invalid, match=r"nope\.yaml: no such file or directory"):
        load_paths(["nope.yaml"], cwd=tmp_path)


def test_stdin_text_detects_the_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _names(load_text(FLOW_DOC)) == [("Flow", "f")]
    as_json = json.dumps(yaml.safe_load(FLOW_DOC))
    assert _names(load_text(as_json)) == [("Flow", "f")]
    hcl = '# a comment\nnamespace {\n  id = "team-b"\n  description = "B"\n}\n'
    [manifest] = load_text(hcl)
    assert isinstance(manifest.obj, Namespace)
    assert manifest.obj.spec.description == "B"
    assert manifest.source == "<stdin>"
    monkeypatch.setattr("sys.stdin", io.StringIO(NAMESPACE_DOC))
    assert _names(load_paths(["-"], cwd=tmp_path)) == [("Namespace", "team-a")]


def test_parse_object_without_a_source_has_no_prefix() -> None:
    with pytest.raises(Invalid) as caught:
        parse_object({"kind": "Flow", "metadata": {"name": "f"}, "spec": {}})
    assert caught.value.message == "spec: exactly one of inline or specification is required"
    obj = parse_object({**yaml.safe_load(NAMESPACE_DOC), "status": {"bogus": 1}})
    assert isinstance(obj, Namespace)


SPEC_WITH_PATH = """\
kind: Flow
metadata: {name: s}
spec:
  specification:
    steps:
      - name: one
        job: {path: jobs/one.nomad.hcl}
"""


def test_jobspec_path_relative_to_the_manifest_then_cwd(tmp_path: Path) -> None:
    _write(tmp_path / "repo" / "flows" / "flow.yaml", SPEC_WITH_PATH)
    _write(tmp_path / "repo" / "flows" / "jobs" / "one.nomad.hcl", 'job "near" {}')
    _write(tmp_path / "repo" / "jobs" / "one.nomad.hcl", 'job "cwd" {}')
    [near] = load_paths(["flows/flow.yaml"], cwd=tmp_path / "repo")
    assert isinstance(near.obj, Flow) and near.obj.spec.specification is not None
    job = near.obj.spec.specification.steps[0].job
    assert (job.path, job.source) == ("jobs/one.nomad.hcl", 'job "near" {}')
    (tmp_path / "repo" / "flows" / "jobs" / "one.nomad.hcl").unlink()
    [fallback] = load_paths(["flows/flow.yaml"], cwd=tmp_path / "repo")
    assert isinstance(fallback.obj, Flow) and fallback.obj.spec.specification is not None
    assert fallback.obj.spec.specification.steps[0].job.text() == 'job "cwd" {}'
    (tmp_path / "repo" / "jobs" / "one.nomad.hcl").unlink()
    with pytest.raises(Invalid) as caught:
        load_paths(["flows/flow.yaml"], cwd=tmp_path / "repo")
    assert caught.value.field == "spec.specification.steps[0].job.path"
    assert caught.value.message == (
        "flows/flow.yaml: document 1: spec.specification.steps[0].job.path: jobspec file "
        f"'jobs/one.nomad.hcl' not found (tried {tmp_path}/repo/flows/jobs/one.nomad.hcl, "
        f"{tmp_path}/repo/jobs/one.nomad.hcl)"
    )


def test_a_loaded_source_is_kept(tmp_path: Path) -> None:
    text = SPEC_WITH_PATH.replace(
        "{path: jobs/one.nomad.hcl}", "{path: jobs/one.nomad.hcl, source: 'job \"sent\" {}'}"
    )
    [manifest] = load_text(text, cwd=tmp_path)
    assert isinstance(manifest.obj, Flow) and manifest.obj.spec.specification is not None
    assert manifest.obj.spec.specification.steps[0].job.source == 'job "sent" {}'


# ---------------------------------------------------------------------------------------------
# The seed's HCL examples


def _expected(text: str) -> Resource:
    return parse_object(yaml.safe_load(text))


SEED_INLINE_FLOW = r"""
kind: Flow
metadata: {name: terraform-provider-nomad, namespace: jrasell}
spec:
  variables:
    - {name: go_version, type: string, default: 1.25.4}
    - {name: trigger.git_sha, type: string, required: true}
  inline:
    job_id: test-compile
    runner:
      namespace: default
      driver: docker
      image: jrasell/nomad-pipeline-runner:latest
      artifacts:
        - source: git::https://github.com/jrasell/terraform-provider-nomad
          destination: terraform-provider-nomad
          options: {ref: "${var.trigger.git_sha}"}
      resources: {cpu: 1000, memory: 1024}
    steps:
      - name: setup
        run: |-
          apt-get -q update
          apt-get install -y git make wget

          cd /tmp
          wget -c https://go.dev/dl/go${var.go_version}.linux-amd64.tar.gz
          tar -C /usr/local -xf go${var.go_version}.linux-amd64.tar.gz

          echo "export PATH=$PATH:/usr/local/go/bin" >> ~/.profile
      - name: run_build
        run: |-
          source ~/.profile
          cd terraform-provider-nomad
          go build
      - name: failure_notification
        condition: inline.steps.run_build.status == "failed"
        run: echo "Build failed for commit ${var.trigger.git_sha}"
"""

SEED_NAMESPACE = """
kind: Namespace
metadata: {name: jrasell}
spec: {description: experiemention area for jrasell}
"""

SEED_WEBHOOK_TRIGGER = """
kind: Trigger
metadata: {name: terraform-provider-nomad, namespace: jrasell}
spec:
  flow: terraform-provider-nomad
  source:
    webhook: {provider: github, repository: jrasell/terraform-provider-nomad, events: [push]}
"""

SEED_CRON_TRIGGER = """
kind: Trigger
metadata: {name: job-cascade-scheduled, namespace: default}
spec:
  flow: job-cascade
  source:
    cron: {schedules: ["*/1 * * * *"]}
"""


def test_seed_inline_examples(shared_reference: Path) -> None:
    seed = shared_reference / "seed-format" / "inline"
    loaded = {m.obj.kind: m.obj for m in load_paths([seed], cwd=seed)}
    assert loaded["Flow"] == _expected(SEED_INLINE_FLOW)
    assert loaded["Namespace"] == _expected(SEED_NAMESPACE)
    assert loaded["Trigger"] == _expected(SEED_WEBHOOK_TRIGGER)


def test_seed_specification_examples(shared_reference: Path, tmp_path: Path) -> None:
    seed = shared_reference / "seed-format"
    # The seed's paths (./examples/specification/...) are relative to its CLI's directory.
    (tmp_path / "examples").symlink_to(seed)
    manifests = load_paths([seed / "specification"], cwd=tmp_path)
    by_kind = {m.obj.kind: m.obj for m in manifests}
    assert set(by_kind) == {"Flow", "Trigger"}
    assert by_kind["Trigger"] == _expected(SEED_CRON_TRIGGER)
    flow = by_kind["Flow"]
    assert isinstance(flow, Flow) and flow.spec.specification is not None
    assert flow.metadata.namespace == "default"
    assert [v.model_dump() for v in flow.spec.variables] == [
        {
            "name": "end_msg",
            "type": "string",
            "required": False,
            "default": "step completed successfully",
            "description": "",
        }
    ]
    steps = flow.spec.specification.steps
    assert [step.name for step in steps] == ["step1", "step2", "step3", "step4-conditional"]
    for number, step in enumerate(steps[:3], start=1):
        assert step.condition is None
        assert step.job.name_format == f"${{nomad_pipeline.run_id}}-step{number}"
        assert step.job.path == f"./examples/specification/step{number}.nomad.hcl"
        assert step.job.variables == {f"step_{number}_end_msg": "${var.end_msg}"}
    assert steps[3].condition == (
        'specifications.step1.status == "failed" || specifications.step2.status == "failed" '
        '|| specifications.step3.status == "failed"'
    )
    for number, step in enumerate(steps, start=1):
        expected = (seed / "specification" / f"step{number}.nomad.hcl").read_text()
        assert step.job.source == expected
    assert flow.spec.dependencies()["step4-conditional"] == ["step3"]


def test_seed_specification_paths_missing_are_named(shared_reference: Path, tmp_path: Path) -> None:
    spec_dir = shared_reference / "seed-format" / "specification"
    with pytest.raises(Invalid) as caught:
        load_paths([spec_dir / "flow.hcl"], cwd=tmp_path)
    message = caught.value.message
    assert message.startswith(
        f'{spec_dir}/flow.hcl: flow "job-cascade": spec.specification.steps[0].job.path: '
        "jobspec file './examples/specification/step1.nomad.hcl' not found (tried "
    )
    assert f"{spec_dir}/examples/specification/step1.nomad.hcl" in message
    assert f"{tmp_path}/examples/specification/step1.nomad.hcl" in message


HCL_ERRORS = [
    (
        'flow "f" {\n  namespace = "default"\n  colour = "red"\n  inline "j" {\n'
        '    runner { nomad_on_demand { image = "i" } }\n    step "a" { run = "x" }\n  }\n}\n',
        "f.hcl: flow \"f\": unknown attribute or block 'colour'",
    ),
    (
        'flow "f" {\n  inline "j" {\n    runner { nomad_on_demand { image = "i" } }\n'
        '    step "a" { cmd = "x" }\n  }\n}\n',
        'f.hcl: flow "f": inline "j": step "a": unknown attribute or block \'cmd\'',
    ),
    (
        'flow "f" {\n  inline "j" {\n    runner { nomad_on_demand { image = "i" } }\n'
        '    step "a" { condition = "x ==" }\n  }\n}\n',
        "f.hcl: flow \"f\": spec.inline.steps[0].condition: invalid expression 'x ==': expected "
        "a value, a name or '(', found end of expression at position 5; "
        "spec.inline.steps[0].run: field required",
    ),
    (
        'flow "f" {\n  inline "j" {\n    step "a" { run = "x" }\n  }\n}\n',
        'f.hcl: flow "f": inline "j": a runner block is required',
    ),
    (
        'trigger "t" {\n  flow = "f"\n  source "s" {\n    provider = "git-webhook"\n'
        '    config {\n      provider = "github"\n      secret = "hunter2"\n    }\n  }\n}\n',
        'f.hcl: trigger "t": source "s": config: secret: literal secrets are not stored',
    ),
    (
        'trigger "t" {\n  flow = "f"\n  source "s" {\n    provider = "email"\n'
        "    config {}\n  }\n}\n",
        'f.hcl: trigger "t": source "s": unknown provider \'email\'',
    ),
    (
        'trigger "t" {\n  flow = "f"\n}\n',
        'f.hcl: trigger "t": exactly one source block is required (found 0)',
    ),
    ('job "x" {\n  type = "batch"\n}\n', "f.hcl: unknown block 'job'"),
    ('flow "f" {\n  namespace = \n}\n', "f.hcl: invalid HCL: Unexpected token"),
    ('namespace {\n  description = "d"\n}\n', "f.hcl: namespace: id is required"),
]


@pytest.mark.parametrize(("text", "message"), HCL_ERRORS)
def test_hcl_errors(text: str, message: str) -> None:
    with pytest.raises(Invalid) as caught:
        load_text(text, filename="f.hcl")
    assert caught.value.message.startswith(message), caught.value.message


def test_hcl_trigger_options() -> None:
    text = """
trigger "hook" {
  flow = "f"
  source "gh" {
    provider = "git-webhook"
    config {
      provider   = "github"
      repository = "org/repo"
      events     = ["push", "pull_request"]
      branches   = ["main", "release/*"]
      secret     = { from_env = "GITHUB_WEBHOOK_SECRET" }
    }
  }
}
trigger "nightly" {
  namespace = "team-a"
  flow      = "f"
  source "cron" {
    provider = "cron"
    config {
      crons              = ["0 3 * * *", "@hourly"]
      timezone           = "America/New_York"
      concurrency_policy = "replace"
      starting_deadline  = "5m"
    }
  }
}
"""
    hook, nightly = (m.obj for m in load_text(text, filename="t.hcl"))
    assert isinstance(hook, Trigger) and hook.spec.source.webhook is not None
    webhook = hook.spec.source.webhook
    assert (webhook.provider, webhook.repository) == ("github", "org/repo")
    assert webhook.events == ["push", "pull_request"]
    assert webhook.branches == ["main", "release/*"]
    assert webhook.secret is not None and webhook.secret.from_env == "GITHUB_WEBHOOK_SECRET"
    assert isinstance(nightly, Trigger) and nightly.spec.source.cron is not None
    assert nightly.metadata.namespace == "team-a"
    cron = nightly.spec.source.cron
    assert cron.schedules == ["0 3 * * *", "@hourly"]
    assert (cron.timezone, cron.concurrency_policy, cron.starting_deadline) == (
        "America/New_York",
        "replace",
        "5m",
    )


def test_hcl_extensions_and_templates_kept() -> None:
    text = """
flow "f" {
  variable "tags" {
    type = list(string)
  }
  variable "env" {}
  timeout = "10m"
  inline "j" {
    runner {
      nomad_on_demand {
        driver = "raw_exec"
      }
    }
    step "a" {
      run     = "echo $${HOME}"
      retries = 2
    }
    step "b" {
      run   = "echo b"
      needs = ["a"]
      env   = { TARGET = "${var.env}" }
    }
  }
}
trigger "t" {
  flow = "f"
  variables = { env = "prod" }
  source "poll" {
    provider = "git"
    config {
      url      = "file:///srv/repo"
      interval = "30s"
    }
  }
}
"""
    flow_manifest, trigger_manifest = load_text(text, filename="f.hcl")
    flow = flow_manifest.obj
    assert isinstance(flow, Flow) and flow.spec.inline is not None
    assert [v.type for v in flow.spec.variables] == ["list", "string"]
    assert flow.spec.timeout == "10m"
    assert flow.spec.inline.runner.driver == "raw_exec"
    assert flow.spec.inline.steps[0].run == "echo $${HOME}"
    assert flow.spec.inline.steps[0].retries == 2
    assert flow.spec.inline.steps[1].env == {"TARGET": "${var.env}"}
    assert flow.spec.dependencies() == {"a": [], "b": ["a"]}
    trigger = trigger_manifest.obj
    assert isinstance(trigger, Trigger) and trigger.spec.source.git is not None
    assert trigger.spec.variables == {"env": "prod"}
    assert trigger.spec.source.git.url == "file:///srv/repo"
    assert (flow_manifest.document, trigger_manifest.document) == (1, 2)


# ---------------------------------------------------------------------------------------------
# The repository's example manifests


def test_example_manifests_load(tmp_path: Path) -> None:
    manifests = load_paths([EXAMPLES], cwd=tmp_path)
    loaded = {(m.obj.kind, m.obj.metadata.name): m.obj for m in manifests}
    assert set(loaded) == {
        ("Namespace", "examples"),
        ("Flow", "sequential"),
        ("Flow", "inline"),
        ("Flow", "dag"),
        ("Trigger", "nightly"),
        ("Trigger", "github-push"),
    }
    for obj in loaded.values():
        if isinstance(obj, Flow | Trigger):
            assert obj.metadata.namespace == "examples"
    sequential = loaded[("Flow", "sequential")]
    assert isinstance(sequential, Flow) and sequential.spec.specification is not None
    for step in sequential.spec.specification.steps:
        assert step.job.path is not None
        assert step.job.source == (EXAMPLES / step.job.path).read_text()
        assert 'driver = "raw_exec"' in step.job.source
    inline = loaded[("Flow", "inline")]
    assert isinstance(inline, Flow) and inline.spec.inline is not None
    assert inline.spec.inline.runner.driver == "raw_exec"
    dag = loaded[("Flow", "dag")]
    assert isinstance(dag, Flow)
    assert dag.spec.dependencies()["notify-failure"] == ["unit-tests", "lint"]
    assert any(step.condition for step in dag.spec.steps)
    # Applying what `get -o yaml` printed works: the wire form loads again, unchanged.
    for obj in loaded.values():
        [again] = load_text(yaml.safe_dump(obj.to_wire()), filename="again.yaml")
        assert again.obj.spec == obj.spec


@pytest.mark.parametrize(
    "path", ["../outside.nomad.hcl", "/etc/hostname", "jobs/../../outside.nomad.hcl"]
)
def test_confined_loading_refuses_paths_outside(tmp_path: Path, path: str) -> None:
    _write(tmp_path / "outside.nomad.hcl", 'job "secret" {}')
    _write(tmp_path / "repo" / "flow.yaml", SPEC_WITH_PATH.replace("jobs/one.nomad.hcl", path))
    repo = tmp_path / "repo"
    with pytest.raises(Invalid) as caught:
        load_paths([repo], cwd=repo, confine_to=repo)
    assert caught.value.field == "spec.specification.steps[0].job.path"
    assert f"is outside {repo}" in caught.value.message


def test_confined_loading_reads_paths_inside(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _write(repo / "flows" / "flow.yaml", SPEC_WITH_PATH)
    _write(repo / "flows" / "jobs" / "one.nomad.hcl", 'job "inside" {}')
    [manifest] = load_paths(["flows"], cwd=repo, confine_to=repo)
    assert isinstance(manifest.obj, Flow) and manifest.obj.spec.specification is not None
    assert manifest.obj.spec.specification.steps[0].job.source == 'job "inside" {}'


def test_list_item_paths_include_the_item(tmp_path: Path) -> None:
    flow = yaml.safe_load(SPEC_WITH_PATH)
    _write(tmp_path / "list.yaml", yaml.safe_dump({"kind": "List", "items": [flow]}))
    with pytest.raises(Invalid) as caught:
        load_paths(["list.yaml"], cwd=tmp_path)
    assert caught.value.field == "items[0].spec.specification.steps[0].job.path"
