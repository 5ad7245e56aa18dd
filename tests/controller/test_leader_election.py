"""Leader election: several controllers on one Nomad, one of them reconciling.

Real dev agent over HTTP, real ControllerApps on the nomad-vars backend, a real
``nomad-pipeline server --leader-elect`` subprocess where a process has to die abruptly. Leases
are Nomad's shortest (10s): renewals every ~1.3s, leadership given up after ~6.7s without one.
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from controller_api_helpers import API
from controller_process import ControllerProcess
from metric_samples import parse_samples, value
from shell_jobs import shell_job

from nomad_pipeline.app import ControllerApp, ControllerConfig
from nomad_pipeline.cli.main import main as cli_main
from nomad_pipeline.controller.leaderelection import (
    LEADER_LOCK_PATH,
    LeaderElector,
    LeaseTimings,
    go_duration,
    parse_lease,
)
from nomad_pipeline.devagent.server import DevAgent, DevAgentConfig
from nomad_pipeline.errors import Invalid, NotFound
from nomad_pipeline.nomad.client import NomadClient
from nomad_pipeline.resources.kinds import TERMINAL_PHASES, Run

LEASE = "10s"
TIMINGS = LeaseTimings.for_lease(parse_lease(LEASE))


async def eventually(
    probe: Callable[[], Any], *, deadline: float, what: str, interval: float = 0.05
) -> Any:
    """Poll ``probe`` (sync or async) until it returns something truthy; fail after
    ``deadline`` seconds naming ``what``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while True:
        value = probe()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > end:
            raise AssertionError(f"{what}: not within {deadline}s")
        await asyncio.sleep(interval)


async def lock_holder(nomad: NomadClient) -> dict[str, str]:
    """The lock variable's Items (who leads) when it is locked, else {}."""
    try:
        variable = await nomad.get_variable(LEADER_LOCK_PATH)
    except NotFound:
        return {}
    if not variable.get("Lock"):
        return {}
    items: dict[str, str] = variable.get("Items") or {}
    return items


def shell_step(name: str, script: str) -> dict[str, Any]:
    return {"name": name, "job": {"json": shell_job(script, name)}}


FLOW = {
    "apiVersion": "nomad-pipeline.io/v1",
    "kind": "Flow",
    "metadata": {"name": "build", "namespace": "default"},
    "spec": {
        "specification": {"steps": [shell_step("compile", "true"), shell_step("test", "true")]}
    },
}


@dataclass
class Cluster:
    nomad_address: str
    nomad: NomadClient
    http: aiohttp.ClientSession
    tmp_path: Path
    stack: AsyncExitStack

    def config(self, name: str) -> ControllerConfig:
        return ControllerConfig(
            data_dir=self.tmp_path / name,
            http_addr="127.0.0.1:0",
            nomad_addr=self.nomad_address,
            nomad_token="",
            state_backend="nomad-vars",
            leader_elect=True,
            leader_lease=LEASE,
        )

    async def controller(self, name: str) -> ControllerApp:
        app = ControllerApp(self.config(name))
        await app.start()
        self.stack.push_async_callback(app.stop)
        return app

    async def metric_leader(self, address: str) -> float | None:
        async with self.http.get(f"{address}/metrics") as response:
            text = await response.text()
        return value(parse_samples(text), "nomad_pipeline_leader")

    async def start_run(self, address: str) -> str:
        """Apply the flow (idempotent) and start a run through ``address``'s API."""
        async with self.http.put(f"{address}{API}/apply", json={"items": [FLOW]}) as response:
            assert response.status == 200, await response.text()
        async with self.http.post(
            f"{address}/v1/flows/build/run", json={"variables": {}}
        ) as response:
            body = await response.json()
            assert response.status == 201, body
            run_id: str = body["run_id"]
            return run_id

    async def finished_run(self, app: ControllerApp, name: str, deadline: float = 30.0) -> Run:
        async def ended() -> Run | None:
            run: Run = await app.store.get(Run, "default", name)
            return run if run.status.phase in TERMINAL_PHASES else None

        finished: Run = await eventually(ended, deadline=deadline, what=f"run {name} ends")
        return finished

    async def register_evaluations(self, run: Run) -> dict[str, int]:
        """Per step: how many ``job-register`` evaluations its Nomad job has."""
        counts: dict[str, int] = {}
        for step in run.status.steps:
            assert step.nomad_job_id is not None, step
            evaluations, _ = await self.nomad.job_evaluations(
                step.nomad_job_id, namespace=step.nomad_namespace or "default"
            )
            counts[step.name] = sum(
                1 for evaluation in evaluations if evaluation["TriggeredBy"] == "job-register"
            )
        return counts


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with AsyncExitStack() as stack:
        agent = DevAgent(DevAgentConfig(port=0, data_dir=tmp_path / "nomad"))
        nomad_address = await agent.start()
        stack.push_async_callback(agent.stop)
        nomad = await stack.enter_async_context(NomadClient(nomad_address))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        yield Cluster(nomad_address, nomad, http, tmp_path, stack)


@pytest.fixture
async def server_process(cluster: Cluster) -> AsyncIterator[ControllerProcess]:
    """``nomad-pipeline server`` as a subprocess (killable with SIGKILL), started by the test."""
    server = ControllerProcess(cluster.nomad_address, cluster.tmp_path / "subprocess")
    server.data_dir.mkdir()
    try:
        yield server
    finally:
        await server.kill()


# ---- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds", "go"),
    [("10s", 10.0, "10s"), ("15s", 15.0, "15s"), ("1m30s", 90.0, "90s"), ("24h", 86400.0, None)],
)
def test_lease_parses_within_nomads_lock_ttl_range(
    text: str, seconds: float, go: str | None
) -> None:
    assert parse_lease(text) == seconds
    if go is not None:
        assert go_duration(seconds) == go


@pytest.mark.parametrize("text", ["2s", "25h", "soon", ""])
def test_bad_lease_is_refused_naming_the_field(text: str) -> None:
    with pytest.raises(Invalid) as refused:
        parse_lease(text)
    assert refused.value.field == "leader_lease"


def test_timings_follow_controller_runtime_proportions() -> None:
    timings = LeaseTimings.for_lease(15.0)
    assert (timings.ttl, timings.renew_deadline, timings.retry_period) == (15.0, 10.0, 2.0)
    # The holder gives up well before Nomad could expire the lock (2 x TTL after a renewal).
    assert timings.renew_deadline < timings.ttl
    assert go_duration(LeaseTimings.for_lease(10.0).retry_period) == "1333ms"


def test_leader_elect_needs_the_nomad_vars_backend(tmp_path: Path) -> None:
    with pytest.raises(Invalid) as refused:
        ControllerConfig(data_dir=tmp_path, leader_elect=True)
    assert refused.value.field == "leader_elect"
    assert "--state-backend nomad-vars" in refused.value.message
    with pytest.raises(Invalid) as bad_lease:
        ControllerConfig(data_dir=tmp_path, state_backend="nomad-vars", leader_lease="5s")
    assert bad_lease.value.field == "leader_lease"


def test_server_command_refuses_leader_elect_on_the_dev_backend(tmp_path: Path) -> None:
    stderr = io.StringIO()
    code = cli_main(
        ["server", "--leader-elect", "--data-dir", str(tmp_path), "--http-addr", "127.0.0.1:0"],
        stderr=stderr,
    )
    assert code == 1
    assert stderr.getvalue().startswith("error: Invalid: leader election (--leader-elect) needs")


# ---- two controllers on one Nomad ---------------------------------------------------------


async def test_one_of_two_controllers_leads_and_runs_what_the_follower_accepts(
    cluster: Cluster,
) -> None:
    first = await cluster.controller("first")
    second = await cluster.controller("second")
    await eventually(
        lambda: first.leading or second.leading, deadline=TIMINGS.retry_period + 5, what="a leader"
    )
    leader, follower = (first, second) if first.leading else (second, first)
    assert not follower.leading
    holder = await lock_holder(cluster.nomad)
    assert holder["address"] == leader.address
    assert holder["pid"] == str(os.getpid()) and holder["since"]
    assert await cluster.metric_leader(leader.address or "") == 1.0
    assert await cluster.metric_leader(follower.address or "") == 0.0
    async with cluster.http.get(f"{follower.address}/readyz") as response:
        assert response.status == 200, "a follower serves the API, so it is ready"

    assert follower.address is not None
    run_name = await cluster.start_run(follower.address)
    run = await cluster.finished_run(follower, run_name)
    assert run.status.phase == "success", run.status
    # Nobody registered a step's job twice: the follower did not reconcile.
    assert await cluster.register_evaluations(run) == {"compile": 1, "test": 1}
    assert not follower.leading and leader.leading


async def test_clean_stop_hands_leadership_to_the_other_controller(cluster: Cluster) -> None:
    first = await cluster.controller("first")
    await eventually(lambda: first.leading, deadline=5.0, what="the only controller leads")
    second = await cluster.controller("second")
    assert first.address is not None and second.address is not None

    loop = asyncio.get_running_loop()
    await first.stop()
    stopped_at = loop.time()
    # A released lock is free at once: the follower's next attempt (each retry period) gets it.
    await eventually(
        lambda: second.leading, deadline=TIMINGS.retry_period + 3, what="the other takes over"
    )
    assert loop.time() - stopped_at < TIMINGS.ttl
    assert (await lock_holder(cluster.nomad))["address"] == second.address

    run = await cluster.finished_run(second, await cluster.start_run(second.address))
    assert run.status.phase == "success", run.status
    assert await cluster.register_evaluations(run) == {"compile": 1, "test": 1}


async def test_killed_leader_is_replaced_once_its_lock_expires(
    cluster: Cluster, server_process: ControllerProcess
) -> None:
    await start_leading_server(cluster, server_process)
    survivor = await cluster.controller("survivor")
    assert not survivor.leading

    loop = asyncio.get_running_loop()
    await server_process.kill()
    killed_at = loop.time()
    # Nomad keeps a lock 2 x TTL after its last renewal, then LockDelay more.
    expiry = 2 * TIMINGS.ttl + TIMINGS.lock_delay
    await eventually(
        lambda: survivor.leading, deadline=expiry + TIMINGS.retry_period + 5, what="takeover"
    )
    waited = loop.time() - killed_at
    assert waited > expiry - TIMINGS.retry_period - 1, f"took over after only {waited:.1f}s"
    assert (await lock_holder(cluster.nomad))["address"] == survivor.address

    assert survivor.address is not None
    run = await cluster.finished_run(survivor, await cluster.start_run(survivor.address))
    assert run.status.phase == "success", run.status


async def test_restarted_controller_retakes_its_own_lock_at_once(
    cluster: Cluster, server_process: ControllerProcess
) -> None:
    await start_leading_server(cluster, server_process)
    lock_id = (await cluster.nomad.get_variable(LEADER_LOCK_PATH))["Lock"]["ID"]

    loop = asyncio.get_running_loop()
    await server_process.kill()
    killed_at = loop.time()
    await start_leading_server(cluster, server_process, deadline=TIMINGS.ttl)
    # Well before the lock could have expired (2 x TTL): it renewed the saved lock.
    assert loop.time() - killed_at < TIMINGS.ttl
    variable = await cluster.nomad.get_variable(LEADER_LOCK_PATH)
    assert variable["Lock"]["ID"] == lock_id
    assert variable["Items"]["address"] == server_process.address


async def start_leading_server(
    cluster: Cluster, server: ControllerProcess, *, lease: str = LEASE, deadline: float = 5.0
) -> None:
    """Start ``nomad-pipeline server --leader-elect`` and wait until the lock names its pid."""
    await server.start(cluster.http, "--leader-elect", "--leader-lease", lease)
    assert server.process is not None
    pid = str(server.process.pid)

    async def holder_is_the_server() -> bool:
        return (await lock_holder(cluster.nomad)).get("pid") == pid

    await eventually(holder_is_the_server, deadline=deadline, what=f"the server (pid {pid}) leads")


# ---- the elector on its own --------------------------------------------------------------


class Probe:
    """A runnable recording its terms: started, then cancelled."""

    def __init__(self) -> None:
        self.starts = 0
        self.running = False
        self.events: list[str] = []

    @property
    def name(self) -> str:
        return "probe"

    async def run(self) -> None:
        self.starts += 1
        self.running = True
        self.events.append("started")
        try:
            await asyncio.Event().wait()
        finally:
            self.running = False
            self.events.append("stopped")


async def test_leader_whose_lock_is_taken_away_stops_and_campaigns_again(
    cluster: Cluster,
) -> None:
    probe = Probe()
    elector = LeaderElector(cluster.nomad, lambda: [probe], lease=TIMINGS.ttl)
    task = asyncio.create_task(elector.run(), name="elector-under-test")
    try:
        await eventually(lambda: probe.running, deadline=5.0, what="the elector leads")
        variable = await cluster.nomad.get_variable(LEADER_LOCK_PATH)
        # An operator (or a split brain) frees the lock behind the holder's back.
        await cluster.nomad.lock_release(LEADER_LOCK_PATH, variable["Lock"]["ID"])
        # Its next renewal is refused: it stops the runnables, then wins the free lock again.
        await eventually(
            lambda: probe.starts == 2, deadline=2 * TIMINGS.retry_period + 3, what="a new term"
        )
        assert probe.events == ["started", "stopped", "started"]
        assert elector.leading and elector.terms == 2
    finally:
        task.cancel()
        await asyncio.wait({task})
    assert not probe.running
    assert await lock_holder(cluster.nomad) == {}, "a stopped elector releases the lock"


async def test_leader_that_cannot_reach_nomad_stops_at_the_renew_deadline(
    tmp_path: Path,
) -> None:
    agent = DevAgent(DevAgentConfig(port=0, data_dir=tmp_path / "nomad"))
    address = await agent.start()
    probe = Probe()
    async with NomadClient(address) as nomad:
        elector = LeaderElector(nomad, lambda: [probe], lease=TIMINGS.ttl, state_dir=tmp_path)
        task = asyncio.create_task(elector.run(), name="elector-under-test")
        try:
            await eventually(lambda: probe.running, deadline=5.0, what="the elector leads")
            loop = asyncio.get_running_loop()
            await agent.stop()
            cut_at = loop.time()
            await eventually(
                lambda: not probe.running,
                deadline=TIMINGS.renew_deadline + 2,
                what="it stops reconciling",
            )
            # It kept leading through the failed renewals, up to the renew deadline.
            assert loop.time() - cut_at > TIMINGS.renew_deadline - TIMINGS.retry_period - 0.5
            assert not elector.leading
        finally:
            task.cancel()
            await asyncio.wait({task})
    # The lock may still be ours when Nomad answers again: the data dir keeps it for a retake.
    assert "lock_id" in (tmp_path / "leader-lock.json").read_text()


async def test_saved_lock_with_another_lease_is_given_back_not_kept(
    cluster: Cluster, server_process: ControllerProcess
) -> None:
    """A restart with another --leader-lease must not keep a lock whose TTL could expire
    before its own renew deadline: it releases it and acquires a fresh one."""
    await start_leading_server(cluster, server_process, lease="90s")
    old_lock = (await cluster.nomad.get_variable(LEADER_LOCK_PATH))["Lock"]
    await server_process.kill()

    await start_leading_server(cluster, server_process, deadline=TIMINGS.ttl)
    new_lock = (await cluster.nomad.get_variable(LEADER_LOCK_PATH))["Lock"]
    assert new_lock["ID"] != old_lock["ID"]
    assert (old_lock["TTL"], new_lock["TTL"]) == ("1m30s", "10s")
