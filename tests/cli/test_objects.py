"""apply / get / describe / delete / diff / schema / sync through the real API over HTTP."""

from __future__ import annotations

import asyncio
import io
import json
import socket
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from cli_harness import Controller, run_cli
from ports import free_port

from nomad_pipeline.cli.main import ADDR_ENV, main
from nomad_pipeline.resources.kinds import Flow

NAMESPACE = """\
apiVersion: nomad-pipeline.io/v1
kind: Namespace
metadata: {name: team-a}
spec: {description: team a}
"""

FLOW = """\
apiVersion: nomad-pipeline.io/v1
kind: Flow
metadata:
  name: build-test
  namespace: team-a
  labels: {team: a}
spec:
  variables:
    - {name: env, type: string, default: dev}
  inline:
    steps:
      - {name: build, run: "echo build"}
      - {name: test, run: "echo test"}
"""


def write_manifests(directory: Path, flow: str = FLOW) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "10-namespace.yaml").write_text(NAMESPACE)
    (directory / "20-flow.yaml").write_text(flow)
    return directory


async def test_apply_creates_then_reports_unchanged_and_configured(
    controller: Controller, tmp_path: Path
) -> None:
    manifests = write_manifests(tmp_path / "m")
    first = await controller.cli("apply", "-f", str(manifests))
    assert (first.code, first.err) == (0, "")
    assert first.out.splitlines() == [
        "namespace.nomad-pipeline.io/team-a created",
        "flow.nomad-pipeline.io/build-test created",
    ]
    again = await controller.cli("apply", "-f", str(manifests / "20-flow.yaml"))
    assert again.out == "flow.nomad-pipeline.io/build-test unchanged\n"

    (manifests / "20-flow.yaml").write_text(FLOW.replace("{team: a}", "{team: b}"))
    dry = await controller.cli("apply", "-f", str(manifests / "20-flow.yaml"), "--dry-run")
    assert dry.out == "flow.nomad-pipeline.io/build-test configured (dry run)\n"
    stored = await controller.store.get(Flow, "team-a", "build-test")
    assert stored.metadata.labels == {"team": "a"}

    changed = await controller.cli("apply", "-f", str(manifests / "20-flow.yaml"))
    assert changed.out == "flow.nomad-pipeline.io/build-test configured\n"
    stored = await controller.store.get(Flow, "team-a", "build-test")
    assert stored.metadata.labels == {"team": "b"}


async def test_apply_from_stdin_and_namespace_flag(controller: Controller, tmp_path: Path) -> None:
    await controller.cli("apply", "-f", "-", stdin=NAMESPACE)
    unset = FLOW.replace("  namespace: team-a\n", "")
    result = await controller.cli("apply", "-n", "team-a", "-f", "-", stdin=unset)
    assert (result.code, result.out) == (0, "flow.nomad-pipeline.io/build-test created\n")
    assert (await controller.store.get(Flow, "team-a", "build-test")).metadata.name == "build-test"

    clash = await controller.cli("apply", "-n", "other", "-f", "-", stdin=FLOW)
    assert clash.code == 1
    assert clash.err.startswith("error: Invalid: <stdin>: document 1: the namespace from the")
    assert len(clash.err.splitlines()) == 1


async def test_get_table_json_yaml_name_selector_and_all_namespaces(
    controller: Controller, tmp_path: Path
) -> None:
    await controller.cli("apply", "-f", str(write_manifests(tmp_path / "m")))
    other = FLOW.replace("build-test", "deploy").replace("{team: a}", "{team: ops}")
    await controller.cli("apply", "-f", "-", stdin=other)

    table = await controller.cli("get", "flows", "-n", "team-a")
    header, *rows = table.out.splitlines()
    assert header.split() == ["NAME", "TYPE", "STEPS", "STATUS", "AGE"]
    assert [row.split()[:3] for row in rows] == [
        ["build-test", "inline", "2"],
        ["deploy", "inline", "2"],
    ]

    listed = json.loads((await controller.cli("get", "flow", "-n", "team-a", "-o", "json")).out)
    assert listed["apiVersion"] == "nomad-pipeline.io/v1"
    assert listed["kind"] == "List"
    assert [item["metadata"]["name"] for item in listed["items"]] == ["build-test", "deploy"]

    one = json.loads(
        (await controller.cli("get", "flow", "build-test", "-n", "team-a", "-o", "json")).out
    )
    assert one["kind"] == "Flow"
    assert one["spec"]["inline"]["steps"][0]["name"] == "build"

    as_yaml = yaml.safe_load(
        (await controller.cli("get", "flows", "build-test", "-n", "team-a", "-o", "yaml")).out
    )
    assert as_yaml == one

    names = await controller.cli("get", "flows", "-n", "team-a", "-o", "name", "-l", "team=ops")
    assert names.out == "flow.nomad-pipeline.io/deploy\n"

    everywhere = await controller.cli("get", "flows", "-A")
    assert everywhere.out.splitlines()[0].split()[:2] == ["NAMESPACE", "NAME"]
    assert everywhere.out.splitlines()[1].split()[:2] == ["team-a", "build-test"]

    namespaces = await controller.cli("get", "ns")
    assert [line.split()[0] for line in namespaces.out.splitlines()] == ["NAME", "team-a"]

    empty = await controller.cli("get", "runs")
    assert (empty.code, empty.out) == (0, "")
    assert empty.err == "No runs found in namespace 'default'.\n"
    empty_json = json.loads((await controller.cli("get", "runs", "-o", "json")).out)
    assert empty_json == {"apiVersion": "nomad-pipeline.io/v1", "kind": "List", "items": []}


async def test_describe_prints_metadata_spec_and_status(
    controller: Controller, tmp_path: Path
) -> None:
    await controller.cli("apply", "-f", str(write_manifests(tmp_path / "m")))
    result = await controller.cli("describe", "flow", "build-test", "-n", "team-a")
    assert result.code == 0
    lines = result.out.splitlines()
    assert lines[0].split() == ["Name:", "build-test"]
    assert lines[1].split() == ["Namespace:", "team-a"]
    assert "Labels:           team=a" in lines
    assert ["Type:", "inline"] in [line.split() for line in lines]
    assert ["Runner:", "raw_exec"] in [line.split() for line in lines]
    assert any(line.split()[:2] == ["build", "<none>"] for line in lines)


async def test_delete_by_name_and_by_file_and_not_found(
    controller: Controller, tmp_path: Path
) -> None:
    manifests = write_manifests(tmp_path / "m")
    await controller.cli("apply", "-f", str(manifests))
    deleted = await controller.cli("delete", "flow", "build-test", "-n", "team-a")
    assert (deleted.code, deleted.out) == (0, "flow.nomad-pipeline.io/build-test deleted\n")

    missing = await controller.cli("delete", "flow", "build-test", "-n", "team-a")
    assert missing.code == 1
    assert missing.err.startswith("error: NotFound: ")
    assert len(missing.err.splitlines()) == 1
    ignored = await controller.cli(
        "delete", "flow", "build-test", "-n", "team-a", "--ignore-not-found"
    )
    assert (ignored.code, ignored.err) == (0, "")

    await controller.cli("apply", "-f", str(manifests))
    other = FLOW.replace("build-test", "deploy")
    await controller.cli("apply", "-f", "-", stdin=other)
    in_use = await controller.cli("delete", "ns", "team-a")
    assert in_use.code == 1
    assert in_use.err.startswith("error: Conflict: ")
    # One failure does not stop the others; the exit code reports it.
    several = await controller.cli("delete", "flow", "deploy", "ghost", "-n", "team-a")
    assert several.code == 1
    assert several.out == "flow.nomad-pipeline.io/deploy deleted\n"
    assert several.err.startswith("error: NotFound: ")
    assert "ghost" in several.err

    by_file = await controller.cli("delete", "-f", str(manifests))
    # The namespace goes last: it cannot be deleted while it holds the flow.
    assert by_file.out.splitlines() == [
        "flow.nomad-pipeline.io/build-test deleted",
        "namespace.nomad-pipeline.io/team-a deleted",
    ]
    assert (await controller.cli("get", "ns")).out == ""


async def test_diff_exit_codes_and_unified_output(controller: Controller, tmp_path: Path) -> None:
    manifests = write_manifests(tmp_path / "m")
    await controller.cli("apply", "-f", str(manifests / "10-namespace.yaml"))
    new = await controller.cli("diff", "-f", str(manifests / "20-flow.yaml"))
    assert new.code == 1
    assert new.out.startswith(
        "--- stored/flow.nomad-pipeline.io/build-test\n+++ local/flow.nomad-pipeline.io/build-test"
    )

    await controller.cli("apply", "-f", str(manifests))
    same = await controller.cli("diff", "-f", str(manifests))
    assert (same.code, same.out, same.err) == (0, "", "")

    (manifests / "20-flow.yaml").write_text(FLOW.replace("echo test", "echo tested"))
    changed = await controller.cli("diff", "-f", str(manifests))
    assert changed.code == 1
    assert "-      run: echo test\n" in changed.out
    assert "+      run: echo tested\n" in changed.out
    # diff never writes.
    stored = await controller.store.get(Flow, "team-a", "build-test")
    assert stored.spec.inline is not None
    assert stored.spec.inline.steps[1].run == "echo test"


async def test_errors_are_one_line_with_reason(controller: Controller, tmp_path: Path) -> None:
    unknown = await controller.cli("get", "pipelines")
    assert unknown.code == 1
    assert unknown.err.startswith("error: Invalid: unknown kind 'pipelines'")
    assert len(unknown.err.splitlines()) == 1

    bad = tmp_path / "bad.yaml"
    bad.write_text(NAMESPACE + "---\n" + FLOW.replace('run: "echo test"', "script: x"))
    invalid = await controller.cli("apply", "-f", str(bad))
    assert invalid.code == 1
    assert invalid.err.startswith("error: Invalid: ")
    assert "bad.yaml: document 2: spec.inline.steps[1]" in invalid.err
    assert len(invalid.err.splitlines()) == 1

    no_namespace = await controller.cli("apply", "-f", "-", stdin=FLOW)
    assert no_namespace.code == 1
    assert no_namespace.err.startswith("error: ")
    assert "team-a" in no_namespace.err
    assert len(no_namespace.err.splitlines()) == 1

    missing_file = await controller.cli("apply", "-f", str(tmp_path / "nope.yaml"))
    assert missing_file.code == 1
    assert "nope.yaml" in missing_file.err
    assert len(missing_file.err.splitlines()) == 1

    usage = await controller.cli("get", "flows", "-o", "xml")
    assert usage.code == 1
    assert usage.err.startswith("error: Usage: argument -o/--output: invalid choice: 'xml'")


async def test_connection_refused_names_the_address() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port once the probe is closed.
    addr = f"http://127.0.0.1:{port}"
    result = await run_cli(addr, "get", "flows")
    assert result.code == 1
    assert result.err.startswith(f"error: Unavailable: cannot connect to the controller at {addr}")
    assert "(connection refused)" in result.err
    assert len(result.err.splitlines()) == 1


async def test_schema_prints_json_schema(controller: Controller) -> None:
    one = await controller.cli("schema", "flows")
    schema = json.loads(one.out)
    assert schema["title"] == "Flow"
    assert schema["properties"]["kind"] == {"const": "Flow"}
    every = json.loads((await controller.cli("schema")).out)
    assert set(every) == {"Namespace", "Flow", "Run", "Trigger", "GitRepository"}


async def test_address_from_environment_and_global_flags_before_the_command(
    controller: Controller, monkeypatch: pytest.MonkeyPatch
) -> None:
    await controller.cli("apply", "-f", "-", stdin=NAMESPACE)
    monkeypatch.setenv(ADDR_ENV, controller.addr)
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(
        main, ["get", "namespaces", "-o", "name"], stdout=out, stderr=err
    )
    assert (code, out.getvalue(), err.getvalue()) == (0, "namespace.nomad-pipeline.io/team-a\n", "")

    monkeypatch.delenv(ADDR_ENV)
    out = io.StringIO()
    # HOST:PORT without a scheme is taken as http://HOST:PORT.
    host_port = controller.addr.removeprefix("http://")
    argv = ["--addr", host_port, "-n", "team-a", "get", "flows", "-o", "json"]
    code = await asyncio.to_thread(main, argv, stdout=out, stderr=err)
    assert code == 0
    assert json.loads(out.getvalue())["items"] == []


SPEC_FLOW = """\
apiVersion: nomad-pipeline.io/v1
kind: Flow
metadata: {name: spec-flow, namespace: team-a}
spec:
  specification:
    steps:
      - name: step1
        job: {path: jobs/step1.nomad.hcl}
"""
JOBSPEC = 'job "step1" {\n  type = "batch"\n}\n'


async def test_apply_recursive_and_jobspec_paths_relative_to_the_manifest(
    controller: Controller, tmp_path: Path
) -> None:
    root = write_manifests(tmp_path / "m")
    nested = root / "flows"
    (nested / "jobs").mkdir(parents=True)
    (nested / "spec-flow.yaml").write_text(SPEC_FLOW)
    (nested / "jobs" / "step1.nomad.hcl").write_text(JOBSPEC)

    flat = await controller.cli("apply", "-f", str(root))
    assert [line.split()[0] for line in flat.out.splitlines()] == [
        "namespace.nomad-pipeline.io/team-a",
        "flow.nomad-pipeline.io/build-test",
    ]
    recursive = await controller.cli("apply", "-R", "-f", str(root))
    assert (recursive.code, recursive.err) == (0, "")
    assert "flow.nomad-pipeline.io/spec-flow created" in recursive.out.splitlines()
    stored = await controller.store.get(Flow, "team-a", "spec-flow")
    assert stored.spec.specification is not None
    assert stored.spec.specification.steps[0].job.source == JOBSPEC


async def test_version_prints_the_clients_then_the_servers(controller: Controller) -> None:
    installed = metadata.version("nomad-pipeline")
    answered = await controller.cli("version")
    assert (answered.code, answered.err) == (0, "")
    assert answered.out.splitlines() == [
        f"Client Version: {installed}",
        f"Server Version: {installed} (API nomad-pipeline.io/v1)",
    ]
    alone = await run_cli(f"http://127.0.0.1:{free_port()}", "version")
    assert alone.code == 1
    assert alone.out == f"Client Version: {installed}\n"
    assert "cannot connect to the controller" in alone.err
