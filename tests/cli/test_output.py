"""Pure formatting: ages, tables per kind, -o name/json/yaml, diffs, describe pages."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml

from nomad_pipeline.cli.describe import describe_object
from nomad_pipeline.cli.output import (
    format_age,
    format_duration,
    format_relative,
    object_name,
    render_objects,
    render_table,
    status_summary,
    unified_diff,
)

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)


def ago(seconds: float) -> str:
    return (NOW - timedelta(seconds=seconds)).isoformat()


def flow(name: str = "build-test", namespace: str = "default", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "nomad-pipeline.io/v1",
        "kind": "Flow",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"team": "a"},
            "creation_timestamp": ago(300),
            "resource_version": "7",
        },
        "spec": spec
        or {
            "variables": [{"name": "env", "type": "string", "default": "dev"}],
            "inline": {
                "steps": [{"name": "a", "run": "echo a\necho b"}, {"name": "b", "run": "x"}]
            },
        },
    }


def run(phase: str = "running") -> dict[str, Any]:
    return {
        "apiVersion": "nomad-pipeline.io/v1",
        "kind": "Run",
        "metadata": {"name": "01jabc", "namespace": "default", "creation_timestamp": ago(90)},
        "spec": {
            "flow": "build-test",
            "flow_spec": flow()["spec"],
            "variables": {"env": "prod"},
            "trigger": {"type": "cron", "name": "nightly"},
        },
        "status": {
            "phase": phase,
            "start_time": ago(80),
            "steps": [
                {
                    "name": "a",
                    "phase": "success",
                    "exit_code": 0,
                    "attempts": 1,
                    "start_time": ago(80),
                    "end_time": ago(70),
                },
                {"name": "b", "phase": "running", "attempts": 1, "start_time": ago(70)},
            ],
            "conditions": [
                {
                    "type": "Ready",
                    "status": "False",
                    "reason": "Running",
                    "message": "step b running",
                    "last_transition_time": ago(70),
                }
            ],
        },
    }


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (-3, "0s"),
        (0, "0s"),
        (5, "5s"),
        (59.9, "59s"),
        (60, "1m"),
        (3 * 60 + 59, "3m"),
        (3600, "1h"),
        (2 * 3600 + 1, "2h"),
        (86400, "1d"),
        (4 * 86400 + 7200, "4d"),
    ],
)
def test_format_duration(seconds: float, expected: str) -> None:
    assert format_duration(seconds) == expected


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        (ago(5), "5s"),
        ((NOW - timedelta(minutes=3)).isoformat().replace("+00:00", "Z"), "3m"),
        ("2026-11-28T10:00:00", "2h"),  # naive timestamps are UTC
        (None, "<unknown>"),
        ("not a time", "<unknown>"),
    ],
)
def test_format_age(timestamp: object, expected: str) -> None:
    assert format_age(timestamp, NOW) == expected


def test_format_relative_future_past_and_unset() -> None:
    assert format_relative((NOW + timedelta(seconds=42)).isoformat(), NOW) == "in 42s"
    assert format_relative(ago(180), NOW) == "3m ago"
    assert format_relative(None, NOW) == "<none>"


def test_flow_table_has_kubectl_columns_and_alignment() -> None:
    text = render_table([flow(), flow(name="x")], "Flow", NOW)
    lines = text.splitlines()
    assert lines[0].split() == ["NAME", "TYPE", "STEPS", "STATUS", "AGE"]
    assert lines[1].split() == ["build-test", "inline", "2", "Active", "5m"]
    assert lines[2].split() == ["x", "inline", "2", "Active", "5m"]
    # Columns line up: every row's TYPE starts where the header's does.
    assert {line.index("inline") for line in lines[1:]} == {lines[0].index("TYPE")}


def test_all_namespaces_adds_namespace_column_and_wide_adds_columns() -> None:
    text = render_table([flow(namespace="team-a")], "Flow", NOW, wide=True, with_namespace=True)
    header, row = text.splitlines()
    assert header.split() == [
        "NAMESPACE", "NAME", "TYPE", "STEPS", "STATUS", "AGE", "VARIABLES", "LABELS",
    ]  # fmt: skip
    assert row.split() == ["team-a", "build-test", "inline", "2", "Active", "5m", "env", "team=a"]


def test_run_table_shows_phase_progress_and_duration() -> None:
    header, row = render_table([run()], "Run", NOW).splitlines()
    assert header.split() == ["NAME", "FLOW", "PHASE", "STEPS", "AGE", "DURATION"]
    assert row.split() == ["01jabc", "build-test", "running", "1/2", "1m", "1m"]
    finished = run("success")
    finished["status"]["end_time"] = ago(50)
    _, row = render_table([finished], "Run", NOW, wide=True).splitlines()
    assert row.split()[:6] == ["01jabc", "build-test", "success", "1/2", "1m", "30s"]
    assert "cron/nightly" in row


def test_trigger_table_shows_source_and_fire_times() -> None:
    trigger = {
        "kind": "Trigger",
        "metadata": {"name": "nightly", "namespace": "default", "creation_timestamp": ago(7200)},
        "spec": {"flow": "build-test", "source": {"cron": {"schedules": ["0 3 * * *"]}}},
        "status": {
            "next_fire_time": (NOW + timedelta(hours=3)).isoformat(),
            "last_fire_time": ago(86400),
        },
    }
    header, row = render_table([trigger], "Trigger", NOW).splitlines()
    assert header.split() == [
        "NAME", "FLOW", "SOURCE", "SUSPEND", "NEXT-FIRE", "LAST-FIRE", "STATUS", "AGE",
    ]  # fmt: skip
    assert row.split() == [
        "nightly", "build-test", "cron", "false", "in", "3h", "1d", "ago", "Active", "2h",
    ]  # fmt: skip


def test_namespace_and_gitrepository_tables() -> None:
    namespace = {
        "kind": "Namespace",
        "metadata": {"name": "team-a", "creation_timestamp": ago(10)},
        "spec": {"description": "team a"},
    }
    assert render_table([namespace], "Namespace", NOW).splitlines()[1].split() == [
        "team-a", "Active", "team", "a", "10s",
    ]  # fmt: skip
    repo = {
        "kind": "GitRepository",
        "metadata": {"name": "infra", "namespace": "default", "creation_timestamp": ago(60)},
        "spec": {"url": "file:///srv/infra.git", "ref": {"branch": "main"}},
        "status": {
            "last_applied_revision": "main@abc123",
            "conditions": [{"type": "Ready", "status": "True", "reason": "Applied"}],
        },
    }
    header, row = render_table([repo], "GitRepository", NOW).splitlines()
    assert header.split() == ["NAME", "URL", "READY", "REVISION", "AGE"]
    assert row.split() == ["infra", "file:///srv/infra.git", "True", "main@abc123", "1m"]


def test_status_summary_prefers_phase_then_ready_condition() -> None:
    assert status_summary(run("failed")) == "failed"
    not_ready = {"status": {"conditions": [{"type": "Ready", "status": "False", "reason": "Bad"}]}}
    assert status_summary(not_ready) == "Bad"
    ready = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    assert status_summary(ready) == "Ready"
    assert status_summary({"status": {}}) == "Active"


def test_name_json_and_yaml_outputs() -> None:
    objects = [flow(), flow(name="other")]
    assert render_objects(objects, "name", single=False, kind="Flow", now=NOW).splitlines() == [
        "flow.nomad-pipeline.io/build-test",
        "flow.nomad-pipeline.io/other",
    ]
    listed = json.loads(render_objects(objects, "json", single=False, kind="Flow", now=NOW))
    assert listed == {"apiVersion": "nomad-pipeline.io/v1", "kind": "List", "items": objects}
    assert (
        json.loads(render_objects(objects[:1], "json", single=True, kind="Flow", now=NOW))
        == (objects[0])
    )
    text = render_objects(objects[:1], "yaml", single=True, kind="Flow", now=NOW)
    assert yaml.safe_load(text) == objects[0]
    # Scripts print as literal blocks, the way people write them.
    assert "run: |-\n" in text or "run: |\n" in text
    assert object_name({"kind": "GitRepository", "metadata": {"name": "r"}}) == (
        "gitrepository.nomad-pipeline.io/r"
    )


def test_unified_diff_compares_spec_and_metadata_only() -> None:
    stored = flow()
    stored["status"] = {"phase": "whatever"}
    stored["metadata"]["uid"] = "u-1"
    local = flow()
    assert unified_diff(stored, local, label="flow.nomad-pipeline.io/build-test") == ""
    local["metadata"]["labels"] = {"team": "b"}
    text = unified_diff(stored, local, label="flow.nomad-pipeline.io/build-test")
    assert text.startswith("--- stored/flow.nomad-pipeline.io/build-test\n")
    assert "-    team: a\n" in text
    assert "+    team: b\n" in text
    created = unified_diff(None, local, label="x")
    assert created.startswith("--- stored/x\n+++ local/x\n")
    assert all(line.startswith(("+", "---", "@@")) for line in created.splitlines())


def test_describe_run_has_spec_status_conditions_and_steps() -> None:
    page = describe_object(run(), NOW)
    lines = page.splitlines()
    assert lines[0].split() == ["Name:", "01jabc"]
    assert "Kind:" in page
    assert "  Flow:    build-test" in lines
    assert "  Trigger: type=cron, name=nightly" in lines
    assert "    env: prod" in lines
    assert "  Phase:      running" in lines
    conditions = lines.index("Conditions:")
    assert lines[conditions + 1].split() == ["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"]
    assert lines[conditions + 2].split()[:4] == ["Ready", "False", "Running", "1m"]
    steps = lines.index("Steps:")
    assert lines[steps + 1].split()[:5] == ["NAME", "PHASE", "EXIT", "ATTEMPTS", "DURATION"]
    assert lines[steps + 2].split()[:5] == ["a", "success", "0", "1", "10s"]
    assert lines[steps + 3].split()[:5] == ["b", "running", "<none>", "1", "1m"]


def test_describe_flow_summarises_variables_and_steps() -> None:
    page = describe_object(flow(), NOW)
    assert "  Type: inline" in page.splitlines()
    assert "Variables:" in page
    assert "Steps:" in page
    step_lines = [line.split() for line in page.splitlines() if line.startswith("    a ")]
    # A multi-line script shows its first line only.
    assert step_lines == [["a", "<none>", "<none>", "echo", "a", "..."]]
    assert "Conditions: <none>" in page


def test_describe_run_lists_recent_events_from_recorded_times_oldest_first() -> None:
    page = describe_object(run(), NOW)
    lines = page.splitlines()
    events = lines.index("Events:")
    assert lines[events + 1].split() == ["AGE", "REASON", "MESSAGE"]
    rows = [line.split(None, 2) for line in lines[events + 2 :]]
    assert [row[1] for row in rows] == [
        "Created",
        "Started",
        "StepStarted",
        "StepEnded",
        "StepStarted",
        "Running",
    ]
    assert rows[0][0] == "1m"
    assert rows[3][2] == "step a success (exit code 0)"
    assert rows[-1][2].startswith("Ready=False: ")


def test_describe_shows_a_triggers_last_firing_as_an_event() -> None:
    trigger = {
        "kind": "Trigger",
        "metadata": {"name": "nightly", "namespace": "default", "creation_timestamp": ago(600)},
        "spec": {"flow": "build-test"},
        "status": {"last_fire_time": ago(60), "last_run": "01jabc"},
    }
    lines = describe_object(trigger, NOW).splitlines()
    events = lines.index("Events:")
    assert [line.split(None, 2) for line in lines[events + 2 :]] == [
        ["10m", "Created", "Trigger created"],
        ["1m", "Fired", "fired, run 01jabc"],
    ]
