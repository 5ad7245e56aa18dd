"""The sandboxed condition language: parsed by hand, evaluated over plain mappings, never eval'd.

Grammar (lowest precedence first)::

    expression := or
    or         := and (("||" | "or") and)*
    and        := not (("&&" | "and") not)*
    not        := ("!" | "not") not | comparison
    comparison := primary [("==" | "!=" | "<" | "<=" | ">" | ">=" | "in" | "not in") primary]
    primary    := STRING | NUMBER | true | false | null | NAME | "[" [primary ("," primary)*] "]"
                | "(" expression ")"

A NAME is a dotted path such as ``steps.build.status`` or ``var.trigger.git_sha``; segments may
contain ``-`` (step names do) because the language has no arithmetic. Names are looked up in
nested mappings only: there is no attribute access, so nothing of Python is reachable, and parts
starting with ``__`` are refused outright. A name that is absent evaluates to null. ``==`` never
equates booleans with numbers, ordering compares numbers with numbers and strings with strings,
and anything else is an error.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from nomad_pipeline.errors import Invalid

# Roots a name may start with; the seed's spellings (specifications, inline.steps,
# nomad_pipeline.run_id) are aliases that evaluation_context fills from the same data.
KNOWN_ROOTS = frozenset(
    {"var", "steps", "run", "trigger", "specifications", "inline", "nomad_pipeline"}
)

_KEYWORDS = {"true", "false", "null", "and", "or", "not", "in"}
_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<number>-?\d+(?:\.\d+)?)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<name>[A-Za-z_][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_][A-Za-z0-9_-]*)*)
  | (?P<op>==|!=|<=|>=|&&|\|\||[<>!()\[\],])
    """,
    re.VERBOSE,
)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "'": "'", "\\": "\\"}
_COMPARISONS = {"==", "!=", "<", "<=", ">", ">=", "in", "not in"}


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # number, string, name, keyword, op, end
    text: str
    position: int  # 1-based column, as users count


def _unquote(literal: str, position: int, source: str) -> str:
    body, out, index = literal[1:-1], [], 0
    while index < len(body):
        char = body[index]
        if char == "\\":
            escaped = body[index + 1]
            if escaped not in _ESCAPES:
                raise _error(source, position + index + 1, f"unknown escape '\\{escaped}'")
            out.append(_ESCAPES[escaped])
            index += 2
        else:
            out.append(char)
            index += 1
    return "".join(out)


def _error(source: str, position: int, message: str) -> Invalid:
    return Invalid(f"invalid expression {source!r}: {message} at position {position}")


def _tokens(source: str) -> list[_Token]:
    tokens: list[_Token] = []
    index = 0
    while index < len(source):
        match = _TOKEN.match(source, index)
        if match is None:
            raise _error(source, index + 1, f"unexpected character {source[index]!r}")
        kind = match.lastgroup or ""
        text = match.group()
        if kind == "name" and text in _KEYWORDS:
            kind = "keyword"
        if kind == "name" and any(part.startswith("__") for part in text.split(".")):
            raise _error(source, index + 1, f"name {text!r} has a part starting with '__'")
        if kind != "space":
            tokens.append(_Token(kind, text, index + 1))
        index = match.end()
    tokens.append(_Token("end", "", len(source) + 1))
    return tokens


class _Node:
    def evaluate(self, context: Mapping[str, Any]) -> Any:
        raise TypeError(f"{type(self).__name__} cannot be evaluated")

    def names(self) -> Iterator[str]:
        return iter(())


@dataclass(frozen=True, slots=True)
class _Literal(_Node):
    value: Any

    def evaluate(self, context: Mapping[str, Any]) -> Any:
        return self.value


@dataclass(frozen=True, slots=True)
class _Name(_Node):
    path: str

    def evaluate(self, context: Mapping[str, Any]) -> Any:
        return lookup(context, self.path)

    def names(self) -> Iterator[str]:
        yield self.path


@dataclass(frozen=True, slots=True)
class _List(_Node):
    items: tuple[_Node, ...]

    def evaluate(self, context: Mapping[str, Any]) -> Any:
        return [item.evaluate(context) for item in self.items]

    def names(self) -> Iterator[str]:
        for item in self.items:
            yield from item.names()


@dataclass(frozen=True, slots=True)
class _Not(_Node):
    operand: _Node

    def evaluate(self, context: Mapping[str, Any]) -> Any:
        return not truthy(self.operand.evaluate(context))

    def names(self) -> Iterator[str]:
        return self.operand.names()


@dataclass(frozen=True, slots=True)
class _Logical(_Node):
    operator: str  # "and" | "or"
    left: _Node
    right: _Node

    def evaluate(self, context: Mapping[str, Any]) -> Any:
        left = truthy(self.left.evaluate(context))
        if self.operator == "and":
            return left and truthy(self.right.evaluate(context))
        return left or truthy(self.right.evaluate(context))

    def names(self) -> Iterator[str]:
        yield from self.left.names()
        yield from self.right.names()


@dataclass(frozen=True, slots=True)
class _Compare(_Node):
    operator: str
    left: _Node
    right: _Node

    def evaluate(self, context: Mapping[str, Any]) -> Any:
        left, right = self.left.evaluate(context), self.right.evaluate(context)
        if self.operator == "==":
            return _equal(left, right)
        if self.operator == "!=":
            return not _equal(left, right)
        if self.operator in ("in", "not in"):
            return _contains(right, left) == (self.operator == "in")
        return _order(self.operator, left, right)

    def names(self) -> Iterator[str]:
        yield from self.left.names()
        yield from self.right.names()


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _equal(left: Any, right: Any) -> bool:
    if isinstance(left, bool) != isinstance(right, bool):
        return False
    return bool(left == right)


def _contains(container: Any, item: Any) -> bool:
    if isinstance(container, list):
        return any(_equal(item, element) for element in container)
    if isinstance(container, str) and isinstance(item, str):
        return item in container
    if isinstance(container, Mapping):
        return item in container
    raise Invalid(f"'in' needs a list, a map or a string on its right, not {_type_name(container)}")


def _order(operator: str, left: Any, right: Any) -> bool:
    comparable = (_is_number(left) and _is_number(right)) or (
        isinstance(left, str) and isinstance(right, str)
    )
    if not comparable:
        raise Invalid(
            f"cannot compare {_type_name(left)} with {_type_name(right)} using {operator!r}"
        )
    if operator == "<":
        return bool(left < right)
    if operator == "<=":
        return bool(left <= right)
    if operator == ">":
        return bool(left > right)
    return bool(left >= right)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a bool"
    if _is_number(value):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a map"
    return type(value).__name__


def truthy(value: Any) -> bool:
    """null, false, 0, "" and empty lists/maps are false; everything else is true."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if _is_number(value):
        return bool(value != 0)
    if isinstance(value, str | list | Mapping):
        return len(value) > 0
    return True


def lookup(context: Mapping[str, Any], path: str) -> Any:
    """Resolve a dotted ``path`` through nested mappings; keys may themselves contain dots.

    ``var.trigger.git_sha`` finds ``context["var"]["trigger.git_sha"]`` as well as
    ``context["var"]["trigger"]["git_sha"]`` (the longest key that exists wins). Absent → None.
    """
    return _lookup(context, path.split("."))


def _lookup(mapping: Mapping[str, Any], segments: list[str]) -> Any:
    for count in range(len(segments), 0, -1):
        key = ".".join(segments[:count])
        if key not in mapping:
            continue
        value = mapping[key]
        if count == len(segments):
            return value
        if isinstance(value, Mapping):
            found = _lookup(value, segments[count:])
            if found is not None:
                return found
    return None


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.tokens = _tokens(source)
        self.index = 0

    @property
    def current(self) -> _Token:
        return self.tokens[self.index]

    def _advance(self) -> _Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def _at(self, *texts: str) -> bool:
        token = self.current
        return token.kind in ("op", "keyword") and token.text in texts

    def _expect(self, text: str) -> None:
        if not self._at(text):
            raise self._unexpected(f"expected {text!r}")
        self._advance()

    def _unexpected(self, expectation: str) -> Invalid:
        token = self.current
        found = "end of expression" if token.kind == "end" else repr(token.text)
        return _error(self.source, token.position, f"{expectation}, found {found}")

    def parse(self) -> _Node:
        if self.current.kind == "end":
            raise _error(self.source, 1, "empty expression")
        node = self._or()
        if self.current.kind != "end":
            raise self._unexpected("expected an operator or the end")
        return node

    def _or(self) -> _Node:
        node = self._and()
        while self._at("||", "or"):
            self._advance()
            node = _Logical("or", node, self._and())
        return node

    def _and(self) -> _Node:
        node = self._not()
        while self._at("&&", "and"):
            self._advance()
            node = _Logical("and", node, self._not())
        return node

    def _not(self) -> _Node:
        if self._at("!", "not"):
            self._advance()
            return _Not(self._not())
        return self._comparison()

    def _comparison(self) -> _Node:
        left = self._primary()
        if self._at("not") and self.tokens[self.index + 1].text == "in":
            self.index += 2
            return _Compare("not in", left, self._primary())
        if self._at(*_COMPARISONS):
            operator = self._advance().text
            return _Compare(operator, left, self._primary())
        return left

    def _primary(self) -> _Node:
        token = self.current
        if token.kind == "number":
            self._advance()
            number = float(token.text) if "." in token.text else int(token.text)
            return _Literal(number)
        if token.kind == "string":
            self._advance()
            return _Literal(_unquote(token.text, token.position, self.source))
        if token.kind == "keyword" and token.text in ("true", "false", "null"):
            self._advance()
            return _Literal({"true": True, "false": False, "null": None}[token.text])
        if token.kind == "name":
            self._advance()
            return _Name(token.text)
        if self._at("("):
            self._advance()
            node = self._or()
            self._expect(")")
            return node
        if self._at("["):
            return self._list()
        raise self._unexpected("expected a value, a name or '('")

    def _list(self) -> _Node:
        self._expect("[")
        items: list[_Node] = []
        while not self._at("]"):
            items.append(self._primary())
            if not self._at(","):
                break
            self._advance()
        self._expect("]")
        return _List(tuple(items))


@dataclass(frozen=True, slots=True)
class Expression:
    """A parsed condition; immutable and safe to share between tasks."""

    source: str
    _root: _Node

    def names(self) -> frozenset[str]:
        """Every dotted name the expression reads (for apply-time validation)."""
        return frozenset(self._root.names())

    def evaluate(self, context: Mapping[str, Any]) -> Any:
        """The expression's value; raises Invalid for comparisons between unlike types."""
        return self._root.evaluate(context)

    def is_true(self, context: Mapping[str, Any]) -> bool:
        return truthy(self.evaluate(context))


@functools.lru_cache(maxsize=4096)
def parse_expression(source: str) -> Expression:
    """Parse ``source``; ``Invalid`` names what is wrong and the 1-based position.

    Cached: every stored run re-validates its flow snapshot, and Expressions are immutable.
    """
    return Expression(source, _Parser(source).parse())


def evaluation_context(
    *,
    variables: Mapping[str, Any],
    steps: Mapping[str, Mapping[str, Any]] | None = None,
    run: Mapping[str, Any] | None = None,
    trigger: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The mapping conditions and templates are evaluated over, with the seed's aliases.

    ``steps`` maps a step name to ``{"status": phase, "exit_code": ...}``; ``run`` holds
    ``id``, ``name``, ``namespace``, ``flow``; ``trigger`` holds ``type``, ``name`` and so on.
    Run variables named ``trigger.<x>`` (filled by webhooks) are also readable as ``trigger.<x>``.
    """
    steps = steps or {}
    run = dict(run or {})
    trigger_values = dict(trigger or {})
    for name, value in variables.items():
        if name.startswith("trigger."):
            trigger_values.setdefault(name.removeprefix("trigger."), value)
    return {
        "var": dict(variables),
        "steps": steps,
        "specifications": steps,
        "inline": {"steps": steps},
        "run": run,
        "trigger": trigger_values,
        "nomad_pipeline": {"run_id": run.get("id")},
    }
