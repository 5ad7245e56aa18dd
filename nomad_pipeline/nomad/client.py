"""The only code that speaks Nomad's HTTP API: an async client over one pooled aiohttp session.

Errors are translated once, here: 404 → ``NotFound``, 409 → ``Conflict`` (``VariableConflict``
when Nomad answers a variable check-and-set failure with the current variable as JSON), 400 →
``Invalid``, 403 → ``Forbidden``, connection errors and 502/503/504 → ``NomadUnavailable``, any
other error status → ``NomadError`` with Nomad's text. Idempotent reads are retried briefly on
``NomadUnavailable``; writes never are (the caller decides, using ``cas``/idempotency tokens).

Blocking reads take ``index``/``wait`` and return ``(body, index)`` where ``index`` is the
response's ``X-Nomad-Index``. Bodies are Nomad's wire dicts with PascalCase keys.
"""

from __future__ import annotations

import base64
import codecs
import json
import re
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import quote, urlencode

import aiohttp
import pydantic_core
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)
from yarl import URL

from nomad_pipeline.errors import (
    Conflict,
    Forbidden,
    Invalid,
    NomadError,
    NomadUnavailable,
    NotFound,
)

JSON = dict[str, Any]
QueryParams = list[tuple[str, str]]
LogType = Literal["stdout", "stderr"]
LogOrigin = Literal["start", "end"]

# Nomad's default and maximum blocking wait; the server adds up to wait/16 of jitter.
DEFAULT_BLOCKING_WAIT_SECONDS = 300.0
BLOCKING_GRACE_SECONDS = 15.0
REQUEST_TIMEOUT_SECONDS = 30.0
CONNECT_TIMEOUT_SECONDS = 10.0
# The event stream sends a heartbeat every 30 s and the log stream every 1 s; silence for longer
# than these means the connection is dead even if TCP has not noticed.
EVENT_STREAM_IDLE_SECONDS = 75.0
LOG_STREAM_IDLE_SECONDS = 30.0
# Idempotent reads are retried on NomadUnavailable: a few quick attempts, never long.
READ_RETRY_ATTEMPTS = 4
READ_RETRY_MAX_SECONDS = 5.0

_REQUEST_TIMEOUT = aiohttp.ClientTimeout(
    total=REQUEST_TIMEOUT_SECONDS, connect=CONNECT_TIMEOUT_SECONDS
)
_UNAVAILABLE_STATUSES = frozenset({502, 503, 504})
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


class VariableConflict(Conflict):
    """A variable check-and-set (or lock) conflict; ``current`` is the variable Nomad holds now.

    ``current`` is Nomad's JSON body: the current variable (``Items`` only when readable), or a
    zero-value stub with ``ModifyIndex`` 0 when the variable does not exist. A 409 with a text
    body (``cas error: ...``, lock errors) is a plain ``Conflict``.
    """

    def __init__(self, message: str, *, current: JSON) -> None:
        super().__init__(message)
        self.current = current


def parse_duration(value: str) -> float:
    """Seconds in a Go duration string (``10s``, ``5m``, ``1m30s``, ``250ms``)."""
    text = value.strip()
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise Invalid(f"invalid duration {value!r}: expected a Go duration such as '10s' or '5m'")
    return sum(float(number) * _DURATION_SECONDS[unit] for number, unit in parts)


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _job_path(job_id: str, suffix: str = "") -> str:
    # Dispatched children carry "/" in their IDs; Nomad routes by suffix after decoding %2F.
    return f"/v1/job/{quote(job_id, safe='')}{suffix}"


def _var_path(path: str) -> str:
    return f"/v1/var/{quote(path, safe='/')}"


@dataclass(frozen=True, slots=True)
class _Response:
    body: Any
    index: int
    # X-Nomad-NextToken: set when a paged list has more pages.
    next_token: str = ""


def new_session(connector: aiohttp.BaseConnector | None = None) -> aiohttp.ClientSession:
    """A session for Nomad requests. Nomad sets no cookies, and the default cookie jar's
    per-request bookkeeping is a measurable share of a request's CPU time."""
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())


class NomadClient:
    """Async Nomad HTTP client. Use as ``async with NomadClient(addr) as nomad:`` or ``close()``.

    Pass ``session`` to share a pooled session (the caller then owns and closes it).
    """

    def __init__(
        self,
        address: str,
        token: str | None = None,
        *,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        base = URL(address.rstrip("/"))
        if base.scheme not in ("http", "https") or not base.host:
            raise Invalid(f"Nomad address {address!r} must be an http:// or https:// URL")
        self.address = str(base)
        self._headers = {"X-Nomad-Token": token} if token else {}
        self._session = session
        self._owns_session = session is None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    def _http(self) -> aiohttp.ClientSession:
        # Created on first use so the session binds to the running loop, not the constructor's.
        if self._session is None:
            self._session = new_session()
            self._owns_session = True
        return self._session

    def _url(self, path: str, params: QueryParams) -> URL:
        # The path is already percent-encoded (job IDs carry %2F); building the query here
        # skips yarl's per-parameter processing, a measurable cost at thousands of reads.
        query = urlencode(params, quote_via=quote) if params else ""
        return URL(
            f"{self.address}{path}?{query}" if query else f"{self.address}{path}", encoded=True
        )

    # ---- plumbing --------------------------------------------------------------------------

    async def _send(
        self,
        method: str,
        path: str,
        *,
        params: QueryParams,
        body: Any = None,
        data: bytes | None = None,
        client_timeout: aiohttp.ClientTimeout,
        raw: bool = False,
    ) -> _Response:
        headers = self._headers
        if body is not None:
            # pydantic-core's serialiser is several times faster than aiohttp's json.dumps.
            data = pydantic_core.to_json(body)
            headers = {**headers, "Content-Type": "application/json"}
        try:
            async with self._http().request(
                method,
                self._url(path, params),
                data=data,
                timeout=client_timeout,
                headers=headers,
            ) as response:
                if response.status >= 400:
                    await _raise_for_status(response, method, path)
                index = int(response.headers.get("X-Nomad-Index", "0") or 0)
                next_token = response.headers.get("X-Nomad-NextToken", "")
                payload = await response.read()
        except (aiohttp.ClientConnectionError, TimeoutError) as error:
            raise NomadUnavailable(
                f"{method} {path}: Nomad at {self.address} is unreachable: {error or 'timeout'}"
            ) from error
        if raw:
            return _Response(payload, index, next_token)
        # pydantic-core's parser (jiter) decodes Nomad's large objects in about half the time.
        body_value = pydantic_core.from_json(payload) if payload.strip() else None
        return _Response(body_value, index, next_token)

    async def _read(
        self,
        path: str,
        *,
        namespace: str | None,
        params: QueryParams | None = None,
        index: int = 0,
        wait: str | None = None,
        raw: bool = False,
    ) -> _Response:
        query = list(params or [])
        if namespace is not None:
            query.append(("namespace", namespace))
        timeout_seconds = REQUEST_TIMEOUT_SECONDS
        if index > 0:
            query.append(("index", str(index)))
            wait_seconds = DEFAULT_BLOCKING_WAIT_SECONDS
            if wait is not None:
                wait_seconds = parse_duration(wait)
                query.append(("wait", wait))
            timeout_seconds = wait_seconds * 17 / 16 + BLOCKING_GRACE_SECONDS
        elif wait is not None:
            query.append(("wait", wait))
        timeout = (
            _REQUEST_TIMEOUT
            if timeout_seconds == REQUEST_TIMEOUT_SECONDS
            else aiohttp.ClientTimeout(total=timeout_seconds, connect=CONNECT_TIMEOUT_SECONDS)
        )
        try:
            return await self._send("GET", path, params=query, client_timeout=timeout, raw=raw)
        except NomadUnavailable:
            # Only a failed first attempt builds the retry machinery (it costs ~0.2 ms a call,
            # as much as the request itself when the cache is filled with 10,000 reads).
            pass
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(NomadUnavailable),
            stop=stop_after_attempt(READ_RETRY_ATTEMPTS - 1)
            | stop_after_delay(READ_RETRY_MAX_SECONDS),
            wait=wait_exponential(multiplier=0.05, max=1.0),
            reraise=True,
        ):
            with attempt:
                return await self._send("GET", path, params=query, client_timeout=timeout, raw=raw)
        raise AssertionError("tenacity returns or re-raises")  # pragma: no cover

    async def _write(
        self,
        method: Literal["PUT", "POST", "DELETE"],
        path: str,
        *,
        namespace: str | None,
        params: QueryParams | None = None,
        body: Any = None,
        data: bytes | None = None,
    ) -> _Response:
        query = list(params or [])
        if namespace is not None:
            query.append(("namespace", namespace))
        return await self._send(
            method, path, params=query, body=body, data=data, client_timeout=_REQUEST_TIMEOUT
        )

    async def _open_stream(
        self, path: str, params: QueryParams, idle_seconds: float
    ) -> aiohttp.ClientResponse:
        timeout = aiohttp.ClientTimeout(
            total=None, connect=CONNECT_TIMEOUT_SECONDS, sock_read=idle_seconds
        )
        try:
            response = await self._http().get(
                self._url(path, params), timeout=timeout, headers=self._headers
            )
        except (aiohttp.ClientConnectionError, TimeoutError) as error:
            raise NomadUnavailable(
                f"GET {path}: Nomad at {self.address} is unreachable: {error or 'timeout'}"
            ) from error
        if response.status >= 400:
            try:
                await _raise_for_status(response, "GET", path)
            finally:
                response.release()
        return response

    # ---- cluster ---------------------------------------------------------------------------

    async def status_leader(self) -> str:
        """The leader's RPC address, ``""`` when there is none (the liveness probe)."""
        response = await self._read("/v1/status/leader", namespace=None)
        return str(response.body or "")

    async def agent_self(self) -> JSON:
        response = await self._read("/v1/agent/self", namespace=None)
        return dict(response.body)

    # ---- namespaces ------------------------------------------------------------------------

    async def list_namespaces(
        self, prefix: str = "", *, index: int = 0, wait: str | None = None
    ) -> tuple[list[JSON], int]:
        response = await self._read(
            "/v1/namespaces", namespace=None, params=[("prefix", prefix)], index=index, wait=wait
        )
        return list(response.body or []), response.index

    async def get_namespace(self, name: str) -> JSON:
        response = await self._read(f"/v1/namespace/{quote(name, safe='')}", namespace=None)
        return dict(response.body)

    async def upsert_namespace(
        self,
        name: str,
        *,
        description: str = "",
        meta: Mapping[str, str] | None = None,
        capabilities: JSON | None = None,
    ) -> int:
        """Create or update a namespace; returns the write's index."""
        body: JSON = {"Name": name, "Description": description, "Meta": dict(meta or {})}
        if capabilities is not None:
            body["Capabilities"] = capabilities
        response = await self._write(
            "PUT", f"/v1/namespace/{quote(name, safe='')}", namespace=None, body=body
        )
        return response.index

    async def delete_namespace(self, name: str) -> int:
        response = await self._write(
            "DELETE", f"/v1/namespace/{quote(name, safe='')}", namespace=None
        )
        return response.index

    # ---- variables -------------------------------------------------------------------------

    async def get_variable(self, path: str, *, namespace: str = "default") -> JSON:
        """The variable with its ``Items`` and indexes; ``NotFound`` when absent."""
        response = await self._read(_var_path(path), namespace=namespace)
        return dict(response.body)

    async def put_variable(
        self,
        path: str,
        items: Mapping[str, str],
        *,
        namespace: str = "default",
        cas: int | None = None,
        lock_id: str | None = None,
    ) -> JSON:
        """Write ``items``; ``cas=0`` creates only if absent, ``cas=N`` needs ModifyIndex N.

        Returns the stored variable with its new ``ModifyIndex``. A failed check-and-set raises
        ``VariableConflict`` carrying the current variable. A locked variable is written only
        with its lock's ``lock_id``.
        """
        params: QueryParams = [] if cas is None else [("cas", str(cas))]
        body: JSON = {"Namespace": namespace, "Path": path, "Items": dict(items)}
        if lock_id is not None:
            body["Lock"] = {"ID": lock_id}
        response = await self._write(
            "PUT", _var_path(path), namespace=namespace, params=params, body=body
        )
        return dict(response.body)

    async def delete_variable(
        self, path: str, *, namespace: str = "default", cas: int | None = None
    ) -> int:
        """Delete (idempotent without ``cas``); returns the index of the delete."""
        params: QueryParams = [] if cas is None else [("cas", str(cas))]
        response = await self._write("DELETE", _var_path(path), namespace=namespace, params=params)
        return response.index

    async def list_variables(
        self,
        prefix: str = "",
        *,
        namespace: str = "default",
        index: int = 0,
        wait: str | None = None,
        per_page: int = 0,
        next_token: str = "",
    ) -> tuple[list[JSON], int]:
        """Metadata of every variable under ``prefix`` (all pages), and the list's index.

        With ``per_page`` the pages are fetched one after another from ``next_token``; only the
        first page blocks on ``index``.
        """
        metadata: list[JSON] = []
        token = next_token
        list_index: int | None = None
        while True:
            params: QueryParams = [("prefix", prefix)]
            if per_page:
                params.append(("per_page", str(per_page)))
            if token:
                params.append(("next_token", token))
            first_page = list_index is None
            response = await self._read(
                "/v1/vars",
                namespace=namespace,
                params=params,
                index=index if first_page else 0,
                wait=wait if first_page else None,
            )
            if list_index is None:
                list_index = response.index
            metadata.extend(response.body or [])
            token = response.next_token
            if not per_page or not token:
                return metadata, list_index

    async def lock_acquire(
        self,
        path: str,
        *,
        namespace: str = "default",
        ttl: str = "15s",
        lock_delay: str = "15s",
        items: Mapping[str, str] | None = None,
    ) -> JSON:
        """Acquire the variable's lock (creating it if absent); the result's ``Lock.ID`` renews.

        ``items`` replace the stored ones (Nomad's behaviour), so pass the current ones to keep
        them. A held lock raises ``VariableConflict``.
        """
        body: JSON = {
            "Namespace": namespace,
            "Path": path,
            "Lock": {"TTL": ttl, "LockDelay": lock_delay},
        }
        if items is not None:
            body["Items"] = dict(items)
        response = await self._write(
            "PUT", _var_path(path), namespace=namespace, params=[("lock-acquire", "")], body=body
        )
        return dict(response.body)

    async def lock_renew(self, path: str, lock_id: str, *, namespace: str = "default") -> JSON:
        body = {"Namespace": namespace, "Path": path, "Lock": {"ID": lock_id}}
        response = await self._write(
            "PUT", _var_path(path), namespace=namespace, params=[("lock-renew", "")], body=body
        )
        return dict(response.body)

    async def lock_release(self, path: str, lock_id: str, *, namespace: str = "default") -> JSON:
        body = {"Namespace": namespace, "Path": path, "Lock": {"ID": lock_id}}
        response = await self._write(
            "PUT", _var_path(path), namespace=namespace, params=[("lock-release", "")], body=body
        )
        return dict(response.body)

    # ---- jobs ------------------------------------------------------------------------------

    async def parse_job(
        self,
        hcl: str,
        variables: str = "",
        canonicalize: bool = True,
        *,
        namespace: str = "default",
    ) -> JSON:
        """HCL jobspec → JSON job (Nomad's ``jobs/parse``); ``variables`` is var-file text."""
        body = {"JobHCL": hcl, "Canonicalize": canonicalize, "Variables": variables}
        response = await self._write("POST", "/v1/jobs/parse", namespace=namespace, body=body)
        return dict(response.body)

    async def register_job(
        self,
        job: JSON,
        *,
        namespace: str = "default",
        enforce_index: bool = False,
        job_modify_index: int = 0,
    ) -> JSON:
        """Register or update ``job`` (a JSON job, not wrapped); returns EvalID/JobModifyIndex."""
        body = {"Job": job, "EnforceIndex": enforce_index, "JobModifyIndex": job_modify_index}
        response = await self._write("POST", "/v1/jobs", namespace=namespace, body=body)
        return dict(response.body)

    async def get_job(
        self,
        job_id: str,
        *,
        namespace: str = "default",
        index: int = 0,
        wait: str | None = None,
    ) -> tuple[JSON, int]:
        response = await self._read(_job_path(job_id), namespace=namespace, index=index, wait=wait)
        return dict(response.body), response.index

    async def list_jobs(
        self,
        prefix: str = "",
        *,
        namespace: str = "default",
        filter_expression: str | None = None,
        index: int = 0,
        wait: str | None = None,
    ) -> tuple[list[JSON], int]:
        params: QueryParams = [("prefix", prefix)]
        if filter_expression:
            params.append(("filter", filter_expression))
        response = await self._read(
            "/v1/jobs", namespace=namespace, params=params, index=index, wait=wait
        )
        return list(response.body or []), response.index

    async def deregister_job(
        self, job_id: str, *, namespace: str = "default", purge: bool = False
    ) -> JSON:
        """Stop (or stop and purge) a job; idempotent: a missing job answers an empty EvalID."""
        response = await self._write(
            "DELETE", _job_path(job_id), namespace=namespace, params=[("purge", _bool(purge))]
        )
        return dict(response.body or {})

    async def job_allocations(
        self,
        job_id: str,
        *,
        namespace: str = "default",
        include_purged: bool = False,
        index: int = 0,
        wait: str | None = None,
    ) -> tuple[list[JSON], int]:
        """Allocation stubs of every version; ``include_purged`` adds earlier instances (all)."""
        response = await self._read(
            _job_path(job_id, "/allocations"),
            namespace=namespace,
            params=[("all", _bool(include_purged))],
            index=index,
            wait=wait,
        )
        return list(response.body or []), response.index

    async def job_evaluations(
        self,
        job_id: str,
        *,
        namespace: str = "default",
        index: int = 0,
        wait: str | None = None,
    ) -> tuple[list[JSON], int]:
        response = await self._read(
            _job_path(job_id, "/evaluations"), namespace=namespace, index=index, wait=wait
        )
        return list(response.body or []), response.index

    async def dispatch_job(
        self,
        job_id: str,
        *,
        namespace: str = "default",
        meta: Mapping[str, str] | None = None,
        payload: bytes | None = None,
        idempotency_token: str | None = None,
    ) -> JSON:
        """Dispatch a parameterized job; returns ``DispatchedJobID``, ``EvalID``...

        The idempotency token goes in the query string: Nomad ignores it in the body.
        """
        body: JSON = {"Meta": dict(meta or {})}
        if payload is not None:
            body["Payload"] = base64.b64encode(payload).decode("ascii")
        params: QueryParams = []
        if idempotency_token:
            params.append(("idempotency_token", idempotency_token))
        response = await self._write(
            "POST",
            _job_path(job_id, "/dispatch"),
            namespace=namespace,
            params=params,
            body=body,
        )
        return dict(response.body)

    # ---- allocations and evaluations -------------------------------------------------------

    async def get_allocation(
        self,
        alloc_id: str,
        *,
        namespace: str = "default",
        index: int = 0,
        wait: str | None = None,
    ) -> tuple[JSON, int]:
        response = await self._read(
            f"/v1/allocation/{quote(alloc_id, safe='')}",
            namespace=namespace,
            index=index,
            wait=wait,
        )
        return dict(response.body), response.index

    async def get_evaluation(
        self,
        eval_id: str,
        *,
        namespace: str = "default",
        index: int = 0,
        wait: str | None = None,
    ) -> tuple[JSON, int]:
        response = await self._read(
            f"/v1/evaluation/{quote(eval_id, safe='')}",
            namespace=namespace,
            index=index,
            wait=wait,
        )
        return dict(response.body), response.index

    async def read_file(self, alloc_id: str, path: str, *, namespace: str = "default") -> bytes:
        """A file of the allocation directory (``alloc/data/out.json``), as raw bytes."""
        response = await self._read(
            f"/v1/client/fs/cat/{quote(alloc_id, safe='')}",
            namespace=namespace,
            params=[("path", path)],
            raw=True,
        )
        body: bytes = response.body
        return body

    async def list_files(
        self, alloc_id: str, path: str, *, namespace: str = "default"
    ) -> list[JSON]:
        """The entries of a directory of the allocation (``alloc/logs``): ``Name``, ``IsDir``,
        ``Size``, ``FileMode``, ``ModTime``."""
        response = await self._read(
            f"/v1/client/fs/ls/{quote(alloc_id, safe='')}",
            namespace=namespace,
            params=[("path", path)],
        )
        return [dict(entry) for entry in response.body or []]

    # ---- streams ---------------------------------------------------------------------------

    async def event_stream(
        self,
        topics: Sequence[str],
        *,
        index: int = 0,
        namespace: str = "*",
        idle_timeout: float = EVENT_STREAM_IDLE_SECONDS,
    ) -> AsyncGenerator[JSON, None]:
        """``{"Index", "Events"}`` batches after ``index``; heartbeats are dropped.

        ``topics`` are ``Topic`` or ``Topic:FilterKey``. The stream never ends on its own: a
        disconnect or silence beyond ``idle_timeout`` raises ``NomadUnavailable``, and the
        caller resumes with ``index`` = the last batch's ``Index``.
        """
        params: QueryParams = [("topic", topic) for topic in topics]
        params += [("index", str(index)), ("namespace", namespace)]
        response = await self._open_stream("/v1/event/stream", params, idle_timeout)
        buffer = b""
        try:
            async for chunk in response.content.iter_any():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    try:
                        # Allocation events carry whole allocations (with their job): decoding
                        # them is the stream's main cost, and jiter halves it.
                        batch = pydantic_core.from_json(line)
                    except ValueError as error:
                        # A garbled line means a broken connection as far as we can tell:
                        # the caller reconnects and resumes by index.
                        raise NomadUnavailable(
                            f"event stream from {self.address} sent malformed JSON: {error}"
                        ) from error
                    if batch:
                        yield batch
        except (aiohttp.ClientError, TimeoutError) as error:
            raise NomadUnavailable(
                f"event stream from {self.address} broke: {error or 'idle timeout'}"
            ) from error
        finally:
            response.release()
        raise NomadUnavailable(f"event stream from {self.address} closed; resume by index")

    async def stream_logs(
        self,
        alloc_id: str,
        task: str,
        log_type: LogType,
        *,
        namespace: str = "default",
        offset: int = 0,
        origin: LogOrigin = "start",
        follow: bool = True,
        idle_timeout: float = LOG_STREAM_IDLE_SECONDS,
    ) -> AsyncGenerator[bytes, None]:
        """A task's stdout/stderr as byte chunks (Nomad's framed format, heartbeats dropped).

        With ``follow`` the stream does not end when the task does (Nomad's behaviour): the
        caller closes it once the allocation is terminal. Without it, it ends at the current EOF.
        """
        params: QueryParams = [
            ("task", task),
            ("type", log_type),
            ("offset", str(offset)),
            ("origin", origin),
            ("follow", _bool(follow)),
            ("plain", "false"),
            ("namespace", namespace),
        ]
        response = await self._open_stream(
            f"/v1/client/fs/logs/{quote(alloc_id, safe='')}", params, idle_timeout
        )
        frames = _FrameDecoder()
        try:
            async for chunk in response.content.iter_any():
                for data in frames.feed(chunk):
                    yield data
        except (aiohttp.ClientError, TimeoutError) as error:
            raise NomadUnavailable(
                f"log stream of allocation {alloc_id} task {task} broke: {error or 'idle timeout'}"
            ) from error
        finally:
            response.release()


class _FrameDecoder:
    """Nomad's stream frames: concatenated JSON objects, no separator, base64 ``Data``."""

    def __init__(self) -> None:
        self._text = codecs.getincrementaldecoder("utf-8")()
        self._buffer = ""
        self._json = json.JSONDecoder()

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buffer += self._text.decode(chunk)
        out: list[bytes] = []
        position = 0
        length = len(self._buffer)
        while True:
            while position < length and self._buffer[position].isspace():
                position += 1
            if position >= length:
                break
            try:
                frame, position = self._json.raw_decode(self._buffer, position)
            except json.JSONDecodeError:
                # An incomplete frame: wait for the rest of it.
                break
            data = frame.get("Data") if isinstance(frame, dict) else None
            if data:
                out.append(base64.b64decode(data))
        self._buffer = self._buffer[position:]
        return out


async def _raise_for_status(response: aiohttp.ClientResponse, method: str, path: str) -> None:
    status = response.status
    text = (await response.text(errors="replace")).strip()
    detail = text or response.reason or f"HTTP {status}"
    message = f"Nomad {method} {path}: {detail}"
    if status == 409:
        try:
            current = json.loads(text) if text.startswith("{") else None
        except json.JSONDecodeError:
            current = None
        if isinstance(current, dict):
            raise VariableConflict(
                f"Nomad {method} {path}: check-and-set conflict, the variable's current "
                f"ModifyIndex is {current.get('ModifyIndex', 0)}",
                current=current,
            )
        raise Conflict(message)
    if status == 404:
        raise NotFound(message)
    if status == 400:
        raise Invalid(message)
    if status == 403:
        raise Forbidden(message)
    if status in _UNAVAILABLE_STATUSES:
        raise NomadUnavailable(message)
    raise NomadError(message, status=status)


__all__ = [
    "JSON",
    "LogOrigin",
    "LogType",
    "NomadClient",
    "VariableConflict",
    "new_session",
    "parse_duration",
]
