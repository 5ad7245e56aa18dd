"""``delete`` of objects held by finalizers, through the real API over HTTP: it waits until they
are gone (``--wait=false`` returns at once), a deadline names what is pending, and ``get`` and
``describe`` show an object being deleted.

The harness runs the API alone; the test removes the finalizer as the run reconciler would once
it stopped the run's jobs (``tests/reconcilers/test_run_deletion.py`` runs the real one).
"""

from __future__ import annotations

import asyncio

import pytest
from cli_harness import DEFAULT_NAMESPACE_MANIFEST, Controller

from nomad_pipeline.errors import NotFound
from nomad_pipeline.resources.kinds import Run

RUN_NAME = "01j0000000000000000000000a"
RUN = f"""\
---
apiVersion: nomad-pipeline.io/v1
kind: Run
metadata: {{name: {RUN_NAME}}}
spec:
  flow: hello
  flow_spec:
    inline:
      steps:
        - {{name: say, run: "echo hi"}}
"""
LABEL = f"run.nomad-pipeline.io/{RUN_NAME}"
WAIT_SECONDS = 10.0


async def applied_run(controller: Controller) -> None:
    applied = await controller.cli("apply", "-f", "-", stdin=DEFAULT_NAMESPACE_MANIFEST + RUN)
    assert applied.code == 0, applied.err


async def marked_for_deletion(controller: Controller) -> Run:
    loop = asyncio.get_running_loop()
    end = loop.time() + WAIT_SECONDS
    while (
        run := await controller.store.get(Run, "default", RUN_NAME)
    ).metadata.deletion_timestamp is None:
        assert loop.time() < end, "the run was never marked for deletion"
        await asyncio.sleep(0.02)
    return run


async def finish_deletion(controller: Controller, run: Run) -> None:
    """What the run reconciler does last: remove its finalizer (the store then deletes it)."""
    await controller.store.update(
        run.model_copy(update={"metadata": run.metadata.model_copy(update={"finalizers": []})})
    )


async def test_delete_waits_until_the_finalizer_is_removed(controller: Controller) -> None:
    await applied_run(controller)
    deleting = asyncio.create_task(controller.cli("delete", "run", RUN_NAME), name="cli-delete")
    run = await marked_for_deletion(controller)
    assert not deleting.done(), "delete returned while the finalizer still held the run"

    await finish_deletion(controller, run)

    async with asyncio.timeout(WAIT_SECONDS):
        result = await deleting
    assert (result.code, result.out, result.err) == (0, f"{LABEL} deleted\n", "")


async def test_delete_without_waiting_and_how_get_and_describe_show_it(
    controller: Controller,
) -> None:
    await applied_run(controller)

    result = await controller.cli("delete", "run", RUN_NAME, "--wait=false")

    assert (result.code, result.err) == (0, "")
    assert result.out == f"{LABEL} deletion requested (finalizers: nomad-pipeline.io/stop-jobs)\n"
    listed = await controller.cli("get", "runs")
    header, row = listed.out.splitlines()
    assert header.split()[:3] == ["NAME", "FLOW", "PHASE"]
    assert row.split()[:3] == [RUN_NAME, "hello", "deleting"]
    described = await controller.cli("describe", "run", RUN_NAME)
    assert described.code == 0, described.err
    line = next(li for li in described.out.splitlines() if li.startswith("Deletion requested:"))
    assert line.endswith("ago), waiting for: nomad-pipeline.io/stop-jobs"), line
    assert "Finalizers:" in described.out
    # Deleting again is not an error (nothing changes); ``no`` reads as false too.
    again = await controller.cli("delete", "run", RUN_NAME, "--wait=no")
    assert (again.code, again.out) == (0, result.out), again.err


async def test_delete_gives_up_at_the_timeout_naming_the_pending_finalizers(
    controller: Controller,
) -> None:
    await applied_run(controller)

    result = await controller.cli("delete", "run", RUN_NAME, "--timeout", "300ms")

    assert result.code == 1
    assert result.out == ""
    assert result.err == (
        f"error: Timeout: {LABEL} is still being deleted after 0.3s, waiting for finalizers: "
        f"nomad-pipeline.io/stop-jobs (see `nomad-pipeline describe runs {RUN_NAME}`)\n"
    )
    run = await controller.store.get(Run, "default", RUN_NAME)
    assert run.metadata.deletion_timestamp is not None


async def test_delete_without_finalizers_and_bad_flags(controller: Controller) -> None:
    await applied_run(controller)
    run = await controller.store.get(Run, "default", RUN_NAME)
    await finish_deletion(controller, run)  # not being deleted: only drops the finalizer

    result = await controller.cli("delete", "run", RUN_NAME, "--wait")
    assert (result.code, result.out) == (0, f"{LABEL} deleted\n")
    with pytest.raises(NotFound):
        await controller.store.get(Run, "default", RUN_NAME)

    bad_wait = await controller.cli("delete", "run", RUN_NAME, "--wait=maybe")
    assert bad_wait.code == 1
    assert "expected true or false, got 'maybe'" in bad_wait.err
    bad_timeout = await controller.cli("delete", "run", RUN_NAME, "--timeout", "soon")
    assert bad_timeout.code == 1
    assert "invalid duration 'soon'" in bad_timeout.err
