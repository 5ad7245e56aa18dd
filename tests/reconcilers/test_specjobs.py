"""render_spec_job, job IDs, env and var-files: tables of inputs and the job JSON they give."""

from __future__ import annotations

from typing import Any

import pytest

from nomad_pipeline.errors import Invalid
from nomad_pipeline.reconcilers.specjobs import (
    StepIdentity,
    dispatch_token,
    hcl_literal,
    hcl_var_file,
    render_spec_job,
    run_env,
    spec_job_id,
    variables_env,
)

USER_JOB: dict[str, Any] = {
    "ID": "step1",
    "Type": "service",
    "Meta": {"owner": "ci"},
    "Reschedule": {"Attempts": 5},
    "TaskGroups": [
        {
            "Name": "g",
            "RestartPolicy": {"Attempts": 3, "Mode": "delay", "Delay": 1},
            "Tasks": [
                {"Name": "a", "Driver": "raw_exec", "Env": {"KEEP": "1", "NP_STEP": "user"}},
                {"Name": "b", "Driver": "raw_exec"},
            ],
        }
    ],
}

IDENTITY = StepIdentity(namespace="ci", run="01jrun", flow="build", step="test", attempt=2)


def test_render_spec_job_forces_identity_and_fail_fast_policies() -> None:
    env = run_env(IDENTITY, {"env": "prod"})
    job = render_spec_job({"Job": USER_JOB}, IDENTITY, job_id="01jrun-test-a2", env=env)

    assert job["ID"] == job["Name"] == "01jrun-test-a2"
    assert job["Type"] == "batch"
    assert "Reschedule" not in job
    assert job["Meta"] == {
        "owner": "ci",
        "nomad_pipeline_run": "01jrun",
        "nomad_pipeline_namespace": "ci",
        "nomad_pipeline_step": "test",
        "nomad_pipeline_attempt": "2",
    }
    group = job["TaskGroups"][0]
    assert group["RestartPolicy"]["Attempts"] == 0
    assert group["RestartPolicy"]["Mode"] == "fail"
    assert group["ReschedulePolicy"] == {"Attempts": 0, "Unlimited": False}
    first, second = group["Tasks"]
    assert first["RestartPolicy"]["Attempts"] == second["RestartPolicy"]["Attempts"] == 0
    assert first["Env"]["KEEP"] == "1"
    # Our identity wins over a user's variable of the same name.
    assert first["Env"]["NP_STEP"] == "test"
    assert second["Env"]["NP_VAR_ENV"] == "prod"
    # The input is not modified.
    assert USER_JOB["TaskGroups"][0]["RestartPolicy"]["Attempts"] == 3


def test_render_is_deterministic() -> None:
    env = run_env(IDENTITY, {"a": 1})
    first = render_spec_job(USER_JOB, IDENTITY, job_id="x", env=env)
    assert first == render_spec_job(USER_JOB, IDENTITY, job_id="x", env=env)


def test_jobspec_without_groups_is_refused() -> None:
    with pytest.raises(Invalid, match="no TaskGroups"):
        render_spec_job({"ID": "x"}, IDENTITY, job_id="x", env={})


@pytest.mark.parametrize(
    ("run", "step", "attempt", "name_format", "expected"),
    [
        ("01jrun", "build", 1, None, "01jrun-build"),
        ("01jrun", "build", 2, None, "01jrun-build-a2"),
        ("01jrun", "build", 1, "01jrun-step1", "01jrun-step1"),
        ("01jrun", "build", 3, "01jrun-step1", "01jrun-step1-a3"),
    ],
)
def test_spec_job_id(
    run: str, step: str, attempt: int, name_format: str | None, expected: str
) -> None:
    assert spec_job_id(run, step, attempt, name_format) == expected


def test_spec_job_id_with_space_is_invalid() -> None:
    with pytest.raises(Invalid, match="without spaces"):
        spec_job_id("r", "s", 1, "has space")


def test_variables_env_names_and_values() -> None:
    env = variables_env(
        {
            "go_version": "1.25",
            "trigger.git_sha": "abc",
            "count": 3,
            "flag": True,
            "items": ["a", "b"],
        }
    )
    assert env == {
        "NP_VAR_GO_VERSION": "1.25",
        "NP_VAR_TRIGGER_GIT_SHA": "abc",
        "NP_TRIGGER_GIT_SHA": "abc",
        "NP_VAR_COUNT": "3",
        "NP_VAR_FLAG": "true",
        "NP_VAR_ITEMS": '["a","b"]',
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain", '"plain"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("${var.x} and %{if}", '"$${var.x} and %%{if}"'),
        ("back\\slash\nnew", '"back\\\\slash\\nnew"'),
        ("$(touch /tmp/pwned)", '"$(touch /tmp/pwned)"'),
        (True, "true"),
        (3, "3"),
        (2.5, "2.5"),
        (["a", 1], '["a", 1]'),
        ({"k": "v"}, '{"k" = "v"}'),
    ],
)
def test_hcl_literal(value: Any, expected: str) -> None:
    assert hcl_literal(value, "x") == expected


def test_hcl_var_file() -> None:
    assert hcl_var_file({"b": "x", "a": 1}) == 'a = 1\nb = "x"\n'


def test_hcl_var_file_refuses_bad_names() -> None:
    with pytest.raises(Invalid, match="not a valid HCL identifier") as caught:
        hcl_var_file({"bad name": "x"})
    assert caught.value.field == "job.variables.bad name"


def test_dispatch_token_is_per_attempt() -> None:
    assert dispatch_token(IDENTITY) == "ci/01jrun/test/2"
