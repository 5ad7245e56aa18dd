"""Nomad Variables and their locks: ``/v1/vars`` and ``/v1/var/:path``.

Variables live in the state's ``vars`` table (key: namespace + path) with Nomad's fields, on
the global index. Locks follow Nomad's ``nomad/locks.go``: a lock's timer runs for 2 x TTL from
acquire or the last renew; when it fires the lock is dead (renew fails) but is only removed from
the variable after another LockDelay, so nobody can take it over before then. Timers run on the
event loop's monotonic clock and are restarted (from "now") for locks found after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from nomad_pipeline.devagent.http import (
    STATE_KEY,
    blocking_query,
    field,
    format_go_duration,
    json_object,
    json_response,
    paginate,
    parse_go_duration,
    query_meta_headers,
    query_namespace,
    read_json_body,
)
from nomad_pipeline.devagent.state import (
    Change,
    Event,
    NomadHTTPError,
    Obj,
    StateStore,
    new_uuid,
    now_ns,
    row_key,
)

_VALID_PATH = re.compile(r"^[a-zA-Z0-9\-_~/]{1,128}$")
MAX_VARIABLE_SIZE = 64 * 1024
DEFAULT_LOCK_TTL = 15.0
DEFAULT_LOCK_DELAY = 15.0
MIN_LOCK_TTL = 10.0
MAX_LOCK_TTL = 24 * 3600.0
_LOCK_OPERATIONS = ("lock-acquire", "lock-renew", "lock-release")
_METADATA_FIELDS = ("Namespace", "Path", "CreateIndex", "ModifyIndex", "CreateTime", "ModifyTime")


@dataclass(slots=True)
class _LockTimer:
    lock_id: str
    ttl: float
    delay: float
    task: asyncio.Task[None] | None = None
    expired: bool = False


def metadata(variable: Obj) -> Obj:
    """A variable without its Items (what lists and lock renew/release answer)."""
    meta = {name: variable[name] for name in _METADATA_FIELDS}
    if variable.get("Lock"):
        meta["Lock"] = variable["Lock"]
    return meta


def zero_variable(namespace: str, path: str) -> Obj:
    """Nomad's zero-value stub, the 409 body when there is no current variable to show."""
    return {
        "Namespace": namespace,
        "Path": path,
        "CreateIndex": 0,
        "ModifyIndex": 0,
        "CreateTime": 0,
        "ModifyTime": 0,
        "Items": None,
        "Lock": None,
    }


def validate_path(path: str) -> None:
    """Nomad's path rules (``structs.VariableDecrypted.Validate``), with its error texts."""
    if not path:
        raise NomadHTTPError(400, "variable requires path")
    if not _VALID_PATH.match(path):
        raise NomadHTTPError(400, f"invalid path {path!r}".replace("'", '"'))
    parts = path.split("/")
    if parts[0] != "nomad":
        return
    if len(parts) == 1:
        raise NomadHTTPError(
            400,
            '"nomad" is a reserved top-level directory path, but you may write variables to '
            '"nomad/jobs", "nomad/job-templates", or below',
        )
    if parts[1] in ("jobs", "sentinel") or (parts[1] == "job-templates" and len(parts) == 3):
        return
    raise NomadHTTPError(
        400,
        'only paths at "nomad/jobs" or below, or "nomad/job-templates/<name>", are valid '
        'paths under the top-level "nomad" directory',
    )


def _validate_items(items: Any, *, required: bool) -> dict[str, str]:
    if items is None or items == {}:
        if required:
            raise NomadHTTPError(400, "variable missing required Items object")
        return {}
    if not isinstance(items, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in items.items()
    ):
        raise NomadHTTPError(
            400,
            "Failed to decode request body: json: cannot unmarshal Items into Go value of "
            "type map[string]string",
        )
    size = sum(len(k.encode()) + len(v.encode()) for k, v in items.items())
    if size > MAX_VARIABLE_SIZE:
        raise NomadHTTPError(400, "variables are limited to 64KiB in total size")
    return dict(items)


def _lock_duration(lock: Obj, name: str, default: float) -> float:
    value = field(lock, name)
    if value is None or value == "":
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        return value / 1e9
    if isinstance(value, str):
        try:
            return parse_go_duration(value)
        except ValueError as exc:
            raise NomadHTTPError(400, f"Failed to decode request body: {exc}") from None
    raise NomadHTTPError(400, f"Failed to decode request body: invalid {name} {value!r}")


class Variables:
    """The variable store and lock timers over the shared state."""

    def __init__(self, state: StateStore) -> None:
        self._state = state
        self._locks: dict[str, _LockTimer] = {}

    async def start(self) -> None:
        """Re-arm the timers of locks that were held when the agent last stopped."""
        for key, variable in list(self._state.items("vars")):
            lock = variable.get("Lock")
            if lock and lock.get("ID"):
                ttl = parse_go_duration(lock.get("TTL") or "15s")
                delay = parse_go_duration(lock.get("LockDelay") or "15s")
                self._arm(key, _LockTimer(lock["ID"], ttl, delay))

    async def stop(self) -> None:
        timers = [t.task for t in self._locks.values() if t.task is not None]
        self._locks.clear()
        for task in timers:
            task.cancel()
        for task in timers:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- reads -----------------------------------------------------------------------------

    def get(self, namespace: str, path: str) -> Obj | None:
        return self._state.get("vars", row_key(namespace, path))

    def list(self, namespace: str, prefix: str) -> list[Obj]:
        return [
            v
            for v in self._state.rows("vars")
            if (namespace == "*" or v["Namespace"] == namespace) and v["Path"].startswith(prefix)
        ]

    # -- writes ----------------------------------------------------------------------------

    async def put(
        self, namespace: str, path: str, items: Any, *, cas: int | None, lock_id: str
    ) -> Obj:
        self._check_namespace(namespace)
        validate_path(path)
        clean_items = _validate_items(items, required=True)
        current = self.get(namespace, path)
        self._check_cas(namespace, path, current, cas)
        if current is not None and current.get("Lock") and current["Lock"].get("ID") != lock_id:
            raise NomadHTTPError(409, "", body=zero_variable(namespace, path))
        lock = current.get("Lock") if current is not None else None
        return await self._write(namespace, path, current, clean_items, lock)

    async def delete(self, namespace: str, path: str, *, cas: int | None) -> int:
        self._check_namespace(namespace)
        current = self.get(namespace, path)
        self._check_cas(namespace, path, current, cas)
        if current is None:
            return self._state.index
        if current.get("Lock"):
            raise NomadHTTPError(409, "", body=zero_variable(namespace, path))
        return await self._state.commit(
            [Change("vars", row_key(namespace, path), None)],
            [_event("VariableDeleted", current)],
        )

    def _check_namespace(self, namespace: str) -> None:
        if namespace == "*":
            raise NomadHTTPError(400, "wildcard namespace not allowed for variable writes")
        if self._state.get("namespaces", namespace) is None:
            raise NomadHTTPError(500, f'namespace "{namespace}" does not exist')

    def _check_cas(self, namespace: str, path: str, current: Obj | None, cas: int | None) -> None:
        if cas is None:
            return
        current_index = current["ModifyIndex"] if current is not None else 0
        if cas != current_index:
            body = current if current is not None else zero_variable(namespace, path)
            raise NomadHTTPError(409, "", body=body)

    async def _write(
        self,
        namespace: str,
        path: str,
        current: Obj | None,
        items: dict[str, str] | None,
        lock: Obj | None,
    ) -> Obj:
        index = self._state.index + 1
        now = now_ns()
        variable: Obj = {
            "Namespace": namespace,
            "Path": path,
            "CreateIndex": current["CreateIndex"] if current is not None else index,
            "ModifyIndex": index,
            "CreateTime": current["CreateTime"] if current is not None else now,
            "ModifyTime": now,
            "Items": items if items is not None else (current or {}).get("Items", {}),
        }
        if lock:
            variable["Lock"] = lock
        committed = await self._state.commit(
            [Change("vars", row_key(namespace, path), variable)],
            [_event("VariableUpserted", variable)],
        )
        # commit allocates the index we predicted: the store is single-writer on this loop.
        assert committed == index
        return variable

    # -- locks -----------------------------------------------------------------------------

    async def acquire(self, namespace: str, path: str, body: Obj) -> Obj:
        self._check_namespace(namespace)
        validate_path(path)
        items = _validate_items(field(body, "Items"), required=False)
        lock_spec = field(body, "Lock") or {}
        if not isinstance(lock_spec, dict):
            raise NomadHTTPError(400, "missing lock information")
        ttl = _lock_duration(lock_spec, "TTL", DEFAULT_LOCK_TTL)
        delay = _lock_duration(lock_spec, "LockDelay", DEFAULT_LOCK_DELAY)
        if not MIN_LOCK_TTL <= ttl <= MAX_LOCK_TTL:
            raise NomadHTTPError(400, "TTL must be between 10 seconds and 24 hours")
        if delay < 0:
            raise NomadHTTPError(400, "LockDelay must be positive")
        current = self.get(namespace, path)
        if current is not None and current.get("Lock"):
            raise NomadHTTPError(409, "", body=zero_variable(namespace, path))
        lock_id = new_uuid()
        lock = {
            "ID": lock_id,
            "TTL": format_go_duration(ttl),
            "LockDelay": format_go_duration(delay),
        }
        variable = await self._write(namespace, path, current, items, lock)
        self._arm(row_key(namespace, path), _LockTimer(lock_id, ttl, delay))
        return variable

    async def renew(self, namespace: str, path: str, body: Obj) -> Obj:
        current = self.get(namespace, path)
        if current is None:
            raise NomadHTTPError(404, "variable doesn't exist")
        if not current.get("Lock"):
            raise NomadHTTPError(409, "variable doesn't hold a lock")
        lock_id = _lock_id(body)
        timer = self._locks.get(row_key(namespace, path))
        if timer is None or timer.expired or timer.lock_id != lock_id:
            raise NomadHTTPError(409, "attempting to modify locked variable")
        self._arm(row_key(namespace, path), _LockTimer(lock_id, timer.ttl, timer.delay))
        return metadata(current)

    async def release(self, namespace: str, path: str, body: Obj) -> Obj:
        if field(body, "Items"):
            raise NomadHTTPError(400, "lock release operation doesn't take variable items")
        lock_id = _lock_id(body)
        current = self.get(namespace, path)
        if current is None:
            raise NomadHTTPError(404, "variable doesn't exist")
        if not current.get("Lock"):
            raise NomadHTTPError(409, "variable doesn't hold a lock")
        key = row_key(namespace, path)
        timer = self._locks.get(key)
        if current["Lock"].get("ID") != lock_id or (timer is not None and timer.expired):
            stub = zero_variable(namespace, path)
            stub["Lock"] = {}
            raise NomadHTTPError(409, "", body=stub)
        self._disarm(key)
        variable = await self._write(namespace, path, current, None, None)
        return metadata(variable)

    def _arm(self, key: str, timer: _LockTimer) -> None:
        self._disarm(key)
        self._locks[key] = timer
        timer.task = asyncio.create_task(self._expire(key, timer), name=f"devagent-lock-{key}")

    def _disarm(self, key: str) -> None:
        timer = self._locks.pop(key, None)
        if (
            timer is not None
            and timer.task is not None
            and timer.task is not asyncio.current_task()
        ):
            timer.task.cancel()

    async def _expire(self, key: str, timer: _LockTimer) -> None:
        """Wait out 2 x TTL (a renewal replaces this timer), then LockDelay, then free it."""
        await asyncio.sleep(2 * timer.ttl)
        timer.expired = True
        await asyncio.sleep(timer.delay)
        if self._locks.get(key) is not timer:
            return
        del self._locks[key]
        current = self._state.get("vars", key)
        if current is None or (current.get("Lock") or {}).get("ID") != timer.lock_id:
            return
        await self._write(current["Namespace"], current["Path"], current, None, None)


def _lock_id(body: Obj) -> str:
    lock = field(body, "Lock")
    lock_id = field(lock, "ID") if isinstance(lock, dict) else None
    if not isinstance(lock_id, str) or not lock_id:
        raise NomadHTTPError(400, "missing lock information")
    return lock_id


def _event(event_type: str, variable: Obj) -> Event:
    return Event(
        topic="Variable",
        type=event_type,
        key=variable["Path"],
        namespace=variable["Namespace"],
        payload={"Variable": metadata(variable)},
    )


# -- HTTP routes ----------------------------------------------------------------------------

VARIABLES_KEY: Final = web.AppKey("devagent_variables", Variables)


def _cas(request: web.Request) -> int | None:
    if "cas" not in request.query:
        return None
    value = request.query["cas"]
    try:
        return int(value)
    except ValueError as exc:
        raise NomadHTTPError(400, f"can not parse cas: {exc}") from None


def _conflict(request: web.Request, exc: NomadHTTPError) -> web.Response:
    """409 with the current variable (or the zero stub) and its ModifyIndex as X-Nomad-Index."""
    body = exc.body if isinstance(exc.body, dict) else {}
    return json_response(request, body, index=int(body.get("ModifyIndex") or 0), status=409)


async def list_variables(request: web.Request) -> web.Response:
    variables = request.app[VARIABLES_KEY]
    namespace = query_namespace(request)
    prefix = request.query.get("prefix", "")

    def read() -> tuple[list[Obj], int]:
        return variables.list(namespace, prefix), request.app[STATE_KEY].table_index("vars")

    found, index = await blocking_query(request, ("vars",), read)
    page, headers = paginate(request, found, lambda v: f"{v['Namespace']}.{v['Path']}")
    return json_response(request, [metadata(v) for v in page], index=index, headers=headers)


async def variable_handler(request: web.Request) -> web.StreamResponse:
    variables = request.app[VARIABLES_KEY]
    path = request.match_info["path"]
    namespace = query_namespace(request)
    if request.method == "GET":

        def read() -> tuple[Obj | None, int]:
            found = variables.get(namespace, path)
            table_index = request.app[STATE_KEY].table_index("vars")
            return found, found["ModifyIndex"] if found is not None else table_index

        variable, index = await blocking_query(request, ("vars",), read)
        if variable is None:
            raise NomadHTTPError(404, "variable not found")
        return json_response(request, variable, index=index)
    if request.method == "DELETE":
        try:
            index = await variables.delete(namespace, path, cas=_cas(request))
        except NomadHTTPError as exc:
            if exc.status == 409 and exc.body is not None:
                return _conflict(request, exc)
            raise
        return web.Response(status=204, headers=query_meta_headers(index))
    if request.method not in ("PUT", "POST"):
        raise NomadHTTPError(405, "Invalid method")
    return await _write_variable(request, variables, path, namespace)


async def _write_variable(
    request: web.Request, variables: Variables, path: str, query_ns: str
) -> web.Response:
    operations = [op for op in _LOCK_OPERATIONS if op in request.query]
    if len(operations) > 1:
        raise NomadHTTPError(400, "multiple lock operations")
    if operations and "cas" in request.query:
        raise NomadHTTPError(400, "CAS can't be used with lock operations")
    body = json_object(await read_json_body(request), "structs.VariableDecrypted")
    body_ns = field(body, "Namespace")
    # Nomad's code (not its docs): a non-empty body Namespace wins over ?namespace=.
    namespace = body_ns if isinstance(body_ns, str) and body_ns else query_ns
    try:
        if not operations:
            lock = field(body, "Lock")
            lock_id = field(lock, "ID", "") if isinstance(lock, dict) else ""
            variable = await variables.put(
                namespace, path, field(body, "Items"), cas=_cas(request), lock_id=lock_id or ""
            )
        elif operations[0] == "lock-acquire":
            variable = await variables.acquire(namespace, path, body)
        elif operations[0] == "lock-renew":
            variable = await variables.renew(namespace, path, body)
        else:
            variable = await variables.release(namespace, path, body)
    except NomadHTTPError as exc:
        if exc.status == 409 and exc.body is not None:
            return _conflict(request, exc)
        raise
    return json_response(request, variable, index=variable["ModifyIndex"])


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/vars", list_variables)
    app.router.add_route("*", "/v1/var/{path:.+}", variable_handler)
