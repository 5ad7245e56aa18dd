"""The dev agent's ACL mode: one management token guards every endpoint but status and health.

Real Nomad has policies, roles and many tokens; the dev agent knows exactly one secret (the
``--acl-token``), which acts as the bootstrap management token. Without it, a request is the
anonymous token, which has no policy: 403 ``Permission denied``. Any other secret is unknown:
403 ``ACL token not found``.
"""

from __future__ import annotations

import hmac

from aiohttp import web
from aiohttp.typedefs import Middleware

from nomad_pipeline.devagent.http import Handler

# Nomad answers these without any token (liveness probes must work before a token exists).
_OPEN_PREFIXES = ("/v1/status/",)
_OPEN_PATHS = frozenset({"/v1/agent/health"})


def request_token(request: web.Request) -> str:
    """The caller's secret: ``X-Nomad-Token`` wins over ``Authorization: Bearer``."""
    token = request.headers.get("X-Nomad-Token", "")
    if token:
        return token
    authorization = request.headers.get("Authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer":
        return credentials.strip()
    return ""


def acl_middleware(management_token: str) -> Middleware:
    """A middleware that lets through only requests carrying ``management_token``."""

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path in _OPEN_PATHS or path.startswith(_OPEN_PREFIXES):
            return await handler(request)
        token = request_token(request)
        if not token:
            return _forbidden("Permission denied")
        if not hmac.compare_digest(token.encode(), management_token.encode()):
            return _forbidden("ACL token not found")
        return await handler(request)

    return check_token


def _forbidden(text: str) -> web.Response:
    return web.Response(text=text, status=403, content_type="text/plain")
