"""Nomad's HTTP wire conventions, shared by every route of the dev agent.

Query parsing with Nomad's exact error texts, blocking queries, the query-meta headers, JSON
responses (``?pretty``), list shaping (``prefix``, ``per_page``/``next_token``, ``reverse``,
a small go-bexpr ``filter`` subset) and the middleware that turns :class:`NomadHTTPError` into
Nomad's text/plain error responses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from aiohttp import web

from nomad_pipeline.devagent.jobspec import format_duration
from nomad_pipeline.devagent.state import NomadHTTPError, Obj, StateStore, to_json

logger = logging.getLogger(__name__)

T = TypeVar("T")

STATE_KEY: Final = web.AppKey("devagent_state", StateStore)

DEFAULT_BLOCKING_WAIT = 300.0
MAX_BLOCKING_WAIT = 600.0

_TRUE = frozenset({"1", "t", "T", "true", "TRUE", "True"})
_FALSE = frozenset({"0", "f", "F", "false", "FALSE", "False"})

_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


# -- scalar parsing -------------------------------------------------------------------------


def parse_go_bool(value: str) -> bool | None:
    """Go's ``strconv.ParseBool``; None when ``value`` is not one of its spellings."""
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    return None


def parse_go_duration(text: str) -> float:
    """Go's ``time.ParseDuration`` in seconds; ValueError names the bad text."""
    source = text
    sign = 1.0
    if text[:1] in ("+", "-"):
        sign = -1.0 if text[0] == "-" else 1.0
        text = text[1:]
    if text == "0":
        return 0.0
    if not text:
        raise ValueError(f"time: invalid duration {source!r}")
    total = 0.0
    position = 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            raise ValueError(f"time: invalid duration {source!r}")
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position != len(text):
        if position == 0 or not text[position:].strip("0123456789."):
            raise ValueError(f"time: missing unit in duration {source!r}")
        raise ValueError(f"time: invalid duration {source!r}")
    return sign * total


def format_go_duration(seconds: float) -> str:
    """Go's ``Duration.String`` of a duration given in seconds (``15s``, ``1m30s``, ``1h0m0s``)."""
    return format_duration(round(seconds * 1e9))


def query_bool(request: web.Request, name: str, default: bool = False) -> bool:
    """A boolean query parameter; present without a value means true, as Nomad's parser."""
    if name not in request.query:
        return default
    value = request.query[name]
    if value == "":
        return True
    parsed = parse_go_bool(value)
    if parsed is None:
        raise NomadHTTPError(400, f"Failed to parse value of {name!r} ({value}) as a bool")
    return parsed


def query_int(request: web.Request, name: str, default: int, *, error: str) -> int:
    value = request.query.get(name, "")
    if value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise NomadHTTPError(400, error) from None


def query_namespace(request: web.Request) -> str:
    return request.query.get("namespace") or "default"


# -- request bodies -------------------------------------------------------------------------


async def read_json_body(request: web.Request) -> Any:
    """Decode the request body as Nomad does: empty is 400, malformed is 400 with the reason."""
    raw = await request.read()
    if not raw.strip():
        raise NomadHTTPError(400, "Request body is empty")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise NomadHTTPError(400, f"Failed to decode request body: {exc}") from None
    except UnicodeDecodeError as exc:
        raise NomadHTTPError(400, f"Failed to decode request body: {exc}") from None


def json_object(value: Any, what: str) -> Obj:
    """``value`` as a JSON object, or 400 naming what was expected (Go decoding fails the same)."""
    if not isinstance(value, dict):
        raise NomadHTTPError(
            400,
            f"Failed to decode request body: json: cannot unmarshal {_json_kind(value)} "
            f"into Go value of type {what}",
        )
    return value


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return "null" if value is None else "object"


def field(obj: Obj, name: str, default: Any = None) -> Any:
    """Case-insensitive key lookup, as Go's ``encoding/json`` matches struct fields."""
    if name in obj:
        return obj[name]
    lowered = name.lower()
    for key, value in obj.items():
        if key.lower() == lowered:
            return value
    return default


# -- responses ------------------------------------------------------------------------------


def query_meta_headers(index: int) -> dict[str, str]:
    return {
        "X-Nomad-Index": str(index),
        "X-Nomad-KnownLeader": "true",
        "X-Nomad-LastContact": "0",
    }


def json_response(
    request: web.Request,
    body: Any,
    *,
    index: int | None = None,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """A JSON reply: minified, indented with ``?pretty``, with the query-meta headers."""
    if "pretty" in request.query and parse_go_bool(request.query["pretty"] or "true") is not False:
        text = json.dumps(body, indent=4) + "\n"
    else:
        text = to_json(body)
    all_headers = query_meta_headers(index if index is not None else request.app[STATE_KEY].index)
    if headers:
        all_headers.update(headers)
    return web.Response(
        text=text, status=status, content_type="application/json", headers=all_headers
    )


def empty_response(request: web.Request, index: int, status: int = 200) -> web.Response:
    return web.Response(status=status, headers=query_meta_headers(index))


# -- blocking queries -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlockingParams:
    min_index: int
    wait: float


def blocking_params(request: web.Request) -> BlockingParams:
    min_index = query_int(request, "index", 0, error="Invalid index")
    if min_index < 0:
        raise NomadHTTPError(400, "Invalid index")
    wait = DEFAULT_BLOCKING_WAIT
    if request.query.get("wait"):
        try:
            wait = parse_go_duration(request.query["wait"])
        except ValueError:
            raise NomadHTTPError(400, "Invalid wait time") from None
        if wait < 0:
            raise NomadHTTPError(400, "Invalid wait time")
    wait = min(wait, MAX_BLOCKING_WAIT)
    # Nomad spreads wake-ups of many watchers with up to wait/16 of jitter.
    return BlockingParams(min_index, wait + random.uniform(0, wait / 16))


async def blocking_query(
    request: web.Request,
    tables: tuple[str, ...],
    read: Callable[[], tuple[T, int]],
    *,
    reply_index: Callable[[], int] | None = None,
) -> tuple[T, int]:
    """Run ``read`` (returning the result and its index) as a Nomad blocking query.

    With ``?index=N`` the call returns once the result's index passes N or the wait ends.
    ``read`` runs again after every change to ``tables`` because an object's own index (a job's
    ModifyIndex) can stay put while its table moves on. ``reply_index`` gives the index to
    answer when it differs from the one that wakes the query: Nomad answers a job's
    allocations with the whole table's index but wakes only for that job's allocations.
    """
    params = blocking_params(request)
    state = request.app[STATE_KEY]
    result, index = read()
    if params.min_index > 0:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + params.wait
        while index <= params.min_index:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await state.wait(tables, max(params.min_index, state.table_index(*tables)), remaining)
            result, index = read()
    if reply_index is not None:
        index = reply_index()
    return result, max(index, 1)


# -- lists ----------------------------------------------------------------------------------


def paginate(
    request: web.Request,
    items: Iterable[T],
    token_of: Callable[[T], str],
) -> tuple[list[T], dict[str, str]]:
    """Apply ``filter``, ``reverse``, ``next_token`` and ``per_page`` to items sorted by token.

    Returns the page and the X-Nomad-NextToken header (when more items remain).
    """
    per_page = query_int(
        request,
        "per_page",
        0,
        error="Expect a number for `per_page` query string parameter",
    )
    reverse = request.query.get("reverse") == "true"
    ordered = sorted(items, key=token_of, reverse=reverse)
    expression = request.query.get("filter", "")
    if expression:
        matcher = compile_filter(expression)
        ordered = [item for item in ordered if matcher(item)]
    token = request.query.get("next_token", "")
    if token:
        if reverse:
            ordered = [item for item in ordered if token_of(item) <= token]
        else:
            ordered = [item for item in ordered if token_of(item) >= token]
    if per_page > 0 and len(ordered) > per_page:
        return ordered[:per_page], {"X-Nomad-NextToken": token_of(ordered[per_page])}
    return ordered, {}


# -- filter expressions (a go-bexpr subset) -----------------------------------------------

_FILTER_TOKEN = re.compile(
    r"""\s*(?:
        (?P<lparen>\() | (?P<rparen>\)) |
        (?P<op>==|!=) |
        (?P<string>"(?:[^"\\]|\\.)*"|`[^`]*`) |
        (?P<number>-?\d+(?:\.\d+)?(?![\w.])) |
        (?P<word>[A-Za-z_][\w.\-\[\]]*)
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str
    text: str


def _tokenize(expression: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while position < len(expression):
        if expression[position:].strip() == "":
            break
        match = _FILTER_TOKEN.match(expression, position)
        if match is None or match.lastgroup is None:
            raise NomadHTTPError(
                400,
                f"failed to read filter expression: unexpected input at position {position}: "
                f"{expression[position:]!r}",
            )
        tokens.append(_Token(match.lastgroup, match.group(match.lastgroup)))
        position = match.end()
    return tokens


Matcher = Callable[[Any], bool]


class _FilterParser:
    """Recursive descent over ``or`` > ``and`` > ``not`` > (comparison | parenthesised)."""

    def __init__(self, expression: str) -> None:
        self.expression = expression
        self.tokens = _tokenize(expression)
        self.position = 0

    def fail(self, reason: str) -> NomadHTTPError:
        return NomadHTTPError(400, f"failed to read filter expression: {reason}")

    def peek(self) -> _Token | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self) -> _Token:
        token = self.peek()
        if token is None:
            raise self.fail(f"unexpected end of expression {self.expression!r}")
        self.position += 1
        return token

    def parse(self) -> Matcher:
        matcher = self.parse_or()
        if self.peek() is not None:
            raise self.fail(f"unexpected {self.take().text!r} in {self.expression!r}")
        return matcher

    def parse_or(self) -> Matcher:
        parts = [self.parse_and()]
        while (token := self.peek()) is not None and token.kind == "word" and token.text == "or":
            self.take()
            parts.append(self.parse_and())
        if len(parts) == 1:
            return parts[0]
        return lambda obj: any(part(obj) for part in parts)

    def parse_and(self) -> Matcher:
        parts = [self.parse_not()]
        while (token := self.peek()) is not None and token.kind == "word" and token.text == "and":
            self.take()
            parts.append(self.parse_not())
        if len(parts) == 1:
            return parts[0]
        return lambda obj: all(part(obj) for part in parts)

    def parse_not(self) -> Matcher:
        token = self.peek()
        if token is not None and token.kind == "word" and token.text == "not":
            self.take()
            inner = self.parse_not()
            return lambda obj: not inner(obj)
        return self.parse_primary()

    def parse_primary(self) -> Matcher:
        token = self.take()
        if token.kind == "lparen":
            inner = self.parse_or()
            if self.take().kind != "rparen":
                raise self.fail(f"missing ')' in {self.expression!r}")
            return inner
        if token.kind != "word":
            raise self.fail(f"expected a selector, found {token.text!r}")
        selector = token.text.split(".")
        operator = self.take()
        if operator.kind != "op":
            raise self.fail(f"unsupported operator {operator.text!r} (supported: == and !=)")
        literal = self.take()
        value = _literal(literal, self)
        equal = operator.text == "=="
        return lambda obj: _compare(_select(obj, selector), value) == equal


def _literal(token: _Token, parser: _FilterParser) -> str:
    if token.kind == "string":
        if token.text.startswith("`"):
            return token.text[1:-1]
        decoded: str = json.loads(token.text)
        return decoded
    if token.kind in ("number", "word"):
        return token.text
    raise parser.fail(f"expected a value, found {token.text!r}")


def _select(obj: Any, selector: Sequence[str]) -> Any:
    current = obj
    for part in selector:
        if isinstance(current, dict):
            current = current.get(part)
        else:
            return None
    return current


def _compare(actual: Any, literal: str) -> bool:
    """go-bexpr converts the literal to the field's type before comparing."""
    if isinstance(actual, bool):
        return parse_go_bool(literal) is actual
    if isinstance(actual, int | float):
        try:
            return float(literal) == float(actual)
        except ValueError:
            return False
    if actual is None:
        return literal == ""
    return str(actual) == literal


def compile_filter(expression: str) -> Matcher:
    return _FilterParser(expression).parse()


# -- errors ---------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as Nomad sends it: text/plain (or the error's JSON) with its status."""
    try:
        return await handler(request)
    except NomadHTTPError as exc:
        headers = dict(query_meta_headers(request.app[STATE_KEY].index))
        if exc.body is not None:
            return web.Response(
                text=json.dumps(exc.body, separators=(",", ":")),
                status=exc.status,
                content_type="application/json",
                headers=headers,
            )
        return web.Response(
            text=exc.text, status=exc.status, content_type="text/plain", headers=headers
        )
    except web.HTTPMethodNotAllowed:
        return web.Response(text="Invalid method", status=405, content_type="text/plain")
    except web.HTTPNotFound:
        return web.Response(text="404 page not found\n", status=404, content_type="text/plain")
    except (web.HTTPException, ConnectionResetError):
        # A reader that hung up mid-stream: the response is already gone, nothing to answer.
        raise
    except Exception as exc:
        logger.exception("request failed", extra={"path": request.path})
        return web.Response(text=str(exc), status=500, content_type="text/plain")
