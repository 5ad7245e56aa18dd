"""Pure parts of the run commands: --var parsing and the progress lines of --wait."""

from __future__ import annotations

import io
from typing import Any

import pytest

from nomad_pipeline.cli.context import Context
from nomad_pipeline.cli.runs import ProgressPrinter, parse_variables
from nomad_pipeline.errors import Invalid


def test_parse_variables_splits_on_the_first_equals() -> None:
    assert parse_variables(["env=prod", "expr=a=b", "empty="]) == {
        "env": "prod",
        "expr": "a=b",
        "empty": "",
    }


@pytest.mark.parametrize("pair", ["novalue", "=value"])
def test_parse_variables_rejects_pairs_without_a_name(pair: str) -> None:
    with pytest.raises(Invalid, match="expected NAME=VALUE"):
        parse_variables([pair])


def run(phase: str, *steps: dict[str, Any], message: str = "") -> dict[str, Any]:
    return {"status": {"phase": phase, "message": message, "steps": list(steps)}}


def test_progress_prints_each_transition_once() -> None:
    out = io.StringIO()
    ctx = Context("http://x", "default", False, False, io.StringIO(), out, io.StringIO())
    printer = ProgressPrinter(ctx, "01run")
    pending = {"name": "build", "phase": "pending"}
    printer.update(run("pending", pending, {"name": "test", "phase": "pending"}))
    started = {"name": "build", "phase": "running", "attempts": 1}
    printer.update(run("running", started))
    printer.update(run("running", started))
    retried = {"name": "build", "phase": "running", "attempts": 2, "message": "retrying"}
    printer.update(run("running", retried))
    done = {"name": "build", "phase": "success", "attempts": 2, "exit_code": 0}
    failed = {"name": "test", "phase": "failed", "exit_code": 3, "message": "exit status 3"}
    printer.update(run("failed", done, failed, message="step test failed"))
    assert out.getvalue().splitlines() == [
        "run 01run: pending",
        "step build: running",
        "run 01run: running",
        "step build: running (attempt 2)",
        "step build: success (attempt 2, exit code 0)",
        "step test: failed (exit code 3): exit status 3",
        "run 01run: failed: step test failed",
    ]
