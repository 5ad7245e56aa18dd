"""``${...}`` templates: names, rendering, escapes and errors."""

from __future__ import annotations

import pytest

from nomad_pipeline.errors import Invalid
from nomad_pipeline.resources.expressions import evaluation_context
from nomad_pipeline.resources.templates import render, substitute, template_names

CONTEXT = evaluation_context(
    variables={
        "env": "prod",
        "trigger.git_sha": "abc",
        "n": 2,
        "flag": True,
        "empty": None,
        "tags": ["a"],
        "m": {"k": "v"},
    },
    run={"id": "01j0", "namespace": "default", "flow": "f"},
    trigger={"type": "manual"},
)

RENDERINGS = [
    ("plain text", "plain text"),
    ("${var.env}", "prod"),
    ("deploy-${var.env}-${var.env}", "deploy-prod-prod"),
    ("${ var.env }", "prod"),
    ("${var.trigger.git_sha}", "abc"),
    ("${trigger.git_sha}", "abc"),
    ("${trigger.type}", "manual"),
    ("${nomad_pipeline.run_id}-step1", "01j0-step1"),
    ("${run.id}/${run.namespace}", "01j0/default"),
    ("${var.n} ${var.flag}", "2 true"),
    ("[${var.empty}]", "[]"),
    ("${var.tags} ${var.m}", '["a"] {"k": "v"}'),
    ("$${HOME} and $${var.env}", "${HOME} and ${var.env}"),
    ("$$ and $ alone", "$$ and $ alone"),
    ("cost: $5 {braces}", "cost: $5 {braces}"),
]


@pytest.mark.parametrize(("template", "expected"), RENDERINGS)
def test_render(template: str, expected: str) -> None:
    assert render(template, CONTEXT) == expected


def test_template_names_in_order_without_escapes() -> None:
    assert template_names("${var.a} $${var.b} ${trigger.x} ${var.a} ${run.id}") == [
        "var.a",
        "trigger.x",
        "run.id",
    ]


BAD_TEMPLATES = [
    ("${HOME}", "invalid reference '${HOME}' at position 1"),
    ("x ${env.PATH}", "unknown name 'env.PATH' at position 3"),
    ("${steps.a.status}", "step results are for conditions"),
    ("${var.a + 1}", "only dotted names"),
    ("${}", "invalid reference"),
    ("${var.__class__}", "invalid reference"),
    ("oops ${var.a", "unterminated '${' at position 6"),
]


@pytest.mark.parametrize(("template", "message"), BAD_TEMPLATES)
def test_bad_templates(template: str, message: str) -> None:
    with pytest.raises(
        Invalid, match=message.replace("$", r"\$").replace("{", r"\{").replace("+", r"\+")
    ):
        template_names(template)


def test_unknown_names_fail_to_render() -> None:
    with pytest.raises(Invalid, match=r"unknown name 'var\.nope'"):
        render("${var.nope}", CONTEXT)


def test_substitute_lets_the_caller_bind_references() -> None:
    script = 'echo "${var.env}" $${PATH}'
    assert substitute(script, lambda name: "$" + name.replace(".", "_").upper()) == (
        'echo "$VAR_ENV" ${PATH}'
    )
