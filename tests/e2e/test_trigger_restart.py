"""A controller crash between recording a cron firing and creating its run, with real processes.

The controller runs as a subprocess (``nomad-pipeline server --state-backend nomad-vars``) on an
in-process dev agent. It is killed with SIGKILL, the trigger's status is left as a crash at that
moment leaves it (the firing recorded as pending; in the second case its run created too), and
the controller is started again: exactly one run exists for that firing, and the pending mark is
cleared. The schedule is yearly, so no other firing is due while the test runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from runs_e2e_harness import E2E, start_e2e

from nomad_pipeline.controller.api.runs import create_run
from nomad_pipeline.errors import Conflict
from nomad_pipeline.reconcilers.trigger import TRIGGER_LABEL, trigger_run_labels
from nomad_pipeline.resources.kinds import Flow, Run, RunTrigger, Trigger
from nomad_pipeline.resources.registry import KINDS
from nomad_pipeline.resources.ulid import ulid_for
from nomad_pipeline.store.nomadvars import NomadVarsStore

pytestmark = pytest.mark.timeout(120)

# A real fire time of the yearly schedule below, long past; the next one is months away.
FIRING = datetime(2026, 1, 1, tzinfo=UTC)
MANIFESTS = """
apiVersion: nomad-pipeline.io/v1
kind: Flow
metadata:
  name: nightly-build
spec:
  inline:
    steps:
      - name: a
        run: "true"
---
apiVersion: nomad-pipeline.io/v1
kind: Trigger
metadata:
  name: yearly
spec:
  flow: nightly-build
  source:
    cron:
      schedules: ["0 0 1 1 *"]
      timezone: UTC
"""


@pytest.fixture
async def e2e(tmp_path: Path) -> AsyncIterator[E2E]:
    async for running in start_e2e(tmp_path):
        yield running


@pytest.fixture
async def store(e2e: E2E) -> AsyncIterator[NomadVarsStore]:
    opened = NomadVarsStore(e2e.nomad, kinds=KINDS.values())
    await opened.start()
    try:
        yield opened
    finally:
        await opened.close()


async def poll_trigger(
    store: NomadVarsStore, done: str, check: Callable[[Trigger], bool], deadline: float = 30.0
) -> Trigger:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while True:
        trigger = await store.get(Trigger, "default", "yearly")
        if check(trigger):
            return trigger
        if loop.time() > end:
            raise AssertionError(f"trigger never got to: {done}; status {trigger.status!r}")
        await asyncio.sleep(0.05)


async def write_status(store: NomadVarsStore, **changes: object) -> Trigger:
    """Write trigger status fields while the controller is down (CAS retried)."""
    for _ in range(20):
        trigger = await store.get(Trigger, "default", "yearly")
        status = trigger.status.model_copy(update=changes)
        try:
            written: Trigger = await store.update_status(
                trigger.model_copy(update={"status": status})
            )
            return written
        except Conflict:
            await asyncio.sleep(0.05)
    raise AssertionError("could not write the trigger's status")


async def runs_of_the_firing(store: NomadVarsStore) -> list[Run]:
    runs = await store.list(Run, "default", selector={TRIGGER_LABEL: "yearly"})
    return [run for run in runs.items if run.spec.trigger.schedule_time == FIRING]


@pytest.mark.parametrize("run_created_before_crash", [False, True])
async def test_a_crash_between_recording_a_firing_and_its_run_gives_exactly_one_run(
    e2e: E2E, store: NomadVarsStore, run_created_before_crash: bool
) -> None:
    await e2e.apply(MANIFESTS)
    await poll_trigger(store, "scheduled", lambda t: t.status.next_fire_time is not None)
    await e2e.controller.kill()

    # What the reconciler writes right before creating the run.
    trigger = await write_status(store, pending_fire_time=FIRING, last_fire_time=FIRING)
    expected_name = ulid_for(FIRING, f"{trigger.metadata.uid}/cron/{FIRING.isoformat()}")
    if run_created_before_crash:
        flow = await store.get(Flow, "default", "nightly-build")
        await create_run(
            store,
            flow,
            {},
            trigger=RunTrigger(type="cron", name="yearly", schedule_time=FIRING),
            name=expected_name,
            labels=trigger_run_labels(trigger),
        )

    await e2e.controller.start(e2e.http)
    finished = await poll_trigger(
        store, "firing finished", lambda t: t.status.pending_fire_time is None
    )

    runs = await runs_of_the_firing(store)
    assert [run.metadata.name for run in runs] == [expected_name]
    assert finished.status.last_run == expected_name
    assert finished.status.last_fire_time == FIRING
    assert runs[0].spec.trigger.name == "yearly"
    # Another restart finds nothing left to do for that firing; the cleared next fire time shows
    # the restarted controller has reconciled the trigger again.
    await e2e.controller.kill()
    await write_status(store, next_fire_time=None)
    await e2e.controller.start(e2e.http)
    await poll_trigger(store, "rescheduled", lambda t: t.status.next_fire_time is not None)
    assert [run.metadata.name for run in await runs_of_the_firing(store)] == [expected_name]
