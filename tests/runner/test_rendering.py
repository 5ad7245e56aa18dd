"""Rendering a step: references become variable reads, values only reach the environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from runner_harness import Controller

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
            'wget go"${NP_VAR_GO_VERSION}".tar.gz',
            {"NP_VAR_GO_VERSION": "1.25.4"},
        ),
        (
            'echo "Build failed for commit ${var.trigger.git_sha}"',
            'echo "Build failed for commit ${NP_VAR_TRIGGER_GIT_SHA}"',
            {"NP_VAR_TRIGGER_GIT_SHA": "abc123"},
        ),
        (
            "echo ${ trigger.git_sha }",
            'echo "${NP_TRIGGER_GIT_SHA}"',
            {"NP_TRIGGER_GIT_SHA": "abc123"},
        ),
        ("echo $${HOME} $HOME", "echo ${HOME} $HOME", {}),
        (
            "echo ${var.config.region}",
            'echo "${NP_VAR_CONFIG_REGION}"',
            {"NP_VAR_CONFIG_REGION": "eu"},
        ),
        ("echo ${var.count}", 'echo "${NP_VAR_COUNT}"', {"NP_VAR_COUNT": "3"}),
        ("echo ${nomad_pipeline.run_id}", 'echo "${NP_RUN_ID}"', {"NP_RUN_ID": "01run"}),
    ],
)
def test_scripts_read_values_from_the_environment(
    script: str, rendered: str, bound: dict[str, str]
) -> None:
    assert render_step(script, {}, CONTEXT) == (rendered, bound)


# Each shell context a reference can sit in, and the read written there (X is var.x).
CONTEXTS = [
    pytest.param("echo ${var.x}", 'echo "${NP_VAR_X}"', id="command-text"),
    pytest.param(
        "A=${var.x}; cat <<< ${var.x}",
        'A="${NP_VAR_X}"; cat <<< "${NP_VAR_X}"',
        id="assign-herestring",
    ),
    pytest.param('echo "a ${var.x} b"', 'echo "a ${NP_VAR_X} b"', id="double-quotes"),
    pytest.param("echo 'a ${var.x} b'", "echo 'a '\"${NP_VAR_X}\"' b'", id="single-quotes"),
    pytest.param("echo $'a\\t${var.x}'", "echo $'a\\t'\"${NP_VAR_X}\"$''", id="ansi-c-quotes"),
    pytest.param(
        'echo "it\'s" ${var.x}', 'echo "it\'s" "${NP_VAR_X}"', id="single-quote-in-double"
    ),
    pytest.param("echo \\'${var.x}", 'echo \\\'"${NP_VAR_X}"', id="escaped-quote"),
    pytest.param("echo \\${var.x}", 'echo "${NP_VAR_X}"', id="backslash-before-reference"),
    pytest.param('echo "\\${var.x}"', 'echo "\\\\${NP_VAR_X}"', id="backslash-in-double-quotes"),
    pytest.param("echo $${HOME}${var.x}", 'echo ${HOME}"${NP_VAR_X}"', id="literal-dollar-brace"),
    pytest.param("echo $${U:-${var.x}}", 'echo ${U:-"${NP_VAR_X}"}', id="parameter-default"),
    pytest.param('echo "$${U:-${var.x}}"', 'echo "${U:-${NP_VAR_X}}"', id="parameter-in-double"),
    pytest.param("echo $(echo ${var.x})", 'echo $(echo "${NP_VAR_X}")', id="command-substitution"),
    pytest.param(
        'echo "$(echo ${var.x})"', 'echo "$(echo "${NP_VAR_X}")"', id="substitution-in-double"
    ),
    pytest.param("echo `echo ${var.x}`", 'echo `echo "${NP_VAR_X}"`', id="backticks"),
    pytest.param("(echo ${var.x})", '(echo "${NP_VAR_X}")', id="subshell"),
    pytest.param("echo $(( ${var.x} + 1 ))", 'echo $(( "${NP_VAR_X}" + 1 ))', id="arithmetic"),
    pytest.param(
        "echo $((1 << 2)) ${var.x}", 'echo $((1 << 2)) "${NP_VAR_X}"', id="shift-is-no-heredoc"
    ),
    pytest.param(
        "echo ${var.x} # see ${var.x}", 'echo "${NP_VAR_X}" # see ${NP_VAR_X}', id="comment"
    ),
    pytest.param("echo a#${var.x}", 'echo a#"${NP_VAR_X}"', id="hash-inside-word"),
    pytest.param("echo $#${var.x}", 'echo $#"${NP_VAR_X}"', id="dollar-hash"),
    pytest.param(
        'cat <<EOF\n"${var.x}" $(echo ${var.x})\nEOF\necho ${var.x}',
        'cat <<EOF\n"${NP_VAR_X}" $(echo "${NP_VAR_X}")\nEOF\necho "${NP_VAR_X}"',
        id="heredoc",
    ),
    pytest.param(
        "cat <<-EOF\n\t${var.x}\n\tEOF\necho ${var.x}",
        'cat <<-EOF\n\t${NP_VAR_X}\n\tEOF\necho "${NP_VAR_X}"',
        id="heredoc-strip-tabs",
    ),
    pytest.param(
        "cat <<'EOF'\n'${var.x}'\nEOF\necho ${var.x}",
        "cat <<'EOF'\n'${NP_VAR_X}'\nEOF\necho \"${NP_VAR_X}\"",
        id="quoted-heredoc",
    ),
    pytest.param(
        'cat <<"E F" <<\\G\n${var.x}\nE F\n${var.x}\nG\necho ${var.x}',
        'cat <<"E F" <<\\G\n${NP_VAR_X}\nE F\n${NP_VAR_X}\nG\necho "${NP_VAR_X}"',
        id="two-quoted-heredocs",
    ),
]


@pytest.mark.parametrize(("script", "rendered"), CONTEXTS)
def test_each_shell_context_gets_its_own_read(script: str, rendered: str) -> None:
    context = evaluation_context(variables={"x": "1"}, run={})
    assert render_step(script, {}, context) == (rendered, {"NP_VAR_X": "1"})


HOSTILE_VALUES = [
    "a  *  b",
    "$(touch pwned)",
    "'; touch pwned; '",
    '"',
    "\\",
    "line one\nline two",
    "`touch pwned`",
    "",
]


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        pytest.param("printf '%s|' ${var.x}", "{}|", id="command-text"),
        pytest.param("printf '%s|' \"<${var.x}>\"", "<{}>|", id="double-quotes"),
        pytest.param("printf '%s|' '<${var.x}>'", "<{}>|", id="single-quotes"),
        pytest.param("printf '%s|' $'<\\t${var.x}>'", "<\t{}>|", id="ansi-c-quotes"),
        pytest.param("printf '%s|' go${var.x}.tgz", "go{}.tgz|", id="inside-a-word"),
        pytest.param("printf '%s|' \"$(printf '%s' ${var.x})\"", "{}|", id="substitution"),
        pytest.param("printf '%s|' $${U:-${var.x}}", "{}|", id="parameter-default"),
        pytest.param("cat <<EOF\n<${var.x}>\nEOF", "<{}>\n", id="heredoc"),
        pytest.param("X=${var.x}\nprintf '%s|' \"$X\"", "{}|", id="assignment"),
    ],
)
def test_bash_sees_every_value_as_one_literal_word(
    script: str, expected: str, tmp_path: Path
) -> None:
    """Real bash, every hostile value, every context: the value printed exactly, nothing run."""
    bash = shutil.which("bash")
    assert bash is not None
    for value in HOSTILE_VALUES:
        rendered, env = render_step(script, {}, evaluation_context(variables={"x": value}, run={}))
        result = subprocess.run(
            [bash, "-c", rendered],
            env={"PATH": os.environ["PATH"], **env},
            cwd=tmp_path,
            capture_output=True,
            check=True,
        )
        assert result.stdout == expected.replace("{}", value).encode(), rendered
    assert not (tmp_path / "pwned").exists()


def test_quoted_heredocs_show_the_variable_name_as_any_shell_would(tmp_path: Path) -> None:
    rendered, env = render_step(
        "cat <<'EOF'\n${var.x}\nEOF", {}, evaluation_context(variables={"x": "v"}, run={})
    )
    result = subprocess.run(["bash", "-c", rendered], env=env, capture_output=True, check=True)
    assert result.stdout == b"${NP_VAR_X}\n"


def test_a_reference_cannot_be_a_heredoc_delimiter() -> None:
    with pytest.raises(Invalid, match="heredoc delimiter"):
        render_step("cat <<${var.go_version}\nx\n", {}, CONTEXT)


def test_nul_characters_are_refused_with_their_source() -> None:
    context = evaluation_context(variables={"nul": "a\x00b"}, run={})
    with pytest.raises(Invalid, match=r"'var\.nul' holds a NUL"):
        render_step("echo ${var.nul}", {}, context)
    with pytest.raises(Invalid, match="env 'V' renders"):
        render_step("true", {"V": "${var.nul}"}, context)
    with pytest.raises(Invalid, match="script holds a NUL"):
        render_step("echo \x00", {}, context)


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


async def test_the_runner_prints_hostile_values_exactly_and_runs_none(
    controller: Controller, start_runner: Callable[..., Any]
) -> None:
    pwned = Path(f"/tmp/pwned-{uuid.uuid4().hex}")
    values = {
        "spaces": "a  *  b",
        "subshell": f"$(touch {pwned})",
        "quotes": f"'; touch {pwned}; '",
        "double": '"',
        "backslash": "\\",
        "newline": "\n",
    }
    # Every context (NAME is the variable), and a step `env` template read back.
    scripts = {
        "plain": ("printf '<%s>' ${var.NAME}", "<{}>"),
        "double": ("printf '<%s>' \"${var.NAME}\"", "<{}>"),
        "single": ("printf '<%s>' '${var.NAME}'", "<{}>"),
        "word": ("printf '<%s>' x${var.NAME}y", "<x{}y>"),
        "heredoc": ("cat <<EOF\n<${var.NAME}>\nEOF", "<{}>\n"),
        "env": ("printf '<%s>' \"$FROM_ENV\"", "<{}>"),
    }
    steps = [
        {
            "name": f"{context}-{variable}",
            "run": script.replace("NAME", variable),
            "env": {"FROM_ENV": "${var." + variable + "}"},
        }
        for context, (script, _) in scripts.items()
        for variable in values
    ]
    await controller.create_run(
        steps, variables=values, flow_variables=[{"name": name} for name in values]
    )
    runner = await start_runner(controller)
    assert await runner.wait() == 0, runner.stderr_text

    run = await controller.run()
    assert {step.name: step.phase for step in run.status.steps} == {
        step["name"]: "success" for step in steps
    }
    for context, (_, expected) in scripts.items():
        for variable, value in values.items():
            step = f"{context}-{variable}"
            printed = await controller.log_store.read("default", "01run", step, "stdout")
            assert printed == expected.format(value).encode(), step
    assert not pwned.exists()
