"""Jobs, evaluations and allocations: the HTTP face of the engine.

``/v1/job/...`` is routed by suffix as Nomad does, because job IDs may contain ``/``
(dispatched children are ``parent/dispatch-<unix>-<hex>``): ``/allocations``,
``/evaluations``, ``/summary``, ``/versions``, ``/dispatch`` and ``/dispatch/payload`` are
sub-resources, and whatever is left is the job ID.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any, Final, Protocol

from aiohttp import web

from nomad_pipeline.devagent.hcl import JobspecError, parse_jobspec
from nomad_pipeline.devagent.http import (
    STATE_KEY,
    blocking_query,
    field,
    json_object,
    json_response,
    paginate,
    parse_go_bool,
    query_bool,
    query_namespace,
    read_json_body,
)
from nomad_pipeline.devagent.jobspec import canonicalize
from nomad_pipeline.devagent.state import NomadHTTPError, Obj, row_key


class JobEngine(Protocol):
    """The engine operations the HTTP layer calls (``nomad_pipeline.devagent.engine``)."""

    def validate_job(self, job: Obj) -> tuple[Obj, list[str]]: ...

    async def register_job(
        self,
        namespace: str,
        job: Obj,
        *,
        enforce_index: bool = False,
        job_modify_index: int = 0,
        eval_priority: int = 0,
    ) -> Obj: ...

    async def deregister_job(self, namespace: str, job_id: str, *, purge: bool) -> Obj: ...

    async def dispatch_job(
        self,
        namespace: str,
        job_id: str,
        *,
        payload: bytes | None,
        meta: dict[str, str],
        id_prefix_template: str = "",
        idempotency_token: str = "",
    ) -> Obj: ...

    async def stop_allocation(self, alloc_id: str) -> Obj: ...

    def job_summary(self, namespace: str, job_id: str) -> Obj: ...

    def job_allocations(
        self, namespace: str, job_id: str, *, all_instances: bool = False
    ) -> list[Obj]: ...

    def job_evaluations(self, namespace: str, job_id: str) -> list[Obj]: ...

    def job_versions(self, namespace: str, job_id: str) -> list[Obj]: ...


ENGINE_KEY: Final = web.AppKey("devagent_engine", JobEngine)

_ALLOC_STUB_FIELDS = (
    "ID",
    "EvalID",
    "Name",
    "Namespace",
    "NodeID",
    "NodeName",
    "JobID",
    "JobType",
    "JobVersion",
    "TaskGroup",
    "AllocatedResources",
    "DesiredStatus",
    "DesiredDescription",
    "ClientStatus",
    "ClientDescription",
    "DesiredTransition",
    "TaskStates",
    "DeploymentStatus",
    "FollowupEvalID",
    "NextAllocation",
    "RescheduleTracker",
    "PreemptedAllocations",
    "PreemptedByAllocation",
    "CreateIndex",
    "ModifyIndex",
    "CreateTime",
    "ModifyTime",
)


# -- shapes ---------------------------------------------------------------------------------


def alloc_stub(alloc: Obj, *, task_states: bool = True, resources: bool = False) -> Obj:
    stub = {name: alloc.get(name) for name in _ALLOC_STUB_FIELDS}
    job = alloc.get("Job") or {}
    if stub["JobType"] is None:
        stub["JobType"] = job.get("Type", "")
    if stub["JobVersion"] is None:
        stub["JobVersion"] = job.get("Version", 0)
    if not resources:
        del stub["AllocatedResources"]
    if not task_states:
        stub["TaskStates"] = None
    return stub


def job_stub(job: Obj, summary: Obj, *, with_meta: bool) -> Obj:
    stub = {
        "ID": job["ID"],
        "ParentID": job.get("ParentID", ""),
        "Name": job.get("Name", job["ID"]),
        "Namespace": job.get("Namespace", "default"),
        "Datacenters": job.get("Datacenters"),
        "NodePool": job.get("NodePool", "default"),
        "Multiregion": job.get("Multiregion"),
        "Type": job.get("Type", "service"),
        "Priority": job.get("Priority", 50),
        "Periodic": bool(job.get("Periodic") and job["Periodic"].get("Enabled", True)),
        "ParameterizedJob": job.get("ParameterizedJob") is not None,
        "Stop": job.get("Stop", False),
        "Status": job.get("Status", "pending"),
        "StatusDescription": job.get("StatusDescription", ""),
        "JobSummary": summary,
        "CreateIndex": job.get("CreateIndex", 0),
        "ModifyIndex": job.get("ModifyIndex", 0),
        "JobModifyIndex": job.get("JobModifyIndex", 0),
        "SubmitTime": job.get("SubmitTime", 0),
    }
    if with_meta:
        stub["Meta"] = job.get("Meta")
    return stub


def _in_namespace(obj: Obj, namespace: str) -> bool:
    return namespace == "*" or obj.get("Namespace", "default") == namespace


def _newest(objects: list[Obj]) -> int:
    """The highest ModifyIndex among ``objects``: what wakes a blocking query on them."""
    return max((int(o.get("ModifyIndex") or 0) for o in objects), default=0)


def _by_create(obj: Obj) -> str:
    """Sort key and page token for lists in creation order (allocations, evaluations)."""
    return f"{obj.get('CreateIndex', 0):020d}.{obj['ID']}"


# -- jobs -----------------------------------------------------------------------------------


async def list_jobs(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    engine = request.app[ENGINE_KEY]
    namespace = query_namespace(request)
    prefix = request.query.get("prefix", "")
    with_meta = query_bool(request, "meta")

    def read() -> tuple[list[Obj], int]:
        jobs = [
            j
            for j in state.rows("jobs")
            if _in_namespace(j, namespace) and j["ID"].startswith(prefix)
        ]
        return jobs, state.table_index("jobs", "allocs")

    jobs, index = await blocking_query(request, ("jobs", "allocs"), read)
    token: Callable[[Obj], str] = (
        (lambda j: f"{j['Namespace']}.{j['ID']}") if namespace == "*" else (lambda j: j["ID"])
    )
    page, headers = paginate(request, jobs, token)
    stubs = [
        job_stub(j, engine.job_summary(j["Namespace"], j["ID"]), with_meta=with_meta) for j in page
    ]
    return json_response(request, stubs, index=index, headers=headers)


async def register_jobs(request: web.Request) -> web.Response:
    if request.method not in ("PUT", "POST"):
        raise NomadHTTPError(405, "Invalid method")
    return await _register(request, path_job_id=None)


async def _register(request: web.Request, *, path_job_id: str | None) -> web.Response:
    body = json_object(await read_json_body(request), "api.JobRegisterRequest")
    job = field(body, "Job")
    if job is None:
        raise NomadHTTPError(400, "Job must be specified")
    job = json_object(job, "api.Job")
    job_id = field(job, "ID")
    if not job_id:
        raise NomadHTTPError(400, "Job ID hasn't been provided")
    if path_job_id is not None and job_id != path_job_id:
        raise NomadHTTPError(400, "Job ID does not match name")
    eval_priority = field(body, "EvalPriority") or 0
    if not isinstance(eval_priority, int) or (eval_priority and not 1 <= eval_priority <= 100):
        raise NomadHTTPError(400, "Eval priority must be between 1 and 100 inclusively")
    namespace = (
        request.query.get("namespace")
        or field(body, "Namespace")
        or field(job, "Namespace")
        or "default"
    )
    result = await request.app[ENGINE_KEY].register_job(
        str(namespace),
        job,
        enforce_index=bool(field(body, "EnforceIndex")),
        job_modify_index=int(field(body, "JobModifyIndex") or 0),
        eval_priority=eval_priority,
    )
    return _write_reply(request, result)


def _write_reply(request: web.Request, result: Obj) -> web.Response:
    """A write's reply as the engine shaped it, with the write's index as X-Nomad-Index."""
    index = int(result.get("Index") or request.app[STATE_KEY].index)
    return json_response(request, result, index=index)


async def parse_job(request: web.Request) -> web.Response:
    if request.method not in ("PUT", "POST"):
        raise NomadHTTPError(405, "Invalid method")
    body = json_object(await read_json_body(request), "api.JobsParseRequest")
    text = field(body, "JobHCL") or ""
    if not isinstance(text, str) or not text.strip():
        raise NomadHTTPError(400, "Job spec is empty")
    variables = field(body, "Variables") or ""
    try:
        job = parse_jobspec(text, variables if isinstance(variables, str) else "")
    except JobspecError as exc:
        raise NomadHTTPError(400, f"Failed to parse job: {exc}") from None
    if field(body, "Canonicalize"):
        job = canonicalize(job, namespace=str(job.get("Namespace") or "default"))
    return json_response(request, job)


async def validate_job(request: web.Request) -> web.Response:
    if request.method not in ("PUT", "POST"):
        raise NomadHTTPError(405, "Invalid method")
    body = json_object(await read_json_body(request), "api.JobValidateRequest")
    job = field(body, "Job")
    if job is None:
        raise NomadHTTPError(400, "Job must be specified")
    _, errors = request.app[ENGINE_KEY].validate_job(json_object(job, "api.Job"))
    reply = {
        "DriverConfigValidated": not errors,
        "ValidationErrors": errors or None,
        "Error": _multierror(errors) if errors else "",
        "Warnings": "",
    }
    return json_response(request, reply)


def _multierror(errors: list[str]) -> str:
    noun = "error" if len(errors) == 1 else "errors"
    return f"{len(errors)} {noun} occurred:\n" + "".join(f"\t* {e}\n" for e in errors) + "\n"


_JOB_SUFFIXES = (
    "/allocations",
    "/evaluations",
    "/summary",
    "/versions",
    "/dispatch/payload",
    "/dispatch",
)


async def job_handler(request: web.Request) -> web.StreamResponse:
    tail = request.match_info["tail"]
    for suffix in _JOB_SUFFIXES:
        if tail.endswith(suffix) and len(tail) > len(suffix):
            return await _job_subresource(request, tail.removesuffix(suffix), suffix)
    if request.method == "GET":
        return await _read_job(request, tail)
    if request.method in ("PUT", "POST"):
        return await _register(request, path_job_id=tail)
    if request.method == "DELETE":
        return await _deregister(request, tail)
    raise NomadHTTPError(405, "Invalid method")


async def _job_subresource(request: web.Request, job_id: str, suffix: str) -> web.Response:
    if suffix.startswith("/dispatch"):
        if request.method not in ("PUT", "POST"):
            raise NomadHTTPError(405, "Invalid method")
        return await _dispatch(request, job_id, raw_payload=suffix == "/dispatch/payload")
    if request.method != "GET":
        raise NomadHTTPError(405, "Invalid method")
    if suffix == "/allocations":
        return await _job_allocations(request, job_id)
    if suffix == "/evaluations":
        return await _job_evaluations(request, job_id)
    if suffix == "/summary":
        return await _job_summary(request, job_id)
    return await _job_versions(request, job_id)


async def _read_job(request: web.Request, job_id: str) -> web.Response:
    state = request.app[STATE_KEY]
    key = row_key(query_namespace(request), job_id)

    def read() -> tuple[Obj | None, int]:
        job = state.get("jobs", key)
        return job, job["ModifyIndex"] if job is not None else state.table_index("jobs")

    job, index = await blocking_query(request, ("jobs",), read)
    if job is None:
        raise NomadHTTPError(404, "job not found")
    return json_response(request, job, index=index)


async def _deregister(request: web.Request, job_id: str) -> web.Response:
    purge = False
    if "purge" in request.query:
        parsed = parse_go_bool(request.query["purge"] or "true")
        if parsed is None:
            raise NomadHTTPError(
                500,
                f'strconv.ParseBool: parsing "{request.query["purge"]}": invalid syntax',
            )
        purge = parsed
    result = await request.app[ENGINE_KEY].deregister_job(
        query_namespace(request), job_id, purge=purge
    )
    return _write_reply(request, result)


async def _job_allocations(request: web.Request, job_id: str) -> web.Response:
    state = request.app[STATE_KEY]
    engine = request.app[ENGINE_KEY]
    namespace = query_namespace(request)
    every_instance = query_bool(request, "all")

    def read() -> tuple[list[Obj], int]:
        allocs = engine.job_allocations(namespace, job_id, all_instances=every_instance)
        return allocs, _newest(allocs)

    allocs, index = await blocking_query(
        request, ("allocs",), read, reply_index=lambda: state.table_index("allocs")
    )
    return json_response(request, [alloc_stub(a) for a in allocs], index=index)


async def _job_evaluations(request: web.Request, job_id: str) -> web.Response:
    state = request.app[STATE_KEY]
    engine = request.app[ENGINE_KEY]
    namespace = query_namespace(request)

    def read() -> tuple[list[Obj], int]:
        evals = engine.job_evaluations(namespace, job_id)
        return evals, _newest(evals)

    evals, index = await blocking_query(
        request, ("evals",), read, reply_index=lambda: state.table_index("evals")
    )
    return json_response(request, evals, index=index)


async def _job_summary(request: web.Request, job_id: str) -> web.Response:
    state = request.app[STATE_KEY]
    engine = request.app[ENGINE_KEY]
    namespace = query_namespace(request)

    def read() -> tuple[Obj | None, int]:
        job = state.get("jobs", row_key(namespace, job_id))
        if job is None:
            return None, state.table_index("jobs")
        # The counts move with the job's allocations and (Queued) its blocked evaluations.
        index = max(
            job["ModifyIndex"],
            _newest(engine.job_allocations(namespace, job_id)),
            _newest(engine.job_evaluations(namespace, job_id)),
        )
        return engine.job_summary(namespace, job_id), index

    summary, index = await blocking_query(request, ("jobs", "allocs", "evals"), read)
    if summary is None:
        raise NomadHTTPError(404, "job not found")
    return json_response(request, summary, index=index)


async def _job_versions(request: web.Request, job_id: str) -> web.Response:
    state = request.app[STATE_KEY]
    engine = request.app[ENGINE_KEY]
    namespace = query_namespace(request)

    def read() -> tuple[list[Obj], int]:
        versions = engine.job_versions(namespace, job_id)
        return versions, state.table_index("job_versions")

    versions, index = await blocking_query(request, ("job_versions",), read)
    if not versions:
        raise NomadHTTPError(404, "job versions not found")
    body = {
        "Versions": versions,
        "Diffs": None,
        "Index": index,
        "KnownLeader": True,
        "LastContact": 0,
    }
    return json_response(request, body, index=index)


async def _dispatch(request: web.Request, job_id: str, *, raw_payload: bool) -> web.Response:
    payload: bytes | None
    meta: dict[str, str] = {}
    id_prefix_template = ""
    if raw_payload:
        payload = await request.read() or None
    else:
        body = json_object(await read_json_body(request), "structs.JobDispatchRequest")
        body_job_id = field(body, "JobID")
        if body_job_id and body_job_id != job_id:
            raise NomadHTTPError(400, "Job ID does not match")
        payload = _decode_payload(field(body, "Payload"))
        meta_value = field(body, "Meta") or {}
        if not isinstance(meta_value, dict):
            raise NomadHTTPError(
                400,
                "Failed to decode request body: json: cannot unmarshal Meta into Go value of "
                "type map[string]string",
            )
        meta = {str(k): str(v) for k, v in meta_value.items()}
        id_prefix_template = str(field(body, "IdPrefixTemplate") or "")
    token = request.query.get("idempotency_token", "")
    result = await request.app[ENGINE_KEY].dispatch_job(
        query_namespace(request),
        job_id,
        payload=payload,
        meta=meta,
        id_prefix_template=id_prefix_template,
        idempotency_token=token,
    )
    return _write_reply(request, result)


def _decode_payload(value: Any) -> bytes | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise NomadHTTPError(
            400,
            "Failed to decode request body: json: cannot unmarshal Payload into Go value of "
            "type []uint8",
        )
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise NomadHTTPError(
            400, f"Failed to decode request body: illegal base64 data: {exc}"
        ) from None


# -- evaluations ----------------------------------------------------------------------------


async def list_evaluations(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    namespace = query_namespace(request)
    prefix = request.query.get("prefix", "")
    job_id = request.query.get("job", "")
    status = request.query.get("status", "")
    if request.query.get("filter") and (job_id or status):
        raise NomadHTTPError(400, "Filter expression cannot be used with other filter parameters")

    def read() -> tuple[list[Obj], int]:
        evals = [
            e
            for e in state.rows("evals")
            if _in_namespace(e, namespace)
            and e["ID"].startswith(prefix)
            and (not job_id or e.get("JobID") == job_id)
            and (not status or e.get("Status") == status)
        ]
        return evals, state.table_index("evals")

    evals, index = await blocking_query(request, ("evals",), read)
    token: Callable[[Obj], str] = (lambda e: str(e["ID"])) if prefix else _by_create
    page, headers = paginate(request, evals, token)
    return json_response(request, page, index=index, headers=headers)


async def evaluation_handler(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    tail = request.match_info["tail"]
    if tail.endswith("/allocations"):
        eval_id = tail.removesuffix("/allocations")

        def read_allocs() -> tuple[list[Obj], int]:
            allocs = [a for a in state.rows("allocs") if a.get("EvalID") == eval_id]
            return sorted(allocs, key=_by_create), _newest(allocs)

        allocs, index = await blocking_query(
            request, ("allocs",), read_allocs, reply_index=lambda: state.table_index("allocs")
        )
        return json_response(request, [alloc_stub(a) for a in allocs], index=index)
    if "/" in tail:
        raise NomadHTTPError(404, "Invalid URL path")

    def read() -> tuple[Obj | None, int]:
        found = state.get("evals", tail)
        return found, found["ModifyIndex"] if found is not None else state.table_index("evals")

    evaluation, index = await blocking_query(request, ("evals",), read)
    if evaluation is None:
        raise NomadHTTPError(404, "eval not found")
    if query_bool(request, "related"):
        evaluation = {**evaluation, "RelatedEvals": _related_evals(request, evaluation)}
    return json_response(request, evaluation, index=index)


def _related_evals(request: web.Request, evaluation: Obj) -> list[Obj]:
    """Evaluation stubs reachable through NextEval, PreviousEval and BlockedEval links."""
    state = request.app[STATE_KEY]
    seen = {evaluation["ID"]}
    pending = [evaluation]
    related: list[Obj] = []
    while pending:
        current = pending.pop()
        for link in ("NextEval", "PreviousEval", "BlockedEval"):
            linked_id = current.get(link) or ""
            linked = state.get("evals", linked_id) if linked_id else None
            if linked is not None and linked["ID"] not in seen:
                seen.add(linked["ID"])
                pending.append(linked)
                related.append({k: v for k, v in linked.items() if k != "FailedTGAllocs"})
    return sorted(related, key=_by_create)


# -- allocations ----------------------------------------------------------------------------


async def list_allocations(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    namespace = query_namespace(request)
    prefix = request.query.get("prefix", "")
    task_states = query_bool(request, "task_states", default=True)
    resources = query_bool(request, "resources")

    def read() -> tuple[list[Obj], int]:
        allocs = [
            a
            for a in state.rows("allocs")
            if _in_namespace(a, namespace) and a["ID"].startswith(prefix)
        ]
        return allocs, state.table_index("allocs")

    allocs, index = await blocking_query(request, ("allocs",), read)
    token: Callable[[Obj], str] = (lambda a: str(a["ID"])) if prefix else _by_create
    page, headers = paginate(request, allocs, token)
    stubs = [alloc_stub(a, task_states=task_states, resources=resources) for a in page]
    return json_response(request, stubs, index=index, headers=headers)


async def allocation_handler(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    tail = request.match_info["tail"]
    if tail.endswith("/stop"):
        if request.method not in ("PUT", "POST"):
            raise NomadHTTPError(405, "Invalid method")
        alloc_id = tail.removesuffix("/stop")
        if state.get("allocs", alloc_id) is None:
            raise NomadHTTPError(404, "alloc not found")
        result = await request.app[ENGINE_KEY].stop_allocation(alloc_id)
        return _write_reply(request, result)
    if "/" in tail:
        raise NomadHTTPError(404, "resource not found")
    if request.method != "GET":
        raise NomadHTTPError(405, "Invalid method")

    def read() -> tuple[Obj | None, int]:
        found = state.get("allocs", tail)
        return found, found["ModifyIndex"] if found is not None else state.table_index("allocs")

    alloc, index = await blocking_query(request, ("allocs",), read)
    if alloc is None:
        raise NomadHTTPError(404, "alloc not found")
    return json_response(request, alloc, index=index)


def add_routes(app: web.Application) -> None:
    router = app.router
    router.add_get("/v1/jobs", list_jobs)
    router.add_route("PUT", "/v1/jobs", register_jobs)
    router.add_route("POST", "/v1/jobs", register_jobs)
    router.add_route("*", "/v1/jobs/parse", parse_job)
    router.add_route("*", "/v1/validate/job", validate_job)
    router.add_route("*", "/v1/job/{tail:.+}", job_handler)
    router.add_get("/v1/evaluations", list_evaluations)
    router.add_get("/v1/evaluation/{tail:.+}", evaluation_handler)
    router.add_get("/v1/allocations", list_allocations)
    router.add_route("*", "/v1/allocation/{tail:.+}", allocation_handler)
