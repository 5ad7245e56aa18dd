"""Jobs, evaluations and allocations over real HTTP, driven by python-nomad and aiohttp."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import nomad.api.exceptions as nomad_errors
import pytest
from devagent_http_support import (
    Api,
    api_client,
    batch_job,
    eventually,
    job_allocations,
    python_nomad,
    running_agent,
    wait_job_status,
)

from nomad_pipeline.devagent.server import DevAgent


def main_task(allocation: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = allocation["TaskStates"]["main"]
    return state


def event_types(allocation: dict[str, Any]) -> list[str]:
    return [e["Type"] for e in main_task(allocation)["Events"]]


async def test_a_job_that_succeeds(agent: DevAgent, api: Api) -> None:
    client = python_nomad(agent)
    job = batch_job("ok-job", "echo hello; exit 0")
    registered = await asyncio.to_thread(client.job.register_job, "ok-job", {"Job": job})
    assert registered["EvalID"]
    assert registered["JobModifyIndex"] > 0
    assert registered["Warnings"] == ""
    finished = await wait_job_status(api, "ok-job", "dead")
    assert finished["Version"] == 0
    assert finished["Type"] == "batch"
    (stub,) = await asyncio.to_thread(client.job.get_allocations, "ok-job")
    assert stub["ClientStatus"] == "complete"
    assert stub["DesiredStatus"] == "run"
    assert stub["JobVersion"] == 0
    assert stub["Name"] == "ok-job.step[0]"
    allocation = await asyncio.to_thread(client.allocation.get_allocation, stub["ID"])
    assert allocation["Job"]["ID"] == "ok-job"
    task = main_task(allocation)
    assert task["State"] == "dead"
    assert task["Failed"] is False
    assert task["StartedAt"] and task["FinishedAt"]
    terminated = next(e for e in task["Events"] if e["Type"] == "Terminated")
    assert terminated["ExitCode"] == 0
    assert terminated["Details"]["exit_code"] == "0"
    evaluation = await api.ok("GET", f"/v1/evaluation/{registered['EvalID']}")
    assert evaluation["Status"] == "complete"
    assert evaluation["TriggeredBy"] == "job-register"
    assert evaluation["FailedTGAllocs"] is None
    evals = await api.ok("GET", "/v1/job/ok-job/evaluations")
    assert registered["EvalID"] in [e["ID"] for e in evals]
    eval_allocs = await api.ok("GET", f"/v1/evaluation/{registered['EvalID']}/allocations")
    assert [a["ID"] for a in eval_allocs] == [stub["ID"]]
    summary = await asyncio.to_thread(client.job.get_summary, "ok-job")
    assert summary["Summary"]["step"]["Complete"] == 1
    listed = await asyncio.to_thread(client.jobs.get_jobs)
    assert [(j["ID"], j["Status"]) for j in listed] == [("ok-job", "dead")]
    assert listed[0]["JobSummary"]["Summary"]["step"]["Complete"] == 1
    assert listed[0]["ParameterizedJob"] is False

    # Re-registering the unchanged job creates an evaluation but runs nothing again.
    again = await asyncio.to_thread(client.job.register_job, "ok-job", {"Job": job})
    assert again["JobModifyIndex"] == registered["JobModifyIndex"]
    await eventually(
        lambda: _eval_status(api, again["EvalID"], "complete"),
    )
    assert len(await job_allocations(api, "ok-job")) == 1
    assert (await api.ok("GET", "/v1/job/ok-job"))["Version"] == 0


async def _eval_status(api: Api, eval_id: str, status: str) -> bool:
    evaluation = await api.ok("GET", f"/v1/evaluation/{eval_id}")
    return bool(evaluation["Status"] == status)


async def test_a_job_that_fails(api: Api) -> None:
    await api.ok("PUT", "/v1/jobs", json_body={"Job": batch_job("bad-job", "exit 3")})
    await wait_job_status(api, "bad-job", "dead")
    (stub,) = await job_allocations(api, "bad-job")
    assert stub["ClientStatus"] == "failed"
    assert stub["NextAllocation"] == ""
    allocation = await api.ok("GET", f"/v1/allocation/{stub['ID']}")
    task = main_task(allocation)
    assert task["Failed"] is True
    types = event_types(allocation)
    assert types[-2:] == ["Terminated", "Not Restarting"]
    terminated = next(e for e in task["Events"] if e["Type"] == "Terminated")
    assert terminated["Details"]["exit_code"] == "3"


async def test_a_job_that_restarts_in_place(api: Api) -> None:
    job = batch_job("restart-job", "exit 1", restart_attempts=2, restart_delay_ns=100_000_000)
    await api.ok("PUT", "/v1/jobs", json_body={"Job": job})
    await wait_job_status(api, "restart-job", "dead")
    (stub,) = await job_allocations(api, "restart-job")
    allocation = await api.ok("GET", f"/v1/allocation/{stub['ID']}")
    task = main_task(allocation)
    assert task["Restarts"] == 2
    assert task["Failed"] is True
    assert event_types(allocation).count("Restarting") == 2
    assert allocation["ClientStatus"] == "failed"


async def test_a_job_that_is_rescheduled(api: Api) -> None:
    job = batch_job(
        "resched-job",
        "exit 1",
        reschedule={
            "Attempts": 1,
            "Interval": 3_600_000_000_000,
            "Delay": 5_000_000_000,
            "DelayFunction": "constant",
            "Unlimited": False,
        },
    )
    await api.ok("PUT", "/v1/jobs", json_body={"Job": job})

    async def two_allocations() -> list[dict[str, Any]] | None:
        allocs = await job_allocations(api, "resched-job")
        return allocs if len(allocs) == 2 else None

    await eventually(two_allocations, timeout=30)
    await wait_job_status(api, "resched-job", "dead", timeout=30)
    first, second = await job_allocations(api, "resched-job")
    first_full = await api.ok("GET", f"/v1/allocation/{first['ID']}")
    second_full = await api.ok("GET", f"/v1/allocation/{second['ID']}")
    assert first_full["NextAllocation"] == second["ID"]
    assert first_full["DesiredStatus"] == "stop"
    assert second_full["PreviousAllocation"] == first["ID"]
    assert second_full["RescheduleTracker"]["Events"][0]["PrevAllocID"] == first["ID"]
    assert second_full["ClientStatus"] == "failed"
    assert second_full["NextAllocation"] == ""
    assert second_full["Name"] == first_full["Name"]


async def test_a_job_that_cannot_be_placed(api: Api) -> None:
    registered = await api.ok(
        "PUT", "/v1/jobs", json_body={"Job": batch_job("docker-job", "true", driver="docker")}
    )

    async def evaluated() -> dict[str, Any] | None:
        evaluation = await api.ok("GET", f"/v1/evaluation/{registered['EvalID']}")
        return evaluation if evaluation["Status"] == "complete" else None

    evaluation = await eventually(evaluated)
    failed = evaluation["FailedTGAllocs"]["step"]
    assert failed["ConstraintFiltered"] == {"missing drivers": 1}
    assert evaluation["BlockedEval"]
    blocked = await api.ok("GET", f"/v1/evaluation/{evaluation['BlockedEval']}")
    assert blocked["Status"] == "blocked"
    assert blocked["TriggeredBy"] == "queued-allocs"
    job = await api.ok("GET", "/v1/job/docker-job")
    assert job["Status"] == "pending"
    assert await job_allocations(api, "docker-job") == []
    summary = await api.ok("GET", "/v1/job/docker-job/summary")
    assert summary["Summary"]["step"]["Queued"] == 1
    related = await api.ok(
        "GET", f"/v1/evaluation/{registered['EvalID']}", params={"related": "true"}
    )
    assert [e["ID"] for e in related["RelatedEvals"]] == [evaluation["BlockedEval"]]


async def test_a_parameterized_job_is_dispatched(agent: DevAgent, api: Api) -> None:
    parent = batch_job(
        "render",
        'echo "run=$NOMAD_META_run_id"; cat "$NOMAD_TASK_DIR/input.txt"',
        meta={"owner": "ci"},
        parameterized={"Payload": "optional", "MetaRequired": ["run_id"]},
    )
    parent["TaskGroups"][0]["Tasks"][0]["DispatchPayload"] = {"File": "input.txt"}
    registered = await api.ok("PUT", "/v1/job/render", json_body={"Job": parent})
    assert registered["EvalID"] == ""
    assert (await api.ok("GET", "/v1/job/render"))["Status"] == "running"
    client = python_nomad(agent)
    payload = base64.b64encode(b"hello payload\n").decode()
    dispatched = await asyncio.to_thread(
        client.job.dispatch_job, "render", payload, {"run_id": "r1"}
    )
    child_id = dispatched["DispatchedJobID"]
    assert child_id.startswith("render/dispatch-")
    assert dispatched["EvalID"]
    # The child's ID holds a "/": the routes match by suffix, escaped or not.
    child = await wait_job_status(api, child_id, "dead")
    assert child["ParentID"] == "render"
    assert child["Dispatched"] is True
    assert child["Meta"] == {"owner": "ci", "run_id": "r1"}
    escaped = child_id.replace("/", "%2F")
    (stub,) = await api.ok("GET", f"/v1/job/{escaped}/allocations")
    assert stub["ClientStatus"] == "complete"
    output = await api.ok(
        "GET",
        f"/v1/client/fs/logs/{stub['ID']}",
        params={"task": "main", "type": "stdout", "plain": "true"},
    )
    assert output == "run=r1\nhello payload\n"
    summary = await api.ok("GET", "/v1/job/render/summary")
    assert summary["Children"]["Dead"] == 1
    status, _, text = await api.put("/v1/job/render/dispatch", json_body={"Meta": {"other": "x"}})
    assert status == 500
    assert "unpermitted metadata keys" in text
    status, _, text = await api.put(
        "/v1/job/render/dispatch", json_body={"JobID": "nope", "Meta": {"run_id": "x"}}
    )
    assert (status, text) == (400, "Job ID does not match")
    first = await api.ok(
        "PUT",
        "/v1/job/render/dispatch",
        params={"idempotency_token": "tok"},
        json_body={"Meta": {"run_id": "r2"}},
    )
    second = await api.ok(
        "PUT",
        "/v1/job/render/dispatch",
        params={"idempotency_token": "tok"},
        json_body={"Meta": {"run_id": "r2"}},
    )
    assert first["DispatchedJobID"] == second["DispatchedJobID"]


async def test_a_job_stopped_mid_run(agent: DevAgent, api: Api) -> None:
    await api.ok("PUT", "/v1/jobs", json_body={"Job": batch_job("long-job", "sleep 60")})
    await wait_job_status(api, "long-job", "running")

    async def running_alloc() -> dict[str, Any] | None:
        allocs = await job_allocations(api, "long-job")
        return allocs[0] if allocs and allocs[0]["ClientStatus"] == "running" else None

    stub = await eventually(running_alloc)
    client = python_nomad(agent)
    stopped = await asyncio.to_thread(client.job.deregister_job, "long-job")
    assert stopped["EvalID"]
    job = await wait_job_status(api, "long-job", "dead")
    assert job["Stop"] is True
    assert job["Version"] == 1

    # As in Nomad, the job is dead once the allocation is desired-stop; the client's
    # "complete" follows when the task has been killed.
    async def completed() -> dict[str, Any] | None:
        allocation = await api.ok("GET", f"/v1/allocation/{stub['ID']}")
        return allocation if allocation["ClientStatus"] == "complete" else None

    allocation = await eventually(completed)
    assert allocation["DesiredStatus"] == "stop"
    assert allocation["DesiredDescription"] == "alloc not needed due to job update"
    assert main_task(allocation)["Failed"] is False
    types = event_types(allocation)
    assert types.index("Killing") < types.index("Killed")
    # Purge: the job is gone, the allocation stays readable.
    purged = await api.ok("DELETE", "/v1/job/long-job", params={"purge": "true"})
    assert purged["Index"] > 0
    status, _, text = await api.get("/v1/job/long-job")
    assert (status, text) == (404, "job not found")
    assert (await api.get(f"/v1/allocation/{stub['ID']}"))[0] == 200
    # Deregistering what does not exist is a no-op.
    missing = await api.ok("DELETE", "/v1/job/never-was")
    assert missing["EvalID"] == ""


async def test_alloc_stop_places_a_replacement(api: Api) -> None:
    await api.ok("PUT", "/v1/jobs", json_body={"Job": batch_job("replace-job", "sleep 60")})

    async def running_alloc() -> dict[str, Any] | None:
        allocs = await job_allocations(api, "replace-job")
        return allocs[0] if allocs and allocs[0]["ClientStatus"] == "running" else None

    stub = await eventually(running_alloc)
    result = await api.ok("POST", f"/v1/allocation/{stub['ID']}/stop")
    assert set(result) >= {"EvalID", "Index"}

    async def replaced() -> list[dict[str, Any]] | None:
        allocs = await job_allocations(api, "replace-job")
        return allocs if len(allocs) == 2 else None

    await eventually(replaced)
    await api.ok("DELETE", "/v1/job/replace-job")
    await wait_job_status(api, "replace-job", "dead")
    status, _, text = await api.call("POST", "/v1/allocation/unknown/stop")
    assert (status, text) == (404, "alloc not found")


async def test_register_validation_errors(api: Api) -> None:
    status, _, text = await api.put("/v1/jobs", json_body={})
    assert (status, text) == (400, "Job must be specified")
    status, _, text = await api.put("/v1/jobs", json_body={"Job": {"Name": "x"}})
    assert (status, text) == (400, "Job ID hasn't been provided")
    status, _, text = await api.put("/v1/job/a", json_body={"Job": {"ID": "b"}})
    assert (status, text) == (400, "Job ID does not match name")
    status, _, text = await api.put(
        "/v1/jobs", json_body={"Job": batch_job("p", "true"), "EvalPriority": 101}
    )
    assert (status, text) == (400, "Eval priority must be between 1 and 100 inclusively")
    status, _, text = await api.put("/v1/jobs", json_body={"Job": {"ID": "x", "TaskGroups": []}})
    assert status == 500
    assert "Missing job task groups" in text
    status, _, text = await api.put(
        "/v1/jobs", params={"namespace": "nowhere"}, json_body={"Job": batch_job("n", "true")}
    )
    assert (status, text) == (500, 'job "n" is in nonexistent namespace "nowhere"')


async def test_enforce_index(api: Api) -> None:
    job = batch_job("cas-job", "true")
    first = await api.ok(
        "PUT", "/v1/jobs", json_body={"Job": job, "EnforceIndex": True, "JobModifyIndex": 0}
    )
    status, _, text = await api.put(
        "/v1/jobs", json_body={"Job": job, "EnforceIndex": True, "JobModifyIndex": 0}
    )
    assert (status, text) == (500, "Enforcing job modify index 0: job already exists")
    changed = {**job, "Meta": {"nonce": "2"}}
    second = await api.ok(
        "PUT",
        "/v1/jobs",
        json_body={
            "Job": changed,
            "EnforceIndex": True,
            "JobModifyIndex": first["JobModifyIndex"],
        },
    )
    assert second["JobModifyIndex"] > first["JobModifyIndex"]
    versions = await api.ok("GET", "/v1/job/cas-job/versions")
    assert [v["Version"] for v in versions["Versions"]] == [1, 0]


async def test_validate_job(api: Api) -> None:
    good = await api.ok("PUT", "/v1/validate/job", json_body={"Job": batch_job("v", "true")})
    assert good["ValidationErrors"] is None
    assert good["Error"] == ""
    bad = await api.ok("PUT", "/v1/validate/job", json_body={"Job": {"ID": "v", "TaskGroups": []}})
    assert "Missing job task groups" in bad["ValidationErrors"]
    assert bad["Error"].startswith("1 error occurred")


JOBSPEC = """
variable "greeting" {
  type    = string
  default = "hi"
}

job "hcl-job" {
  type        = "batch"
  datacenters = ["dc1"]
  meta {
    owner = "ci"
  }
  group "step" {
    count = 1
    restart {
      attempts = 0
      mode     = "fail"
    }
    task "main" {
      driver = "raw_exec"
      config {
        command = "/bin/sh"
        args    = ["-c", "echo ${var.greeting} ${NOMAD_ALLOC_ID}"]
      }
      env {
        GREETING = var.greeting
      }
      template {
        data        = <<EOT
{{ env "NOMAD_ALLOC_ID" }}
EOT
        destination = "local/alloc_id"
      }
      kill_timeout = "10s"
      resources {
        cpu    = 200
        memory = 128
      }
    }
  }
}
"""


async def test_jobs_parse_with_variables_and_canonicalize(api: Api) -> None:
    job = await api.ok(
        "PUT",
        "/v1/jobs/parse",
        json_body={"JobHCL": JOBSPEC, "Variables": 'greeting = "hello"\n', "Canonicalize": False},
    )
    assert job["ID"] == "hcl-job"
    assert job["Type"] == "batch"
    assert job["Meta"] == {"owner": "ci"}
    (group,) = job["TaskGroups"]
    (task,) = group["Tasks"]
    assert task["Config"]["args"] == ["-c", "echo hello ${NOMAD_ALLOC_ID}"]
    assert task["Env"] == {"GREETING": "hello"}
    assert task["KillTimeout"] == 10_000_000_000
    assert task["Resources"] == {"CPU": 200, "MemoryMB": 128}
    assert task["Templates"] == [
        {"EmbeddedTmpl": '{{ env "NOMAD_ALLOC_ID" }}\n', "DestPath": "local/alloc_id"}
    ]
    assert group["RestartPolicy"] == {"Attempts": 0, "Mode": "fail"}
    canonical = await api.ok(
        "PUT", "/v1/jobs/parse", json_body={"JobHCL": JOBSPEC, "Canonicalize": True}
    )
    assert canonical["Priority"] == 50
    assert canonical["Namespace"] == "default"
    assert canonical["TaskGroups"][0]["Tasks"][0]["Config"]["args"][1].startswith("echo hi")
    # The parsed job registers and runs.
    await api.ok("PUT", "/v1/jobs", json_body={"Job": canonical})
    await wait_job_status(api, "hcl-job", "dead")
    (stub,) = await job_allocations(api, "hcl-job")
    assert stub["ClientStatus"] == "complete"


async def test_jobs_parse_errors(api: Api) -> None:
    status, _, text = await api.put("/v1/jobs/parse", json_body={"JobHCL": ""})
    assert (status, text) == (400, "Job spec is empty")
    status, _, text = await api.put("/v1/jobs/parse", json_body={"JobHCL": 'job "x" {\n a = \n}'})
    assert status == 400
    assert text.startswith("Failed to parse job: ")
    status, _, text = await api.put(
        "/v1/jobs/parse", json_body={"JobHCL": 'job "x" {\n  bogus = 1\n}\n'}
    )
    assert status == 400
    assert 'An argument named "bogus" is not expected here' in text
    status, _, text = await api.put(
        "/v1/jobs/parse",
        json_body={"JobHCL": 'variable "v" {}\njob "x" {\n  name = var.v\n}\n'},
    )
    assert status == 400
    assert 'Unset variable "v"' in text


async def test_lists_filter_prefix_and_paging(api: Api) -> None:
    for job_id in ("list-a", "list-b", "other"):
        await api.ok(
            "PUT",
            "/v1/jobs",
            json_body={"Job": batch_job(job_id, "true", meta={"run": job_id})},
        )
    prefixed = await api.ok("GET", "/v1/jobs", params={"prefix": "list-"})
    assert [j["ID"] for j in prefixed] == ["list-a", "list-b"]
    filtered = await api.ok("GET", "/v1/jobs", params={"filter": 'Meta.run == "other"'})
    assert [j["ID"] for j in filtered] == ["other"]
    filtered = await api.ok(
        "GET", "/v1/jobs", params={"filter": 'Meta.run == "list-a" or ID == "other"'}
    )
    assert [j["ID"] for j in filtered] == ["list-a", "other"]
    status, headers, page = await api.get("/v1/jobs", params={"per_page": "2"})
    assert [j["ID"] for j in page] == ["list-a", "list-b"]
    rest = await api.ok(
        "GET", "/v1/jobs", params={"per_page": "2", "next_token": headers["X-Nomad-NextToken"]}
    )
    assert [j["ID"] for j in rest] == ["other"]
    with_meta = await api.ok("GET", "/v1/jobs", params={"prefix": "other", "meta": "true"})
    assert with_meta[0]["Meta"] == {"run": "other"}
    everywhere = await api.ok("GET", "/v1/jobs", params={"namespace": "*"})
    assert len(everywhere) == 3
    for job_id in ("list-a", "list-b", "other"):
        await wait_job_status(api, job_id, "dead")
    allocations = await api.ok("GET", "/v1/allocations")
    assert len(allocations) == 3
    reverse = await api.ok("GET", "/v1/allocations", params={"reverse": "true"})
    assert [a["ID"] for a in reverse] == [a["ID"] for a in reversed(allocations)]
    prefix = allocations[0]["ID"][:8]
    assert allocations[0]["ID"] in [
        a["ID"] for a in await api.ok("GET", "/v1/allocations", params={"prefix": prefix})
    ]
    no_states = await api.ok("GET", "/v1/allocations", params={"task_states": "false"})
    assert all(a["TaskStates"] is None for a in no_states)
    evaluations = await api.ok("GET", "/v1/evaluations", params={"job": "other"})
    assert {e["JobID"] for e in evaluations} == {"other"}
    status, _, text = await api.get(
        "/v1/evaluations", params={"job": "other", "filter": 'Status == "complete"'}
    )
    assert (status, text) == (400, "Filter expression cannot be used with other filter parameters")


async def test_blocking_job_read_wakes_when_the_job_finishes(api: Api) -> None:
    await api.ok("PUT", "/v1/jobs", json_body={"Job": batch_job("watched", "sleep 0.5")})
    index = 0
    statuses = []
    while not statuses or statuses[-1] != "dead":
        status, headers, job = await api.get(
            "/v1/job/watched", params={"index": str(index), "wait": "20s"}
        )
        assert status == 200
        assert int(headers["X-Nomad-Index"]) == job["ModifyIndex"]
        assert job["ModifyIndex"] > index
        index = job["ModifyIndex"]
        statuses.append(job["Status"])
    assert statuses[-1] == "dead"


async def test_python_nomad_not_found(agent: DevAgent) -> None:
    client = python_nomad(agent)
    with pytest.raises(nomad_errors.URLNotFoundNomadException):
        await asyncio.to_thread(client.job.get_job, "nope")


async def test_a_restart_keeps_finished_allocations_and_marks_lost_work(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with running_agent(data_dir=data_dir) as agent, api_client(agent) as api:
        await api.ok("PUT", "/v1/jobs", json_body={"Job": batch_job("done", "echo kept")})
        await wait_job_status(api, "done", "dead")
        (done,) = await job_allocations(api, "done")
        await api.ok("PUT", "/v1/jobs", json_body={"Job": batch_job("busy", "sleep 60")})

        async def busy_running() -> dict[str, Any] | None:
            allocs = await job_allocations(api, "busy")
            return allocs[0] if allocs and allocs[0]["ClientStatus"] == "running" else None

        busy = await eventually(busy_running)
        await api.ok("PUT", "/v1/var/kept", json_body={"Items": {"k": "v"}})
    async with running_agent(data_dir=data_dir) as agent, api_client(agent) as api:
        kept = await api.ok("GET", f"/v1/allocation/{done['ID']}")
        assert kept["ClientStatus"] == "complete"
        logs = await api.ok(
            "GET",
            f"/v1/client/fs/logs/{done['ID']}",
            params={"task": "main", "type": "stdout", "plain": "true"},
        )
        assert logs == "kept\n"
        lost = await api.ok("GET", f"/v1/allocation/{busy['ID']}")
        assert lost["ClientStatus"] in ("lost", "failed")
        assert lost["ClientStatus"] != "complete"
        assert (await api.ok("GET", "/v1/var/kept"))["Items"] == {"k": "v"}
        await api.ok("DELETE", "/v1/job/busy", params={"purge": "true"})


async def test_job_allocations_query_wakes_only_for_that_job(api: Api) -> None:
    await api.ok("PUT", "/v1/jobs", json_body={"Job": batch_job("quiet", "true")})
    await wait_job_status(api, "quiet", "dead")
    _, headers, _ = await api.get("/v1/job/quiet/allocations")
    index = int(headers["X-Nomad-Index"])
    waiter = asyncio.create_task(
        api.get("/v1/job/quiet/allocations", params={"index": str(index), "wait": "20s"})
    )
    # Another job's allocations move the table's index but do not answer the query...
    await api.ok("PUT", "/v1/jobs", json_body={"Job": batch_job("noisy", "true")})
    await wait_job_status(api, "noisy", "dead")
    assert not waiter.done()
    # ...a new allocation of this job does (a changed spec runs it again).
    changed = batch_job("quiet", "true", meta={"nonce": "2"})
    await api.ok("PUT", "/v1/jobs", json_body={"Job": changed})
    status, headers, allocs = await asyncio.wait_for(waiter, 10)
    assert status == 200
    assert len(allocs) == 2
    assert int(headers["X-Nomad-Index"]) > index
