"""``${...}`` templates: ``${var.env}``, ``${var.trigger.git_sha}``, ``${nomad_pipeline.run_id}``.

A template holds only dotted names between ``${`` and ``}`` (no expressions), so rendering is a
lookup. ``$${`` writes a literal ``${`` (as in HCL), which is how a shell script keeps its own
``${HOME}``. Values render as text: strings as they are, null as "", booleans as true/false,
lists and maps as JSON.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from nomad_pipeline.errors import Invalid
from nomad_pipeline.resources.expressions import KNOWN_ROOTS, lookup

# Names the templates may read: those of conditions, minus step results (a step's status is
# not known when its script or job is rendered).
TEMPLATE_ROOTS = frozenset({"var", "run", "trigger", "nomad_pipeline"})

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_][A-Za-z0-9_-]*)+$")
_PIECE = re.compile(r"\$\$\{|\$\{([^}\n]*)\}|\$\{")


@functools.lru_cache(maxsize=4096)
def _references(template: str) -> tuple[tuple[int, int, str | None], ...]:
    """(start, end, name) of each ``${name}``; name None marks an escaped ``$${``.

    Cached: stored runs re-validate their flow snapshot's templates on every load.
    """
    found: list[tuple[int, int, str | None]] = []
    for match in _PIECE.finditer(template):
        text = match.group()
        if text == "$${":
            found.append((match.start(), match.end(), None))
            continue
        if match.group(1) is None:
            raise Invalid(
                f"unterminated '${{' at position {match.start() + 1} in template {template!r}"
            )
        name = match.group(1).strip()
        if not _NAME.match(name) or "__" in name:
            raise Invalid(
                f"invalid reference '${{{match.group(1)}}}' at position {match.start() + 1}: "
                "only dotted names such as ${var.name} are allowed (write $${ for a literal ${)"
            )
        root = name.split(".", 1)[0]
        if root not in TEMPLATE_ROOTS:
            hint = " (step results are for conditions)" if root in KNOWN_ROOTS else ""
            raise Invalid(
                f"unknown name {name!r} at position {match.start() + 1}: templates may read "
                f"{', '.join(sorted(TEMPLATE_ROOTS))}{hint}; write $${{ for a literal ${{"
            )
        found.append((match.start(), match.end(), name))
    return tuple(found)


def template_names(template: str) -> list[str]:
    """The dotted names ``template`` references, in order of first use; Invalid if malformed."""
    names: list[str] = []
    for _, _, name in _references(template):
        if name is not None and name not in names:
            names.append(name)
    return names


def substitute(template: str, replace: Callable[[str], str]) -> str:
    """Replace each ``${name}`` with ``replace(name)`` and each ``$${`` with ``${``.

    The runner uses this to turn references in a script into environment-variable reads, so a
    value never becomes shell syntax.
    """
    out: list[str] = []
    position = 0
    for start, end, name in _references(template):
        out.append(template[position:start])
        out.append("${" if name is None else replace(name))
        position = end
    out.append(template[position:])
    return "".join(out)


def render_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value)


def render(template: str, context: Mapping[str, Any]) -> str:
    """Render ``template`` over ``context`` (see ``evaluation_context``); unknown names → Invalid.

    A name counts as unknown when its path is absent; a present null renders as "".
    """

    def resolve(name: str) -> str:
        sentinel = object()
        value = _find(context, name, sentinel)
        if value is sentinel:
            raise Invalid(f"template {template!r}: unknown name {name!r}")
        return render_value(value)

    return substitute(template, resolve)


def _find(context: Mapping[str, Any], name: str, missing: object) -> Any:
    value = lookup(context, name)
    if value is not None:
        return value
    # lookup answers None both for "absent" and for "present and null"; tell them apart.
    root, _, rest = name.partition(".")
    scope = context.get(root)
    if isinstance(scope, Mapping) and rest in scope:
        return None
    return missing
