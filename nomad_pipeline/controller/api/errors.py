"""One place that turns failures into HTTP answers, and strict reading of request bodies.

Every error leaves the API as ``{"error": {"code", "reason", "message", "field"}}`` with the
error's status; a superset of the seed's ``{"error": {"message", "code"}}``, so its clients keep
reading what they expect.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from nomad_pipeline.errors import Invalid, NomadPipelineError

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# aiohttp's own HTTP errors (unknown route, wrong method, body too large) keep their status and
# get a reason in our vocabulary.
_HTTP_REASONS = {
    400: "Invalid",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    413: "TooLarge",
    415: "UnsupportedMediaType",
}


def error_response(status: int, body: dict[str, object]) -> web.Response:
    return web.json_response({"error": body}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except NomadPipelineError as error:
        return error_response(error.http_status, error.to_dict())
    except web.HTTPException as http_error:
        if http_error.status < 400:
            raise
        reason = _HTTP_REASONS.get(http_error.status, http_error.reason.replace(" ", ""))
        message = http_error.text or http_error.reason
        if http_error.status == 404:
            message = f"no route for {request.method} {request.path}"
        elif http_error.status == 405:
            message = f"method {request.method} is not allowed on {request.path}"
        response = error_response(
            http_error.status, {"code": http_error.status, "reason": reason, "message": message}
        )
        allow = http_error.headers.get("Allow")
        if allow is not None:
            response.headers["Allow"] = allow
        return response
    except Exception:
        logger.exception(
            "request failed unexpectedly", extra={"method": request.method, "path": request.path}
        )
        return error_response(
            500,
            {"code": 500, "reason": "InternalError", "message": "internal error; see the log"},
        )


async def read_json(request: web.Request) -> Any:
    """The request body as JSON; a missing or malformed body is Invalid with the position."""
    raw = await request.read()
    if not raw.strip():
        raise Invalid("request body is empty; a JSON document is required")
    try:
        return json.loads(raw)
    except UnicodeDecodeError as error:
        raise Invalid(f"request body is not UTF-8: {error}") from None
    except json.JSONDecodeError as error:
        raise Invalid(
            f"request body is not valid JSON: {error.msg} at line {error.lineno} "
            f"column {error.colno}"
        ) from None


async def read_json_object(request: web.Request) -> dict[str, Any]:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise Invalid(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def query_flag(request: web.Request, name: str) -> bool:
    """A boolean query parameter: true/1/yes or false/0/no (absent means false)."""
    value = request.query.get(name)
    if value is None:
        return False
    lowered = value.lower()
    if lowered in ("true", "1", "yes", ""):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise Invalid(f"query parameter {name!r} must be true or false, got {value!r}", field=name)
