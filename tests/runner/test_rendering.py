"""Rendering a step: references become variable reads, values only reach the environment."""

from __future__ import annotations

import pytest

from nomad_pipeline.errors import Invalid
from nomad_pipeline.resources.expressions import evaluation_context
from nomad_pipeline.runner.rendering import environment_name, render_step, run_environment

CONTEXT = evaluation_context(
    variables={
        "go_version": "1.25.4",
        "trigger.git_sha": "abc123",
        "config": {"region": "eu"},
        "count": 3,
    },
    run={"id": "01run", "name": "01run", "namespace": "default", "flow": "build"},
)


@pytest.mark.parametrize(
    ("reference", "name"),
    [
        ("var.go_version", "NP_VAR_GO_VERSION"),
        ("var.trigger.git_sha", "NP_VAR_TRIGGER_GIT_SHA"),
        ("trigger.git_sha", "NP_TRIGGER_GIT_SHA"),
        ("run.id", "NP_RUN_ID"),
        ("nomad_pipeline.run_id", "NP_RUN_ID"),
        ("var.with-dash", "NP_VAR_WITH_DASH"),
    ],
)
def test_environment_names(reference: str, name: str) -> None:
    assert environment_name(reference) == name


@pytest.mark.parametrize(
    ("script", "rendered", "bound"),
    [
        (
            "wget go${var.go_version}.tar.gz",
            "wget go${NP_VAR_GO_VERSION}.tar.gz",
            {"NP_VAR_GO_VERSION": "1.25.4"},
        ),
        (
            'echo "Build failed for commit ${var.trigger.git_sha}"',
            'echo "Build failed for commit ${NP_VAR_TRIGGER_GIT_SHA}"',
            {"NP_VAR_TRIGGER_GIT_SHA": "abc123"},
        ),
        (
            "echo ${ trigger.git_sha }",
            "echo ${NP_TRIGGER_GIT_SHA}",
            {"NP_TRIGGER_GIT_SHA": "abc123"},
        ),
        ("echo $${HOME} $HOME", "echo ${HOME} $HOME", {}),
        (
            "echo ${var.config.region}",
            "echo ${NP_VAR_CONFIG_REGION}",
            {"NP_VAR_CONFIG_REGION": "eu"},
        ),
        ("echo ${var.count}", "echo ${NP_VAR_COUNT}", {"NP_VAR_COUNT": "3"}),
        ("echo ${nomad_pipeline.run_id}", "echo ${NP_RUN_ID}", {"NP_RUN_ID": "01run"}),
    ],
)
def test_scripts_read_values_from_the_environment(
    script: str, rendered: str, bound: dict[str, str]
) -> None:
    assert render_step(script, {}, CONTEXT) == (rendered, bound)


def test_step_env_templates_render_to_plain_values() -> None:
    script, env = render_step("true", {"GO": "go${var.go_version}", "PLAIN": "x"}, CONTEXT)
    assert script == "true"
    assert env == {"GO": "go1.25.4", "PLAIN": "x"}


@pytest.mark.parametrize("script", ["echo ${var.missing}", "echo ${steps.build.status}", "${"])
def test_bad_references_are_invalid(script: str) -> None:
    with pytest.raises(Invalid):
        render_step(script, {}, CONTEXT)


def test_run_environment_holds_variables_trigger_and_run() -> None:
    env = run_environment(
        {"go_version": "1.25", "trigger.git_ref": "refs/heads/main", "flags": ["-v"]},
        {"id": "01run", "namespace": "default"},
        {"type": "webhook", "name": "push"},
    )
    assert env == {
        "NP_VAR_GO_VERSION": "1.25",
        "NP_VAR_TRIGGER_GIT_REF": "refs/heads/main",
        "NP_VAR_FLAGS": '["-v"]',
        "NP_TRIGGER_TYPE": "webhook",
        "NP_TRIGGER_NAME": "push",
        "NP_TRIGGER_GIT_REF": "refs/heads/main",
        "NP_RUN_ID": "01run",
        "NP_RUN_NAMESPACE": "default",
    }
