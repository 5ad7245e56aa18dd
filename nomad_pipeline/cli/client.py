"""The CLI's HTTP client for the controller API (aiohttp; one session per command).

Server errors arrive as ``{"error": {"code", "reason", "message", "field"}}`` and are raised as
our own error classes (by status) carrying the server's reason, so commands can catch
``NotFound`` and ``main`` prints ``error: <reason>: <message>``.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import aiohttp

from nomad_pipeline.cli.output import dig
from nomad_pipeline.errors import (
    Conflict,
    Gone,
    Invalid,
    NomadPipelineError,
    NotFound,
    TooLarge,
    Unauthorized,
)
from nomad_pipeline.resources.names import API_VERSION

NATIVE_PREFIX = f"/apis/{API_VERSION}"

_ERRORS_BY_STATUS: dict[int, type[NomadPipelineError]] = {
    400: Invalid,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    410: Gone,
    413: TooLarge,
}
# Plain requests should answer quickly; streams (watch, logs) run as long as the user wants.
_REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=60, sock_connect=10)
_STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None)


class ControllerUnreachableError(NomadPipelineError):
    """The controller's address does not answer (nothing listening, DNS, TLS...)."""

    http_status = 503
    reason = "Unavailable"


class ApiClient:
    """Async client of one controller address; use as ``async with ApiClient(addr) as api``."""

    def __init__(self, addr: str) -> None:
        self.addr = addr.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("ApiClient used outside 'async with'")
        return self._session

    # --- plumbing ---------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: object = None,
    ) -> Any:
        """One JSON request; the decoded body (None for an empty one) or a raised error."""
        try:
            async with self.session.request(
                method,
                self.addr + path,
                params=params,
                json=body,
                timeout=_REQUEST_TIMEOUT,
            ) as response:
                text = await response.text()
                if response.status >= 400:
                    raise _error_from_response(method, path, response.status, text)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._unreachable(exc) from exc
        if not text.strip():
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise NomadPipelineError(
                f"{method} {path}: the controller answered with invalid JSON: {exc}"
            ) from exc

    async def stream(
        self, method: str, path: str, *, params: Mapping[str, str] | None = None
    ) -> AsyncIterator[bytes]:
        """The response body chunk by chunk, as the server flushes it."""
        try:
            async with self.session.request(
                method, self.addr + path, params=params, timeout=_STREAM_TIMEOUT
            ) as response:
                if response.status >= 400:
                    text = await response.text()
                    raise _error_from_response(method, path, response.status, text)
                async for chunk in response.content.iter_any():
                    yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._unreachable(exc) from exc

    async def stream_lines(
        self, path: str, *, params: Mapping[str, str] | None = None
    ) -> AsyncIterator[bytes]:
        """Complete lines (without the newline) of a streamed GET; a trailing partial line too."""
        pending = b""
        async for chunk in self.stream("GET", path, params=params):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line
        if pending:
            yield pending

    def _unreachable(self, exc: aiohttp.ClientError | TimeoutError) -> ControllerUnreachableError:
        """One clear sentence for every way of not getting an answer from the address."""
        if isinstance(exc, TimeoutError):
            return ControllerUnreachableError(
                f"the controller at {self.addr} did not answer in time"
            )
        if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
            return ControllerUnreachableError(
                f"the controller at {self.addr} closed the connection"
            )
        if isinstance(exc, aiohttp.InvalidURL):
            return ControllerUnreachableError(f"{self.addr} is not a usable controller address")
        os_error = getattr(exc, "os_error", None)
        if isinstance(os_error, OSError) and os_error.errno:
            # "connection refused" rather than asyncio's "Connect call failed (...)".
            detail = os.strerror(os_error.errno).lower()
        else:
            detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return ControllerUnreachableError(
            f"cannot connect to the controller at {self.addr} ({detail}); "
            "is `nomad-pipeline server` running? (set --addr or NOMAD_PIPELINE_ADDR)"
        )

    # --- native resource API ------------------------------------------------------------------

    @staticmethod
    def resource_path(plural: str, namespace: str | None, name: str | None = None) -> str:
        """``namespace=None`` addresses every namespace (and cluster-scoped kinds)."""
        path = NATIVE_PREFIX
        if namespace is not None:
            path += f"/namespaces/{quote(namespace, safe='')}"
        path += f"/{plural}"
        if name is not None:
            path += f"/{quote(name, safe='')}"
        return path

    async def list_objects(
        self, plural: str, namespace: str | None, *, selector: str | None = None
    ) -> tuple[list[dict[str, Any]], str]:
        """The items and the list's resource version (to start a watch from)."""
        params = {"labelSelector": selector} if selector else None
        body = await self.request("GET", self.resource_path(plural, namespace), params=params)
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise NomadPipelineError(f"the list of {plural} from the controller has no items")
        version = str(dig(body, "metadata", "resource_version") or "0")
        return items, version

    async def get_object(self, plural: str, namespace: str | None, name: str) -> dict[str, Any]:
        body = await self.request("GET", self.resource_path(plural, namespace, name))
        if not isinstance(body, dict):
            raise NomadPipelineError(f"the controller answered {body!r} for {plural}/{name}")
        return body

    async def delete_object(self, plural: str, namespace: str | None, name: str) -> dict[str, Any]:
        """The deleted object, or the object marked for deletion (``metadata.deletion_timestamp``
        set) while finalizers hold it (the server answers 202 then)."""
        body = await self.request("DELETE", self.resource_path(plural, namespace, name))
        if not isinstance(body, dict):
            raise NomadPipelineError(f"the controller answered {body!r} deleting {plural}/{name}")
        return body

    async def apply(
        self, items: Sequence[Mapping[str, Any]], *, dry_run: bool
    ) -> list[dict[str, Any]]:
        body = await self.request(
            "PUT",
            f"{NATIVE_PREFIX}/apply",
            params={"dry_run": "true" if dry_run else "false"},
            body={"items": list(items)},
        )
        results = body.get("results") if isinstance(body, dict) else None
        if not isinstance(results, list):
            raise NomadPipelineError("the controller's apply answer has no results")
        return results

    async def watch(
        self,
        plural: str,
        namespace: str | None,
        *,
        resource_version: str | None,
        selector: str | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Watch events ``{"type", "object"}``; without a version the server starts with ADDED
        events for what exists. An ``ERROR`` event with code 410 is raised as ``Gone``."""
        params = {"watch": "true"}
        if resource_version is not None:
            params["resource_version"] = resource_version
        if selector:
            params["labelSelector"] = selector
        async for line in self.stream_lines(self.resource_path(plural, namespace), params=params):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError as exc:
                raise NomadPipelineError(
                    f"malformed watch event from the controller: {exc}"
                ) from exc
            if not isinstance(event, dict):
                raise NomadPipelineError(f"malformed watch event from the controller: {event!r}")
            if event.get("type") == "ERROR":
                raise _error_from_body(event.get("object"), default_status=500)
            yield event

    async def object_updates(
        self, plural: str, namespace: str | None, name: str, *, resource_version: str | None
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Each new state of one object, written after ``resource_version``, for as long as the
        caller reads. Past an expired version it resumes from the current state (which may
        repeat one); the object's deletion is raised as ``NotFound``."""
        version = resource_version
        while True:
            try:
                async for event in self.watch(plural, namespace, resource_version=version):
                    obj = event.get("object")
                    if not isinstance(obj, dict) or dig(obj, "metadata", "name") != name:
                        continue
                    version = str(dig(obj, "metadata", "resource_version") or version)
                    if event.get("type") == "DELETED":
                        raise NotFound(f"{plural} {namespace}/{name} was deleted while waiting")
                    yield obj
            except Gone:
                # Without a version the server starts with the current state of every object.
                version = None

    # --- runs (seed v1 routes) ----------------------------------------------------------------

    async def start_run(self, namespace: str, flow: str, variables: Mapping[str, str]) -> str:
        body = await self.request(
            "POST",
            f"/v1/flows/{quote(flow, safe='')}/run",
            params={"namespace": namespace},
            body={"variables": dict(variables)},
        )
        return _run_id(body, f"running flow {flow}")

    async def rerun(self, namespace: str, run: str, *, from_failed: bool) -> str:
        body = await self.request(
            "POST",
            f"/v1/runs/{quote(run, safe='')}/rerun",
            params={"namespace": namespace, "from_failed": "true" if from_failed else "false"},
        )
        return _run_id(body, f"rerunning {run}")

    async def cancel_run(self, namespace: str, run: str) -> None:
        await self.request(
            "PUT", f"/v1/runs/{quote(run, safe='')}/cancel", params={"namespace": namespace}
        )

    async def request_sync(self, namespace: str, repository: str) -> str:
        """Ask for an immediate GitOps sync; returns the request's mark, which the repository's
        ``status.last_handled_reconcile_at`` shows once a sync answered it."""
        body = await self.request(
            "POST",
            f"/v1/gitrepositories/{quote(repository, safe='')}/sync",
            params={"namespace": namespace},
        )
        requested_at = dig(body, "requested_at")
        if not isinstance(requested_at, str) or not requested_at:
            raise NomadPipelineError(f"the controller's sync answer has no requested_at: {body!r}")
        return requested_at

    async def step_log_lines(
        self, namespace: str, run: str, step: str, stream: str, *, follow: bool
    ) -> AsyncIterator[str]:
        """One step's log lines. With ``follow`` the server streams the plain log until the step
        ends; without, it answers JSON lines ``{"run_id", "step_id", "type", "line"}``."""
        params = {
            "namespace": namespace,
            "step_id": step,
            "type": stream,
            "tail": "true" if follow else "false",
        }
        path = f"/v1/runs/{quote(run, safe='')}/logs"
        async for raw in self.stream_lines(path, params=params):
            if follow:
                yield raw.decode("utf-8", errors="replace")
                continue
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise NomadPipelineError(f"malformed log line from the controller: {exc}") from exc
            yield str(dig(record, "line") or "")


def _run_id(body: object, doing: str) -> str:
    run_id = dig(body, "run_id")
    if not isinstance(run_id, str) or not run_id:
        raise NomadPipelineError(f"{doing}: the controller's answer has no run_id: {body!r}")
    return run_id


def _error_from_body(error: object, *, default_status: int) -> NomadPipelineError:
    """Our error class for ``{"code", "reason", "message", "field"}`` keeping the server reason."""
    fields = error if isinstance(error, dict) else {}
    code = fields.get("code")
    status = code if isinstance(code, int) else default_status
    message = str(fields.get("message") or "the controller reported an error")
    field = fields.get("field")
    error_class = _ERRORS_BY_STATUS.get(status, NomadPipelineError)
    exc = error_class(message, field=field if isinstance(field, str) else None)
    reason = fields.get("reason")
    if isinstance(reason, str) and reason:
        exc.reason = reason
    exc.http_status = status
    return exc


def _error_from_response(method: str, path: str, status: int, text: str) -> NomadPipelineError:
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return _error_from_body(body["error"], default_status=status)
    # Not our error shape: the route does not exist on this server, or a proxy answered.
    detail = text.strip().splitlines()[0] if text.strip() else f"HTTP {status}"
    error_class = _ERRORS_BY_STATUS.get(status, NomadPipelineError)
    exc = error_class(f"{method} {path}: {detail} (HTTP {status})")
    exc.http_status = status
    return exc
