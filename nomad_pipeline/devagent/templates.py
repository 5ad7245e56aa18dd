"""Task templates: the subset of consul-template (Go ``text/template``) the dev agent renders.

Supported: plain text, custom delimiters, ``{{-``/``-}}`` whitespace trimming, comments
``{{/* */}}``, string literals, and pipelines over the functions ``env``, ``toUpper``,
``toLower``, ``trimSpace``. Anything else fails rendering with a message naming the action, as
consul-template reports an undefined function.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable


class TemplateError(Exception):
    pass


_FUNCTIONS: dict[str, Callable[[list[str]], str]] = {
    "toUpper": lambda args: _one(args, "toUpper").upper(),
    "toLower": lambda args: _one(args, "toLower").lower(),
    "trimSpace": lambda args: _one(args, "trimSpace").strip(),
}


def _one(args: list[str], name: str) -> str:
    if len(args) != 1:
        raise TemplateError(f"wrong number of args for {name}: want 1 got {len(args)}")
    return args[0]


def render(text: str, env: dict[str, str], *, left: str = "{{", right: str = "}}") -> str:
    """Render ``text`` with ``env`` as the environment ``{{ env "X" }}`` reads."""
    out: list[str] = []
    position = 0
    trim_next = False
    while True:
        start = text.find(left, position)
        if start < 0:
            chunk = text[position:]
            out.append(chunk.lstrip() if trim_next else chunk)
            break
        chunk = text[position:start]
        if trim_next:
            chunk = chunk.lstrip()
        inner_start = start + len(left)
        end = text.find(right, inner_start)
        if end < 0:
            line = text.count("\n", 0, start) + 1
            raise TemplateError(f"line {line}: unclosed action")
        action = text[inner_start:end]
        if action.startswith("- ") or action == "-":
            chunk = chunk.rstrip()
            action = action[1:]
        trim_next = action.endswith(" -")
        if trim_next:
            action = action[:-1]
        out.append(chunk)
        out.append(_evaluate(action.strip(), env, line=text.count("\n", 0, start) + 1))
        position = end + len(right)
    return "".join(out)


def _evaluate(action: str, env: dict[str, str], *, line: int) -> str:
    if action.startswith("/*") and action.endswith("*/"):
        return ""
    value: str | None = None
    for stage in action.split("|"):
        try:
            words = shlex.split(stage.strip(), posix=True)
        except ValueError as exc:
            raise TemplateError(f"line {line}: cannot parse {action!r}: {exc}") from exc
        if not words:
            raise TemplateError(f"line {line}: missing value for command")
        if stage.strip().startswith(('"', "`")) and len(words) == 1:
            value = words[0]
            continue
        name, args = words[0], words[1:]
        if value is not None:
            args.append(value)
        if name == "env":
            value = env.get(_one(args, "env"), "")
        elif name in _FUNCTIONS:
            value = _FUNCTIONS[name](args)
        else:
            raise TemplateError(f'line {line}: function "{name}" not defined')
    return value or ""


_ENV_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_.]*)\s*=\s*(.*?)\s*$")


def parse_env_file(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines (``Envvars: true``); quotes are removed, ``#`` lines skipped."""
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        match = _ENV_LINE.match(raw)
        if match is None:
            raise TemplateError(f"line {number}: expected KEY=VALUE, got {raw!r}")
        key, value = match.groups()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key] = value
    return values
