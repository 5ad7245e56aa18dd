"""The Nomad client against the dev agent: errors, variables, jobs, streams."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest

from nomad_pipeline.devagent.server import DevAgent, DevAgentConfig
from nomad_pipeline.errors import (
    Conflict,
    Forbidden,
    Invalid,
    NomadError,
    NomadUnavailable,
    NotFound,
)
from nomad_pipeline.nomad.client import JSON, NomadClient, VariableConflict

WAIT_SECONDS = 20.0


def batch_job(job_id: str, script: str, **job_fields: Any) -> JSON:
    """A fail-fast raw_exec batch job running ``script`` with this Python."""
    return {
        "ID": job_id,
        "Type": "batch",
        **job_fields,
        "TaskGroups": [
            {
                "Name": "step",
                "RestartPolicy": {"Attempts": 0, "Mode": "fail"},
                "ReschedulePolicy": {"Attempts": 0, "Unlimited": False},
                "Tasks": [
                    {
                        "Name": "main",
                        "Driver": "raw_exec",
                        "Config": {"command": sys.executable, "args": ["-c", script]},
                    }
                ],
            }
        ],
    }


async def wait_terminal_allocation(nomad: NomadClient, job_id: str) -> JSON:
    """Follow the job's allocations with blocking queries until one is terminal."""
    index = 0
    async with asyncio.timeout(WAIT_SECONDS):
        while True:
            allocations, index = await nomad.job_allocations(job_id, index=index, wait="5s")
            for allocation in allocations:
                if allocation["ClientStatus"] in ("complete", "failed", "lost"):
                    return allocation


async def test_cluster_calls(nomad: NomadClient) -> None:
    assert await nomad.status_leader()
    assert "config" in await nomad.agent_self()


async def test_namespaces_crud(nomad: NomadClient) -> None:
    await nomad.upsert_namespace("ci", description="CI jobs")

    assert (await nomad.get_namespace("ci"))["Description"] == "CI jobs"
    names = {ns["Name"] for ns in (await nomad.list_namespaces())[0]}
    assert {"default", "ci"} <= names
    await nomad.delete_namespace("ci")
    with pytest.raises(NotFound):
        await nomad.get_namespace("ci")


async def test_variable_check_and_set(nomad: NomadClient) -> None:
    created = await nomad.put_variable("app/config", {"k": "v1"}, cas=0)
    with pytest.raises(VariableConflict) as conflict:
        await nomad.put_variable("app/config", {"k": "v2"}, cas=0)
    assert conflict.value.current["ModifyIndex"] == created["ModifyIndex"]
    assert isinstance(conflict.value, Conflict)

    updated = await nomad.put_variable("app/config", {"k": "v2"}, cas=created["ModifyIndex"])
    assert (await nomad.get_variable("app/config"))["Items"] == {"k": "v2"}
    with pytest.raises(VariableConflict):
        await nomad.delete_variable("app/config", cas=created["ModifyIndex"])
    await nomad.delete_variable("app/config", cas=updated["ModifyIndex"])
    with pytest.raises(NotFound):
        await nomad.get_variable("app/config")


async def test_bad_variable_path_is_invalid(nomad: NomadClient) -> None:
    with pytest.raises(Invalid, match="invalid path"):
        await nomad.put_variable("a.b", {"k": "v"})


async def test_list_variables_follows_pages_and_blocks(nomad: NomadClient) -> None:
    for number in range(5):
        await nomad.put_variable(f"list/v{number}", {"n": str(number)})
    await nomad.put_variable("other/v", {"n": "x"})

    metadata, index = await nomad.list_variables("list/", per_page=2)
    assert [m["Path"] for m in metadata] == [f"list/v{n}" for n in range(5)]

    blocked = asyncio.ensure_future(nomad.list_variables("list/", index=index, wait="10s"))
    await nomad.put_variable("list/v9", {"n": "9"})
    async with asyncio.timeout(WAIT_SECONDS):
        after, new_index = await blocked
    assert new_index > index
    assert "list/v9" in {m["Path"] for m in after}


async def test_variable_locks(nomad: NomadClient) -> None:
    held = await nomad.lock_acquire("locks/leader", ttl="10s", items={"holder": "a"})
    lock_id = held["Lock"]["ID"]
    with pytest.raises(Conflict):
        await nomad.lock_acquire("locks/leader", ttl="10s")

    await nomad.lock_renew("locks/leader", lock_id)
    await nomad.lock_release("locks/leader", lock_id)
    again = await nomad.lock_acquire("locks/leader", ttl="10s", items={"holder": "b"})
    assert again["Lock"]["ID"]


async def test_job_errors_are_translated(nomad: NomadClient) -> None:
    with pytest.raises(NotFound):
        await nomad.get_job("missing")
    with pytest.raises(Invalid):
        await nomad.register_job({"Type": "batch"})
    with pytest.raises(NomadError) as server_error:
        await nomad.register_job(batch_job("job-a", "pass"), namespace="no-such-namespace")
    assert server_error.value.status == 500
    assert "nonexistent namespace" in server_error.value.message


async def test_register_run_and_read_logs(nomad: NomadClient) -> None:
    registered = await nomad.register_job(batch_job("np-run1-build", "print('built')"))
    assert registered["EvalID"]

    allocation = await wait_terminal_allocation(nomad, "np-run1-build")
    assert allocation["ClientStatus"] == "complete"
    job, job_index = await nomad.get_job("np-run1-build")
    assert job["ID"] == "np-run1-build"
    assert job_index > 0
    evaluation, _ = await nomad.get_evaluation(registered["EvalID"])
    assert evaluation["JobID"] == "np-run1-build"
    assert (await nomad.job_evaluations("np-run1-build"))[0]
    full, _ = await nomad.get_allocation(allocation["ID"])
    assert full["TaskStates"]["main"]["State"] == "dead"

    chunks = [
        chunk async for chunk in nomad.stream_logs(allocation["ID"], "main", "stdout", follow=False)
    ]
    assert b"".join(chunks) == b"built\n"
    assert (await nomad.read_file(allocation["ID"], "alloc/logs/main.stdout.0")) == b"built\n"
    sizes = {
        entry["Name"]: entry["Size"]
        for entry in await nomad.list_files(allocation["ID"], "alloc/logs")
    }
    assert (sizes["main.stdout.0"], sizes["main.stderr.0"]) == (len(b"built\n"), 0)


async def test_followed_logs_arrive_while_the_task_runs(nomad: NomadClient, tmp_path: Any) -> None:
    gate = tmp_path / "gate"
    script = (
        "import os, sys, time\n"
        "print('first', flush=True)\n"
        f"while not os.path.exists({str(gate)!r}): time.sleep(0.01)\n"
        "print('second', flush=True)\n"
    )
    await nomad.register_job(batch_job("np-run2-follow", script))
    async with asyncio.timeout(WAIT_SECONDS):
        allocation_id = ""
        index = 0
        while not allocation_id:
            allocations, index = await nomad.job_allocations(
                "np-run2-follow", index=index, wait="5s"
            )
            started = [
                a
                for a in allocations
                if (a.get("TaskStates") or {}).get("main", {}).get("StartedAt")
            ]
            allocation_id = started[0]["ID"] if started else ""
        received = b""
        stream = nomad.stream_logs(allocation_id, "main", "stdout")
        async for chunk in stream:
            received += chunk
            if received == b"first\n":
                gate.write_text("open")
            if received == b"first\nsecond\n":
                break
        await stream.aclose()
    assert received == b"first\nsecond\n"


async def test_dispatch_is_idempotent_and_child_ids_with_slashes_work(
    nomad: NomadClient,
) -> None:
    template = batch_job(
        "render",
        "import os; print(os.environ['NOMAD_META_run'])",
        ParameterizedJob={"Payload": "optional", "MetaRequired": ["run"]},
    )
    await nomad.register_job(template)

    first = await nomad.dispatch_job(
        "render", meta={"run": "r1"}, payload=b"{}", idempotency_token="r1-render"
    )
    again = await nomad.dispatch_job(
        "render", meta={"run": "r1"}, payload=b"{}", idempotency_token="r1-render"
    )
    child_id = first["DispatchedJobID"]
    assert child_id.startswith("render/dispatch-")
    assert again["DispatchedJobID"] == child_id

    child, _ = await nomad.get_job(child_id)
    assert child["ParentID"] == "render"
    allocation = await wait_terminal_allocation(nomad, child_id)
    logs = b"".join(
        [c async for c in nomad.stream_logs(allocation["ID"], "main", "stdout", follow=False)]
    )
    assert logs == b"r1\n"
    jobs, _ = await nomad.list_jobs("render")
    assert {j["ID"] for j in jobs} == {"render", child_id}
    stopped = await nomad.deregister_job(child_id, purge=True)
    assert "EvalID" in stopped
    with pytest.raises(NotFound):
        await nomad.get_job(child_id)


async def test_event_stream_resumes_from_an_index(nomad: NomadClient) -> None:
    first = await nomad.register_job(batch_job("np-ev-a", "pass"))
    await wait_terminal_allocation(nomad, "np-ev-a")

    async def job_events(index: int, until_job: str) -> list[tuple[int, str]]:
        seen: list[tuple[int, str]] = []
        async with asyncio.timeout(WAIT_SECONDS):
            async for batch in nomad.event_stream(["Job"], index=index):
                seen += [(batch["Index"], event["Key"]) for event in batch["Events"]]
                if any(key == until_job for _, key in seen):
                    return seen
        raise AssertionError("the event stream ended")

    from_start = await job_events(0, "np-ev-a")
    assert "np-ev-a" in {key for _, key in from_start}

    await nomad.register_job(batch_job("np-ev-b", "pass"))
    resumed = await job_events(first["JobModifyIndex"], "np-ev-b")
    assert all(index > first["JobModifyIndex"] for index, _ in resumed)
    assert "np-ev-b" in {key for _, key in resumed}


async def test_parse_job_or_a_clear_error(nomad: NomadClient) -> None:
    hcl = """
job "parsed" {
  type = "batch"
  group "g" {
    task "t" {
      driver = "raw_exec"
      config {
        command = "/bin/true"
      }
    }
  }
}
"""
    job = await nomad.parse_job(hcl)
    assert job["ID"] == "parsed"
    with pytest.raises(Invalid):
        await nomad.parse_job("")


async def test_a_token_nomad_refuses_is_forbidden(tmp_path: Any) -> None:
    agent = DevAgent(DevAgentConfig(port=0, data_dir=tmp_path / "acl", acl_token="s3cret"))
    address = await agent.start()
    try:
        async with NomadClient(address) as anonymous, NomadClient(address, "s3cret") as admin:
            with pytest.raises(Forbidden, match="Permission denied"):
                await anonymous.list_variables()
            with pytest.raises(Forbidden):
                await NomadClient(address, "wrong").put_variable("a", {"k": "v"})
            await admin.put_variable("a", {"k": "v"})
            assert (await admin.get_variable("a"))["Items"] == {"k": "v"}
    finally:
        await agent.stop()


async def test_an_event_stream_that_breaks_is_unavailable(tmp_path: Any) -> None:
    agent = DevAgent(DevAgentConfig(port=0, data_dir=tmp_path / "ev"))
    address = await agent.start()
    stopped = False
    try:
        async with NomadClient(address) as nomad:
            await nomad.register_job(batch_job("np-ev-c", "pass"))
            stream = nomad.event_stream(["Job"], index=0)
            async with asyncio.timeout(WAIT_SECONDS):
                first = await anext(stream)
                assert first["Events"]
                await agent.stop()
                stopped = True
                with pytest.raises(NomadUnavailable):
                    while True:
                        await anext(stream)
    finally:
        if not stopped:
            await agent.stop()


async def test_logs_of_an_unknown_allocation_are_not_found(nomad: NomadClient) -> None:
    with pytest.raises(NotFound):
        await anext(nomad.stream_logs("00000000-0000-0000-0000-000000000000", "main", "stdout"))
