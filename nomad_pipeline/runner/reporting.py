"""Talking to the controller: fetching the plan and reporting events in small batches.

Events get increasing sequence numbers as they are emitted, wait in an outbox and go out in
batches (every ``flush_interval`` or as soon as ``batch_bytes`` are pending). A batch that fails
is sent again, unchanged, with exponential backoff until the controller takes it: the controller
ignores sequence numbers it already applied, so a retry never duplicates anything. The outbox
keeps at most ``memory_limit`` bytes in memory; beyond that, events spill, in order, to a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp
from pydantic import ValidationError
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    stop_never,
    wait_exponential,
)

from nomad_pipeline.errors import NomadPipelineError, TerminalError
from nomad_pipeline.runner.protocol import (
    RUNNER_API_PREFIX,
    ReportAck,
    ReportEvent,
    RunnerPlan,
)

logger = logging.getLogger(__name__)

DEFAULT_FLUSH_INTERVAL = 0.1
DEFAULT_BATCH_BYTES = 64 * 1024
DEFAULT_MEMORY_LIMIT = 8 * 1024 * 1024
_REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30, connect=5)
# Statuses worth retrying: the controller is restarting, overloaded or briefly unable to write.
_RETRYABLE_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class ControllerUnreachableError(NomadPipelineError):
    """The controller did not answer, or answered with a status worth retrying."""

    http_status = 503
    reason = "ControllerUnreachableError"


class ControllerClient:
    """The runner's HTTP client for its own run's endpoints (one session, bearer token)."""

    def __init__(self, address: str, namespace: str, run: str, token: str) -> None:
        self._base = f"{address.rstrip('/')}{RUNNER_API_PREFIX}/{namespace}/{run}"
        self._headers = {"Authorization": f"Bearer {token}"}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(timeout=_REQUEST_TIMEOUT, headers=self._headers)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()

    async def fetch_plan(self) -> RunnerPlan:
        body = await self._request("GET", self._base)
        try:
            return RunnerPlan.model_validate(body)
        except ValidationError as error:
            raise TerminalError(
                f"the controller's plan for {self._base} is invalid: {error}"
            ) from None

    async def report(self, body: bytes) -> ReportAck:
        answer = await self._request("POST", f"{self._base}/report", body=body)
        try:
            return ReportAck.model_validate(answer)
        except ValidationError as error:
            raise TerminalError(f"the controller's report answer is invalid: {error}") from None

    async def _request(self, method: str, url: str, *, body: bytes | None = None) -> Any:
        if self._session is None:
            raise RuntimeError("ControllerClient used outside 'async with'")
        headers = {"Content-Type": "application/json"} if body is not None else None
        try:
            async with self._session.request(method, url, data=body, headers=headers) as response:
                text = await response.text()
                if response.status in _RETRYABLE_STATUSES:
                    raise ControllerUnreachableError(f"{method} {url}: {response.status} {text}")
                if response.status >= 400:
                    raise TerminalError(f"{method} {url}: {response.status} {text}")
                try:
                    return json.loads(text)
                except ValueError:
                    raise TerminalError(
                        f"{method} {url}: the controller answered {response.status} with a body "
                        f"that is not JSON: {text[:200]!r}"
                    ) from None
        except (aiohttp.ClientError, TimeoutError) as error:
            raise ControllerUnreachableError(f"{method} {url}: {error!r}") from error


def retrying(max_delay: float | None) -> AsyncRetrying:
    """Retry while the controller is unreachable: 0.1 s doubling to 5 s, for ``max_delay``."""
    return AsyncRetrying(
        retry=retry_if_exception_type(ControllerUnreachableError),
        wait=wait_exponential(multiplier=0.1, max=5),
        stop=stop_never if max_delay is None else stop_after_delay(max_delay),
        reraise=True,
        before_sleep=_log_retry,
    )


def _log_retry(state: Any) -> None:
    logger.warning(
        "controller unreachable, retrying",
        extra={"attempt": state.attempt_number, "error": str(state.outcome.exception())},
    )


class Outbox:
    """Encoded events in emission order: the oldest in memory, the overflow in a spill file."""

    def __init__(self, spill_path: Path, memory_limit: int) -> None:
        self._memory: deque[bytes] = deque()
        self._memory_bytes = 0
        self._memory_limit = memory_limit
        self._spill_path = spill_path
        self._spilled = 0
        self._spill_read_offset = 0
        self._lock = asyncio.Lock()

    def __len__(self) -> int:
        return len(self._memory) + self._spilled

    @property
    def pending_bytes(self) -> int:
        return self._memory_bytes

    @property
    def spilled(self) -> int:
        return self._spilled

    async def put(self, encoded: bytes) -> None:
        async with self._lock:
            # Once anything is spilled, later events follow it to the file to keep the order.
            if self._spilled or self._memory_bytes + len(encoded) > self._memory_limit:
                # The first spilled event starts the file afresh: whatever an earlier runner
                # process left there was numbered for a run attempt that is over.
                await asyncio.to_thread(self._append_spill, encoded, not self._spilled)
                self._spilled += 1
                return
            self._memory.append(encoded)
            self._memory_bytes += len(encoded)

    async def peek(self, max_bytes: int) -> list[bytes]:
        """The oldest events, up to ``max_bytes`` (at least one), without removing them."""
        async with self._lock:
            if not self._memory and self._spilled:
                await self._refill()
            batch: list[bytes] = []
            size = 0
            for encoded in self._memory:
                if batch and size + len(encoded) > max_bytes:
                    break
                batch.append(encoded)
                size += len(encoded)
            return batch

    async def commit(self, count: int) -> None:
        """Drop the ``count`` oldest events (they were delivered)."""
        async with self._lock:
            for _ in range(count):
                self._memory_bytes -= len(self._memory.popleft())

    async def _refill(self) -> None:
        lines, offset = await asyncio.to_thread(
            self._read_spill, self._spill_read_offset, self._memory_limit // 2
        )
        self._spill_read_offset = offset
        self._spilled -= len(lines)
        for line in lines:
            self._memory.append(line)
            self._memory_bytes += len(line)
        if not self._spilled:
            await asyncio.to_thread(self._spill_path.unlink, missing_ok=True)
            self._spill_read_offset = 0

    def _append_spill(self, encoded: bytes, fresh: bool) -> None:
        self._spill_path.parent.mkdir(parents=True, exist_ok=True)
        with self._spill_path.open("wb" if fresh else "ab") as spill:
            spill.write(encoded + b"\n")

    def _read_spill(self, offset: int, max_bytes: int) -> tuple[list[bytes], int]:
        lines: list[bytes] = []
        size = 0
        with self._spill_path.open("rb") as spill:
            spill.seek(offset)
            while not lines or size < max_bytes:
                line = spill.readline()
                if not line:
                    break
                lines.append(line.rstrip(b"\n"))
                size += len(line)
            return lines, spill.tell()


class Reporter:
    """Numbers events, batches them and delivers them in order (run :meth:`run` as a task)."""

    def __init__(
        self,
        client: ControllerClient,
        *,
        last_seq: int,
        spill_path: Path,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
    ) -> None:
        self._client = client
        self._seq = last_seq
        self._outbox = Outbox(spill_path, memory_limit)
        self._flush_interval = flush_interval
        self._batch_bytes = batch_bytes
        self._pending = asyncio.Event()
        self._full = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._flushing = False
        self.cancelled = asyncio.Event()

    @property
    def outbox(self) -> Outbox:
        return self._outbox

    async def emit(self, step: str, type_: str, **fields: Any) -> None:
        self._seq += 1
        event = ReportEvent.model_validate(
            {"seq": self._seq, "step": step, "type": type_, "time": datetime.now(UTC), **fields}
        )
        await self._outbox.put(event.model_dump_json(exclude_none=True).encode())
        self._drained.clear()
        self._pending.set()
        if self._outbox.pending_bytes >= self._batch_bytes or self._outbox.spilled:
            self._full.set()

    async def run(self) -> None:
        """Deliver batches until cancelled; a batch is retried until the controller takes it."""
        while True:
            await self._pending.wait()
            if not self._flushing:
                # Linger briefly so a burst of output goes out as one request.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._flush_interval):
                        await self._full.wait()
            self._full.clear()
            batch = await self._outbox.peek(self._batch_bytes)
            if batch:
                body = b'{"events":[' + b",".join(batch) + b"]}"
                async for attempt in retrying(max_delay=None):
                    with attempt:
                        ack = await self._client.report(body)
                await self._outbox.commit(len(batch))
                if ack.cancelled:
                    self.cancelled.set()
            if not len(self._outbox):
                self._pending.clear()
                self._drained.set()

    async def flush(self) -> None:
        """Return once every event emitted so far was delivered (no lingering meanwhile)."""
        self._flushing = True
        self._full.set()
        await self._drained.wait()
