"""Engine: job registration, statuses, placement failures, versions, deregistration."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from engine_support import (
    MS,
    SECOND,
    allocs,
    batch_job,
    eval_complete,
    event_types,
    job,
    job_dead,
    running_engine,
    shell_task,
    wait_until,
)

from nomad_pipeline.devagent.state import Change, NomadHTTPError, row_key


async def test_successful_batch_job_runs_once_and_ends_dead(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        reply = await engine.register_job("default", batch_job("ok", "echo hello; exit 0"))
        assert reply["EvalID"] and reply["JobModifyIndex"] == reply["EvalCreateIndex"]
        await wait_until(engine, lambda: job_dead(engine, "ok"))
        [alloc] = allocs(engine, "ok")
        assert alloc["ClientStatus"] == "complete"
        assert alloc["DesiredStatus"] == "run"
        assert alloc["Name"] == "ok.step[0]"
        state = alloc["TaskStates"]["main"]
        assert state["State"] == "dead" and not state["Failed"]
        assert event_types(alloc) == ["Received", "Task Setup", "Started", "Terminated"]
        assert state["Events"][-1]["Details"]["exit_code"] == "0"
        log = engine.alloc_dir(alloc["ID"]) / "alloc" / "logs" / "main.stdout.0"
        assert log.read_text() == "hello\n"
        evaluation = engine.state.get("evals", reply["EvalID"])
        assert evaluation is not None and evaluation["Status"] == "complete"
        assert job(engine, "ok")["Version"] == 0


async def test_failure_without_restarts_fails_the_allocation(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        await engine.register_job("default", batch_job("bad", "echo oops >&2; exit 3"))
        await wait_until(engine, lambda: job_dead(engine, "bad"))
        [alloc] = allocs(engine, "bad")
        assert alloc["ClientStatus"] == "failed"
        assert alloc["ClientDescription"] == "Failed tasks"
        state = alloc["TaskStates"]["main"]
        assert state["Failed"] and state["State"] == "dead"
        assert event_types(alloc)[-2:] == ["Terminated", "Not Restarting"]
        terminated, not_restarting = state["Events"][-2:]
        assert terminated["ExitCode"] == 3 and terminated["Details"]["exit_code"] == "3"
        assert terminated["DisplayMessage"] == "Exit Code: 3"
        assert not_restarting["DisplayMessage"] == "Policy allows no restarts"
        assert not_restarting["FailsTask"]
        assert alloc["NextAllocation"] == ""
        stderr = engine.alloc_dir(alloc["ID"]) / "alloc" / "logs" / "main.stderr.0"
        assert stderr.read_text() == "oops\n"


async def test_restart_policy_restarts_in_place_then_gives_up(tmp_path: Path) -> None:
    restart = {"Attempts": 2, "Interval": 3600 * SECOND, "Delay": 100 * MS, "Mode": "fail"}
    async with running_engine(tmp_path) as engine:
        await engine.register_job("default", batch_job("flaky", "exit 1", restart=restart))
        await wait_until(engine, lambda: job_dead(engine, "flaky"))
        [alloc] = allocs(engine, "flaky")
        state = alloc["TaskStates"]["main"]
        assert alloc["ClientStatus"] == "failed"
        assert state["Restarts"] == 2 and state["LastRestart"]
        types = event_types(alloc)
        assert len(types) == 10  # the oldest event (Received) rotated out
        assert types.count("Restarting") == 2 and types.count("Started") == 3
        restarting = next(e for e in state["Events"] if e["Type"] == "Restarting")
        assert 100 * MS <= restarting["StartDelay"] <= 125 * MS
        assert restarting["DisplayMessage"].startswith("Task restarting in ")
        assert state["Events"][-1]["DisplayMessage"] == (
            'Exceeded allowed attempts 2 in interval 1h0m0s and mode is "fail"'
        )


async def test_exit_zero_is_never_restarted_in_batch(tmp_path: Path) -> None:
    restart = {"Attempts": 3, "Interval": 3600 * SECOND, "Delay": 100 * MS, "Mode": "fail"}
    async with running_engine(tmp_path) as engine:
        await engine.register_job("default", batch_job("once", "exit 0", restart=restart))
        await wait_until(engine, lambda: job_dead(engine, "once"))
        [alloc] = allocs(engine, "once")
        assert alloc["ClientStatus"] == "complete"
        assert alloc["TaskStates"]["main"]["Restarts"] == 0


async def test_missing_driver_blocks_the_job_with_failed_tg_allocs(tmp_path: Path) -> None:
    docker = {"Name": "main", "Driver": "docker", "Config": {"image": "alpine"}}
    async with running_engine(tmp_path) as engine:
        reply = await engine.register_job("default", batch_job("dock", tasks=[docker]))
        evaluation = await wait_until(engine, lambda: eval_complete(engine, reply["EvalID"]))
        failed = evaluation["FailedTGAllocs"]["step"]
        assert failed["ConstraintFiltered"] == {"missing drivers": 1}
        assert failed["NodesEvaluated"] == 1 and failed["NodesFiltered"] == 1
        assert evaluation["QueuedAllocations"] == {"step": 1}
        blocked = engine.state.get("evals", evaluation["BlockedEval"])
        assert blocked is not None
        assert blocked["Status"] == "blocked" and blocked["TriggeredBy"] == "queued-allocs"
        assert allocs(engine, "dock") == []
        assert job(engine, "dock")["Status"] == "pending"
        assert engine.job_summary("default", "dock")["Summary"]["step"]["Queued"] == 1


async def test_resource_exhaustion_reports_the_dimension(tmp_path: Path) -> None:
    greedy = shell_task("exit 0", Resources={"CPU": 100, "MemoryMB": 10**9})
    async with running_engine(tmp_path) as engine:
        reply = await engine.register_job("default", batch_job("greedy", tasks=[greedy]))
        evaluation = await wait_until(engine, lambda: eval_complete(engine, reply["EvalID"]))
        failed = evaluation["FailedTGAllocs"]["step"]
        assert failed["DimensionExhausted"] == {"memory": 1}
        assert failed["NodesExhausted"] == 1
        assert job(engine, "greedy")["Status"] == "pending"


async def test_unchanged_reregister_does_not_rerun_a_completed_batch_job(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        spec = batch_job("same", "exit 0")
        first = await engine.register_job("default", spec)
        await wait_until(engine, lambda: job_dead(engine, "same"))
        second = await engine.register_job("default", spec)
        assert second["EvalID"] != first["EvalID"]
        assert second["JobModifyIndex"] == first["JobModifyIndex"]
        await wait_until(engine, lambda: eval_complete(engine, second["EvalID"]))
        assert len(allocs(engine, "same")) == 1
        assert job(engine, "same")["Version"] == 0
        assert job(engine, "same")["Status"] == "dead"
        assert len(engine.job_versions("default", "same")) == 1

        changed = {**spec, "Meta": {"nonce": "2"}}
        third = await engine.register_job("default", changed)
        assert third["JobModifyIndex"] > first["JobModifyIndex"]
        await wait_until(
            engine, lambda: len(allocs(engine, "same")) == 2 and job_dead(engine, "same")
        )
        assert job(engine, "same")["Version"] == 1
        assert [v["Version"] for v in engine.job_versions("default", "same")] == [1, 0]
        assert sorted(a["JobVersion"] for a in allocs(engine, "same")) == [0, 1]


async def test_validation_errors_are_nomads_texts(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        with pytest.raises(NomadHTTPError) as caught:
            await engine.register_job("default", {"ID": "x y", "Type": "batch"})
        assert caught.value.status == 500
        assert caught.value.text == (
            "2 errors occurred:\n\t* Job ID contains a space\n\t* Missing job task groups\n\n"
        )
        bad_task = batch_job("t", tasks=[{"Name": "alloc", "Driver": ""}])
        _, errors = engine.validate_job(bad_task)
        assert len(errors) == 1
        assert errors[0].startswith("Task group step validation failed: 1 error occurred:")
        assert 'Task cannot be named "alloc"' in errors[0]
        assert "Missing task driver" in errors[0]
        with pytest.raises(NomadHTTPError, match="nonexistent namespace"):
            await engine.register_job("nope", batch_job("ns"))


async def test_enforce_index_is_checked(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        with pytest.raises(
            NomadHTTPError, match="Enforcing job modify index 5: job does not exist"
        ):
            await engine.register_job(
                "default", batch_job("cas"), enforce_index=True, job_modify_index=5
            )
        reply = await engine.register_job("default", batch_job("cas"), enforce_index=True)
        with pytest.raises(NomadHTTPError, match="job already exists"):
            await engine.register_job("default", batch_job("cas"), enforce_index=True)
        index = reply["JobModifyIndex"]
        with pytest.raises(NomadHTTPError, match=f"conflicting job modify index: {index}"):
            await engine.register_job(
                "default", batch_job("cas"), enforce_index=True, job_modify_index=index + 1
            )
        await engine.register_job(
            "default", batch_job("cas", "exit 1"), enforce_index=True, job_modify_index=index
        )


async def test_deregister_kills_the_task_and_completes_the_allocation(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        await engine.register_job("default", batch_job("long", "echo started; exec sleep 30"))
        await wait_until(
            engine, lambda: (a := allocs(engine, "long")) and a[0]["ClientStatus"] == "running"
        )
        reply = await engine.deregister_job("default", "long", purge=False)
        assert reply["EvalID"]
        # As in Nomad, the job is dead as soon as nothing is desired to run any more.
        stopped_job = await wait_until(engine, lambda: job_dead(engine, "long"))
        assert stopped_job["Stop"] and stopped_job["Version"] == 1
        alloc = await wait_until(
            engine, lambda: (a := allocs(engine, "long")[0])["ClientStatus"] == "complete" and a
        )
        assert alloc["DesiredStatus"] == "stop"
        assert alloc["DesiredDescription"] == "alloc not needed due to job update"
        assert alloc["ClientStatus"] == "complete"
        state = alloc["TaskStates"]["main"]
        assert not state["Failed"]
        assert event_types(alloc)[-3:] == ["Killing", "Terminated", "Killed"]
        killing, terminated, _ = state["Events"][-3:]
        assert killing["DisplayMessage"] == "Sent interrupt. Waiting 5s before force killing"
        assert terminated["Signal"] == 2 and terminated["ExitCode"] == 130


async def test_kill_escalates_to_sigkill_after_kill_timeout(tmp_path: Path) -> None:
    stubborn = shell_task("trap '' INT; echo ready; sleep 30 & wait", KillTimeout=200 * MS)
    async with running_engine(tmp_path) as engine:
        await engine.register_job("default", batch_job("stubborn", tasks=[stubborn]))
        running = await wait_until(
            engine,
            lambda: (
                (a := allocs(engine, "stubborn")) and a[0]["ClientStatus"] == "running" and a[0]
            ),
        )
        # The shell ignores SIGINT only once it printed "ready"; kill it after that.
        stdout = engine.alloc_dir(running["ID"]) / "alloc" / "logs" / "main.stdout.0"
        async with asyncio.timeout(10):
            while "ready" not in stdout.read_text():
                await engine.wait_for_log_write(running["ID"], 1.0)
        await engine.deregister_job("default", "stubborn", purge=True)
        assert engine.state.get("jobs", row_key("default", "stubborn")) is None
        alloc = await wait_until(
            engine,
            lambda: (
                (a := engine.job_allocations("default", "stubborn", all_instances=True))
                and a[0]["ClientStatus"] == "complete"
                and a[0]
            ),
        )
        killing, terminated, killed = alloc["TaskStates"]["main"]["Events"][-3:]
        assert killing["DisplayMessage"] == "Sent interrupt. Waiting 200ms before force killing"
        assert terminated["Signal"] == 9
        assert killed["Type"] == "Killed"


async def test_deregister_of_an_unknown_job_is_a_no_op(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        reply = await engine.deregister_job("default", "ghost", purge=True)
        assert reply["EvalID"] == "" and reply["JobModifyIndex"] == 0


async def test_purge_then_register_runs_the_job_again(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        spec = batch_job("again", "exit 0")
        await engine.register_job("default", spec)
        await wait_until(engine, lambda: job_dead(engine, "again"))
        await engine.deregister_job("default", "again", purge=True)
        await engine.register_job("default", spec)
        await wait_until(engine, lambda: job_dead(engine, "again") and allocs(engine, "again"))
        [current] = allocs(engine, "again")
        every = engine.job_allocations("default", "again", all_instances=True)
        assert len(every) == 2 and current["ID"] == every[1]["ID"]
        assert job(engine, "again")["Version"] == 0


async def test_stopped_job_registered_again_is_a_new_version(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        spec = batch_job("revive", "exit 0")
        await engine.register_job("default", spec)
        await wait_until(engine, lambda: job_dead(engine, "revive"))
        await engine.deregister_job("default", "revive", purge=False)
        assert job(engine, "revive")["Stop"]
        await engine.register_job("default", spec)
        await wait_until(
            engine, lambda: job_dead(engine, "revive") and len(allocs(engine, "revive")) == 2
        )
        revived = job(engine, "revive")
        assert revived["Version"] == 2 and not revived["Stop"]


async def test_namespace_capabilities_restrict_drivers(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        index = engine.state.index + 1
        await engine.state.commit(
            [
                Change(
                    "namespaces",
                    "locked",
                    {
                        "Name": "locked",
                        "Capabilities": {"DisabledTaskDrivers": ["raw_exec"]},
                        "CreateIndex": index,
                        "ModifyIndex": index,
                    },
                )
            ]
        )
        with pytest.raises(NomadHTTPError) as caught:
            await engine.register_job("locked", batch_job("nope"))
        assert caught.value.text == (
            'used task driver "raw_exec" in step[main] is not allowed in namespace locked'
        )


async def test_unmet_constraint_is_reported_like_nomad(tmp_path: Path) -> None:
    windows = {"LTarget": "${attr.kernel.name}", "RTarget": "windows", "Operand": "="}
    async with running_engine(tmp_path) as engine:
        reply = await engine.register_job("default", batch_job("win", Constraints=[windows]))
        evaluation = await wait_until(engine, lambda: eval_complete(engine, reply["EvalID"]))
        failed = evaluation["FailedTGAllocs"]["step"]
        assert failed["ConstraintFiltered"] == {"${attr.kernel.name} = windows": 1}
        assert allocs(engine, "win") == []
        assert job(engine, "win")["Status"] == "pending"
