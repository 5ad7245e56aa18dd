"""Task templates: the subset of consul-template (Go ``text/template``) the dev agent renders.

Supported: text, custom delimiters, ``{{-``/``-}}`` trimming, comments, ``if``/``else``/
``else if``/``with``/``range`` (with ``$k, $v :=``) blocks, ``.field`` and ``$var`` access,
string/number/bool literals, pipelines, and the functions ``env``, ``nomadVar``,
``nomadVarExists``, ``nomadVarList``, ``toUpper``, ``toLower``, ``trimSpace``, ``toJSON``,
``eq``, ``ne``, ``not``, ``and``, ``or``, ``len``, ``index``, ``join``, ``split``,
``printf``. Anything else fails rendering with a message naming it, as Go reports an undefined
function.

``nomadVar`` of a variable that does not exist raises :class:`VariableMissing`: as in Nomad,
the task then waits (pending) until the variable appears.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class TemplateError(Exception):
    pass


class VariableMissing(Exception):
    """A ``nomadVar`` read a variable that does not exist yet."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


@dataclass(frozen=True, slots=True)
class TemplateData:
    """What a template can read: the task environment and Nomad variables."""

    env: dict[str, str]
    read_variable: Callable[[str], dict[str, Any] | None] = lambda _path: None
    list_variables: Callable[[str], list[dict[str, Any]]] = lambda _prefix: []


NO_VALUE = "<no value>"


# -- parsing ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Block:
    keyword: str  # "root", "if", "with", "range"
    pipeline: str = ""
    line: int = 0
    body: list[Any] = field(default_factory=list)
    orelse: list[Any] = field(default_factory=list)
    in_else: bool = False
    variables: tuple[str, ...] = ()
    # Opened by "else if"/"else with": closed by the same "end" as the block it continues.
    chained: bool = False

    def append(self, node: Any) -> None:
        (self.orelse if self.in_else else self.body).append(node)


@dataclass(frozen=True, slots=True)
class _Output:
    pipeline: str
    line: int


_RANGE_VARS = re.compile(r"^(\$\w+)(?:\s*,\s*(\$\w+))?\s*:=\s*(.+)$", re.DOTALL)


def _parse(text: str, left: str, right: str) -> _Block:
    root = _Block("root")
    stack = [root]
    position = 0
    trim_next = False
    while True:
        start = text.find(left, position)
        chunk = text[position:] if start < 0 else text[position:start]
        if trim_next:
            chunk = chunk.lstrip()
        if start < 0:
            stack[-1].append(chunk)
            break
        line = text.count("\n", 0, start) + 1
        end = text.find(right, start + len(left))
        if end < 0:
            raise TemplateError(f"line {line}: unclosed action")
        action = text[start + len(left) : end]
        if action.startswith("-") and (len(action) == 1 or action[1].isspace()):
            chunk = chunk.rstrip()
            action = action[1:]
        trim_next = action.endswith("-") and (len(action) == 1 or action[-2].isspace())
        if trim_next:
            action = action[:-1]
        stack[-1].append(chunk)
        position = end + len(right)
        _parse_action(action.strip(), line, stack)
    if len(stack) > 1:
        raise TemplateError(
            f"line {stack[-1].line}: unexpected EOF: {stack[-1].keyword} not closed"
        )
    return root


def _parse_action(action: str, line: int, stack: list[_Block]) -> None:
    if action.startswith("/*") and action.endswith("*/"):
        return
    word, _, rest = action.partition(" ")
    rest = rest.strip()
    if word in ("if", "with", "range"):
        block = _Block(word, rest, line)
        if word == "range":
            match = _RANGE_VARS.match(rest)
            if match:
                first, second, pipeline = match.groups()
                block.variables = (first, second) if second else (first,)
                block.pipeline = pipeline.strip()
        if not block.pipeline:
            raise TemplateError(f"line {line}: missing value for {word}")
        stack[-1].append(block)
        stack.append(block)
    elif word == "else":
        current = stack[-1]
        if current.keyword == "root" or current.in_else:
            raise TemplateError(f"line {line}: unexpected else")
        current.in_else = True
        if rest.startswith("if ") or rest.startswith("with "):
            # "else if" opens a block that the same "end" closes.
            nested_word, _, nested = rest.partition(" ")
            nested_block = _Block(nested_word, nested.strip(), line, chained=True)
            current.append(nested_block)
            stack.append(nested_block)
    elif word == "end":
        while True:
            if len(stack) == 1:
                raise TemplateError(f"line {line}: unexpected end")
            if not stack.pop().chained:
                break
    else:
        stack[-1].append(_Output(action, line))


# -- evaluation ------------------------------------------------------------------------------


def _truth(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, bool | int | float | str | list | dict | tuple):
        return bool(value)
    return True


def _text(value: Any) -> str:
    if value is None:
        return NO_VALUE
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "map[" + " ".join(f"{k}:{_text(v)}" for k, v in sorted(value.items())) + "]"
    if isinstance(value, list):
        return "[" + " ".join(_text(v) for v in value) + "]"
    return str(value)


_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|`[^`]*`|\S+')


class _Renderer:
    def __init__(self, data: TemplateData) -> None:
        self.data = data
        self.functions: dict[str, Callable[..., Any]] = {
            "env": lambda name: data.env.get(str(name), ""),
            "nomadVar": self._nomad_var,
            "nomadVarExists": lambda path: data.read_variable(str(path)) is not None,
            "nomadVarList": lambda prefix="": data.list_variables(str(prefix)),
            "toUpper": lambda s: str(s).upper(),
            "toLower": lambda s: str(s).lower(),
            "trimSpace": lambda s: str(s).strip(),
            "toJSON": lambda v: json.dumps(v, separators=(",", ":"), sort_keys=True),
            "eq": lambda a, *others: any(a == o for o in others),
            "ne": lambda a, b: a != b,
            "not": lambda v: not _truth(v),
            "and": lambda *vs: next((v for v in vs if not _truth(v)), vs[-1]),
            "or": lambda *vs: next((v for v in vs if _truth(v)), vs[-1]),
            "len": len,
            "index": lambda v, *keys: _index(v, keys),
            "join": lambda items, sep: str(sep).join(str(i) for i in items),
            "split": lambda sep, s: str(s).split(str(sep)),
            "printf": lambda fmt, *args: re.sub(r"%v", "%s", str(fmt)) % args,
        }

    def _nomad_var(self, path: Any) -> dict[str, Any]:
        found = self.data.read_variable(str(path))
        if found is None:
            raise VariableMissing(str(path))
        return found

    def render(self, nodes: list[Any], dot: Any, scope: dict[str, Any]) -> str:
        out: list[str] = []
        for node in nodes:
            if isinstance(node, str):
                out.append(node)
            elif isinstance(node, _Output):
                out.append(_text(self.pipeline(node.pipeline, dot, scope, node.line)))
            else:
                out.append(self.block(node, dot, scope))
        return "".join(out)

    def block(self, block: _Block, dot: Any, scope: dict[str, Any]) -> str:
        value = self.pipeline(block.pipeline, dot, scope, block.line)
        if block.keyword == "if":
            chosen = block.body if _truth(value) else block.orelse
            return self.render(chosen, dot, scope)
        if block.keyword == "with":
            if _truth(value):
                return self.render(block.body, value, scope)
            return self.render(block.orelse, dot, scope)
        items: list[tuple[Any, Any]]
        if isinstance(value, dict):
            items = sorted(value.items())
        elif isinstance(value, list | tuple):
            items = list(enumerate(value))
        elif value is None:
            items = []
        else:
            raise TemplateError(f"line {block.line}: range can't iterate over {_text(value)}")
        if not items:
            return self.render(block.orelse, dot, scope)
        out: list[str] = []
        for key, item in items:
            inner = dict(scope)
            if len(block.variables) == 2:
                inner[block.variables[0]], inner[block.variables[1]] = key, item
            elif block.variables:
                inner[block.variables[0]] = item
            out.append(self.render(block.body, item, inner))
        return "".join(out)

    def pipeline(self, text: str, dot: Any, scope: dict[str, Any], line: int) -> Any:
        value: Any = None
        first = True
        for stage in _split_pipes(text):
            tokens = _TOKEN.findall(stage)
            if not tokens:
                raise TemplateError(f"line {line}: missing value for command")
            head, args = tokens[0], [self.operand(t, dot, scope, line) for t in tokens[1:]]
            if not first:
                args.append(value)
            if head in self.functions:
                try:
                    value = self.functions[head](*args)
                except (TypeError, ValueError, KeyError, IndexError) as exc:
                    raise TemplateError(f"line {line}: error calling {head}: {exc}") from exc
            elif _is_operand(head) and not args:
                value = self.operand(head, dot, scope, line)
            elif re.fullmatch(r"[A-Za-z_]\w*", head):
                raise TemplateError(f'line {line}: function "{head}" not defined')
            else:
                raise TemplateError(f"line {line}: can't give argument to non-function {head}")
            first = False
        return value

    def operand(self, token: str, dot: Any, scope: dict[str, Any], line: int) -> Any:
        if token.startswith('"'):
            return json.loads(token)
        if token.startswith("`"):
            return token[1:-1]
        if token in ("true", "false"):
            return token == "true"
        if re.fullmatch(r"-?\d+", token):
            return int(token)
        if re.fullmatch(r"-?\d+\.\d*", token):
            return float(token)
        if token == ".":
            return dot
        if token.startswith("."):
            return _fields(dot, token[1:].split("."))
        if token.startswith("$"):
            name, _, rest = token.partition(".")
            if name == "$":
                base = scope.get("$")
            elif name in scope:
                base = scope[name]
            else:
                raise TemplateError(f"line {line}: undefined variable: {name}")
            return _fields(base, rest.split(".")) if rest else base
        if token in self.functions:
            return self.functions[token]()
        raise TemplateError(f'line {line}: function "{token}" not defined')


def _is_operand(token: str) -> bool:
    return bool(
        token.startswith(('"', "`", ".", "$"))
        or token in ("true", "false")
        or re.fullmatch(r"-?\d+(\.\d*)?", token)
    )


def _fields(value: Any, names: list[str]) -> Any:
    for name in names:
        if isinstance(value, dict):
            value = value.get(name)
        else:
            return None
    return value


def _index(value: Any, keys: tuple[Any, ...]) -> Any:
    for key in keys:
        value = value[key] if isinstance(value, list | tuple) else (value or {}).get(key)
    return value


def _split_pipes(text: str) -> list[str]:
    """Split a pipeline on ``|`` outside string literals."""
    parts: list[str] = []
    current: list[str] = []
    quote = ""
    escaped = False
    for char in text:
        if quote:
            current.append(char)
            if escaped:
                escaped = False
            elif char == "\\" and quote == '"':
                escaped = True
            elif char == quote:
                quote = ""
        elif char in ('"', "`"):
            quote = char
            current.append(char)
        elif char == "|":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def render(
    text: str,
    data: TemplateData | dict[str, str],
    *,
    left: str = "{{",
    right: str = "}}",
) -> str:
    """Render ``text``; ``data`` is a TemplateData or just the environment ``env`` reads."""
    if not isinstance(data, TemplateData):
        data = TemplateData(env=data)
    tree = _parse(text, left, right)
    return _Renderer(data).render(tree.body, None, {"$": None})


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
