"""The runner routes over real HTTP: authentication, the plan, idempotent reports."""

from __future__ import annotations

from typing import Any

import aiohttp
from runner_harness import Controller

from nomad_pipeline.controller.logstore import LogStore
from nomad_pipeline.controller.runnertoken import runner_token

PLAN = "/v1/runner/runs/default/01run"


def auth(controller: Controller, run: str = "01run") -> dict[str, str]:
    return {"Authorization": f"Bearer {runner_token(controller.secret, 'default', run)}"}


def event(seq: int, type_: str, step: str = "build", **fields: Any) -> dict[str, Any]:
    return {"seq": seq, "step": step, "type": type_, "time": "2026-01-01T00:00:00Z", **fields}


async def report(
    session: aiohttp.ClientSession, controller: Controller, events: list[dict[str, Any]]
) -> tuple[int, Any]:
    async with session.post(
        f"{controller.address}{PLAN}/report", json={"events": events}, headers=auth(controller)
    ) as response:
        return response.status, await response.json()


async def test_tokens_open_only_their_own_run(controller: Controller) -> None:
    await controller.create_run([{"name": "build", "run": "make"}])
    await controller.create_run([{"name": "build", "run": "make"}], name="02other")
    async with aiohttp.ClientSession() as session:
        for headers in (
            {},
            {"Authorization": "Basic abc"},
            {"Authorization": "Bearer " + "0" * 64},
            auth(controller, "02other"),
        ):
            async with session.get(f"{controller.address}{PLAN}", headers=headers) as response:
                assert response.status == 401
                assert (await response.json())["error"]["reason"] == "Unauthorized"
        async with session.get(f"{controller.address}{PLAN}", headers=auth(controller)) as r:
            assert r.status == 200


async def test_plan_carries_steps_dependencies_and_variables(controller: Controller) -> None:
    await controller.create_run(
        [
            {"name": "a", "run": "echo ${var.greeting}", "timeout": "1m30s", "retries": 2},
            {"name": "b", "run": "echo b", "needs": ["a"], "env": {"X": "${var.greeting}"}},
            {
                "name": "c",
                "run": "echo c",
                "needs": ["b"],
                "condition": 'steps.a.status == "failed"',
            },
            {"name": "d", "run": "echo d", "needs": []},
        ],
        variables={"target": "prod"},
        flow_variables=[{"name": "greeting", "default": "hello"}, {"name": "target"}],
    )
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{controller.address}{PLAN}", headers=auth(controller)) as response,
    ):
        plan = await response.json()
    assert [step["name"] for step in plan["steps"]] == ["a", "b", "c", "d"]
    a, b, c, d = plan["steps"]
    assert a["run"] == "echo ${var.greeting}"
    assert a["timeout_seconds"] == 90.0 and a["retries"] == 2 and a["after"] == []
    assert b["after"] == ["a"] and b["env"] == {"X": "${var.greeting}"}
    assert c["after"] == ["a", "b"] and c["condition"] == 'steps.a.status == "failed"'
    assert d["after"] == []
    assert plan["variables"] == {"greeting": "hello", "target": "prod"}
    assert plan["run_context"] == {
        "id": "01run",
        "name": "01run",
        "namespace": "default",
        "flow": "flow",
    }
    assert plan["trigger_context"] == {"type": "manual"}
    assert plan["last_seq"] == 0 and plan["completed"] == {}


async def test_reports_are_applied_once_in_order(controller: Controller) -> None:
    await controller.create_run([{"name": "build", "run": "make"}, {"name": "ship", "run": "s"}])
    first = [
        event(1, "started", attempt=1),
        event(2, "log", stream="stdout", data="compiling\n"),
        event(3, "log", stream="stderr", data="warning\n"),
    ]
    async with aiohttp.ClientSession() as session:
        assert await report(session, controller, first) == (
            200,
            {"last_seq": 3, "cancelled": False},
        )
        # The same batch again (the runner never saw the answer): nothing changes.
        assert await report(session, controller, first) == (
            200,
            {"last_seq": 3, "cancelled": False},
        )
        run = await controller.run()
        assert [(s.name, s.phase, s.attempts) for s in run.status.steps] == [
            ("build", "running", 1),
            ("ship", "pending", 0),
        ]
        version = run.metadata.resource_version

        # A log-only batch costs no store write.
        status, _ = await report(
            session, controller, [event(4, "log", stream="stdout", data="linking\n")]
        )
        assert status == 200
        assert (await controller.run()).metadata.resource_version == version

        overlapping = [
            event(4, "log", stream="stdout", data="linking\n"),
            event(5, "finished", phase="success", exit_code=0),
            event(6, "skipped", step="ship", message="condition is false"),
        ]
        assert (await report(session, controller, overlapping))[1]["last_seq"] == 6
        # A terminal phase is final: a late report cannot reopen the step.
        late = [event(7, "started", attempt=2), event(8, "finished", phase="failed", exit_code=1)]
        assert (await report(session, controller, late))[1]["last_seq"] == 8

    run = await controller.run()
    assert [(s.name, s.phase, s.exit_code) for s in run.status.steps] == [
        ("build", "success", 0),
        ("ship", "skipped", None),
    ]
    assert run.status.step("ship").message == "condition is false"  # type: ignore[union-attr]
    assert await controller.log("build") == "compiling\nlinking\n"
    assert await controller.log("build", "stderr") == "warning\n"
    assert controller.log_store.step_finished("default", "01run", "build")

    # A restarted controller (a new log store over the same directory) still knows the seq.
    restarted = LogStore(controller.data_dir / "logs")
    assert await restarted.report_seq("default", "01run") == 8


async def test_bad_reports_are_refused(controller: Controller) -> None:
    await controller.create_run([{"name": "build", "run": "make"}])
    async with aiohttp.ClientSession() as session:
        status, body = await report(session, controller, [event(1, "started", step="nope")])
        assert status == 400 and "nope" in body["error"]["message"]
        status, body = await report(session, controller, [{"seq": 0, "step": "build"}])
        assert status == 400 and body["error"]["reason"] == "Invalid"
    assert await controller.log_store.report_seq("default", "01run") == 0


async def test_the_ack_says_when_the_run_was_cancelled(controller: Controller) -> None:
    run = await controller.create_run([{"name": "build", "run": "make"}])
    cancelled = run.model_copy(deep=True)
    cancelled.spec.cancel = True
    await controller.store.update(cancelled)
    async with aiohttp.ClientSession() as session:
        status, body = await report(session, controller, [event(1, "started", attempt=1)])
    assert (status, body) == (200, {"last_seq": 1, "cancelled": True})
