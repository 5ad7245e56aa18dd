"""Trigger reconciler on a controllable clock: cron firing, DST, downtime, policies, git polling.

The reconciler runs against the real memory store; the clock is a value the test moves.
"""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from nomad_pipeline.controller.runtime import Request
from nomad_pipeline.reconcilers.gitsource import GitMirrors
from nomad_pipeline.reconcilers.trigger import TRIGGER_LABEL, TriggerReconciler
from nomad_pipeline.resources.kinds import Flow, Namespace, Run, Trigger
from nomad_pipeline.store.memory import MemoryStore


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


FLOW: dict[str, Any] = {
    "apiVersion": "nomad-pipeline.io/v1",
    "kind": "Flow",
    "metadata": {"name": "build", "namespace": "default"},
    "spec": {
        "variables": [{"name": "who", "type": "string", "default": "x"}],
        "inline": {"runner": {"driver": "raw_exec"}, "steps": [{"name": "a", "run": "true"}]},
    },
}


async def make_store(clock: Clock) -> MemoryStore:
    store = MemoryStore(clock=clock)
    await store.start()
    await store.create(
        Namespace.model_validate(
            {"kind": "Namespace", "metadata": {"name": "default", "namespace": ""}, "spec": {}}
        )
    )
    await store.create(Flow.model_validate(FLOW))
    return store


def cron_trigger(schedules: list[str], **cron: Any) -> Trigger:
    return Trigger.model_validate(
        {
            "kind": "Trigger",
            "metadata": {"name": "nightly", "namespace": "default"},
            "spec": {"flow": "build", "source": {"cron": {"schedules": schedules, **cron}}},
        }
    )


async def runs_of(store: MemoryStore) -> list[Run]:
    return (await store.list(Run, "default", selector={TRIGGER_LABEL: "nightly"})).items


async def finish(store: MemoryStore, run: Run) -> None:
    done = run.model_copy(deep=True)
    done.status.phase = "success"
    await store.update_status(done)


REQUEST = Request("Trigger", "default", "nightly")


@pytest.fixture
def mirrors(tmp_path: Path) -> GitMirrors:
    return GitMirrors(tmp_path / "git-cache")


async def test_cron_fires_once_per_minute_boundary(mirrors: GitMirrors) -> None:
    clock = Clock(datetime(2026, 1, 1, 12, 0, 30, tzinfo=UTC))
    store = await make_store(clock)
    await store.create(cron_trigger(["* * * * *"]))
    reconciler = TriggerReconciler(store, mirrors=mirrors, clock=clock)

    result = await reconciler.reconcile(REQUEST)
    assert await runs_of(store) == []
    assert result.requeue_after == pytest.approx(30.0)
    trigger = await store.get(Trigger, "default", "nightly")
    assert trigger.status.next_fire_time == datetime(2026, 1, 1, 12, 1, tzinfo=UTC)

    clock.now = datetime(2026, 1, 1, 12, 1, 0, 200_000, tzinfo=UTC)
    await reconciler.reconcile(REQUEST)
    await reconciler.reconcile(REQUEST)  # level-triggered: a second pass changes nothing
    runs = await runs_of(store)
    assert len(runs) == 1
    assert runs[0].spec.trigger.type == "cron"
    assert runs[0].spec.trigger.name == "nightly"
    assert runs[0].spec.trigger.schedule_time == datetime(2026, 1, 1, 12, 1, tzinfo=UTC)
    trigger = await store.get(Trigger, "default", "nightly")
    assert trigger.status.last_fire_time == datetime(2026, 1, 1, 12, 1, tzinfo=UTC)
    assert trigger.status.last_run == runs[0].metadata.name
    assert trigger.status.pending_fire_time is None


async def test_crash_between_record_and_create_neither_loses_nor_doubles(
    mirrors: GitMirrors,
) -> None:
    clock = Clock(datetime(2026, 1, 1, 12, 0, 30, tzinfo=UTC))
    store = await make_store(clock)
    await store.create(cron_trigger(["* * * * *"]))
    reconciler = TriggerReconciler(store, mirrors=mirrors, clock=clock)
    await reconciler.reconcile(REQUEST)
    # A controller recorded the 12:01 firing and died before creating the run.
    trigger = await store.get(Trigger, "default", "nightly")
    fired = datetime(2026, 1, 1, 12, 1, tzinfo=UTC)
    recorded = trigger.status.model_copy(
        update={"pending_fire_time": fired, "last_fire_time": fired}
    )
    await store.update_status(trigger.model_copy(update={"status": recorded}))

    clock.now = datetime(2026, 1, 1, 12, 1, 20, tzinfo=UTC)
    await reconciler.reconcile(REQUEST)
    runs = await runs_of(store)
    assert [r.spec.trigger.schedule_time for r in runs] == [fired]

    # The same firing created twice (the run existed before the crash) is still one run.
    again = await store.get(Trigger, "default", "nightly")
    redo = again.status.model_copy(update={"pending_fire_time": fired})
    await store.update_status(again.model_copy(update={"status": redo}))
    await reconciler.reconcile(REQUEST)
    assert len(await runs_of(store)) == 1


@pytest.mark.parametrize(
    ("deadline", "expected_runs"),
    [(None, 1), ("10m", 1), ("1m", 0)],
    ids=["none", "within", "past"],
)
async def test_downtime_fires_at_most_once_within_the_deadline(
    mirrors: GitMirrors, deadline: str | None, expected_runs: int
) -> None:
    clock = Clock(datetime(2026, 1, 1, 12, 0, 30, tzinfo=UTC))
    store = await make_store(clock)
    cron: dict[str, Any] = {} if deadline is None else {"starting_deadline": deadline}
    await store.create(cron_trigger(["*/5 * * * *"], **cron))
    reconciler = TriggerReconciler(store, mirrors=mirrors, clock=clock)
    await reconciler.reconcile(REQUEST)
    # Three hours of downtime: 36 missed firings; the latest (15:00) was 3 minutes ago.
    clock.now = datetime(2026, 1, 1, 15, 3, tzinfo=UTC)
    await reconciler.reconcile(REQUEST)
    runs = await runs_of(store)
    assert len(runs) == expected_runs
    if runs:
        assert runs[0].spec.trigger.schedule_time == datetime(2026, 1, 1, 15, 0, tzinfo=UTC)
    trigger = await store.get(Trigger, "default", "nightly")
    assert trigger.status.last_fire_time == datetime(2026, 1, 1, 15, 0, tzinfo=UTC)
    assert trigger.status.next_fire_time == datetime(2026, 1, 1, 15, 5, tzinfo=UTC)


async def test_forbid_skips_while_a_run_is_active(mirrors: GitMirrors) -> None:
    clock = Clock(datetime(2026, 1, 1, 12, 0, 30, tzinfo=UTC))
    store = await make_store(clock)
    await store.create(cron_trigger(["* * * * *"], concurrency_policy="forbid"))
    reconciler = TriggerReconciler(store, mirrors=mirrors, clock=clock)
    clock.now = datetime(2026, 1, 1, 12, 1, 1, tzinfo=UTC)
    await reconciler.reconcile(REQUEST)
    clock.now = datetime(2026, 1, 1, 12, 2, 1, tzinfo=UTC)
    await reconciler.reconcile(REQUEST)
    runs = await runs_of(store)
    assert len(runs) == 1
    trigger = await store.get(Trigger, "default", "nightly")
    assert "still active" in trigger.status.message
    await finish(store, runs[0])
    clock.now = datetime(2026, 1, 1, 12, 3, 1, tzinfo=UTC)
    await reconciler.reconcile(REQUEST)
    assert len(await runs_of(store)) == 2


async def test_replace_cancels_the_active_run(mirrors: GitMirrors) -> None:
    clock = Clock(datetime(2026, 1, 1, 12, 0, 30, tzinfo=UTC))
    store = await make_store(clock)
    await store.create(cron_trigger(["* * * * *"], concurrency_policy="replace"))
    reconciler = TriggerReconciler(store, mirrors=mirrors, clock=clock)
    clock.now = datetime(2026, 1, 1, 12, 1, 1, tzinfo=UTC)
    await reconciler.reconcile(REQUEST)
    clock.now = datetime(2026, 1, 1, 12, 2, 1, tzinfo=UTC)
    await reconciler.reconcile(REQUEST)
    runs = sorted(await runs_of(store), key=lambda r: r.metadata.name)
    assert len(runs) == 2
    assert runs[0].spec.cancel is True
    assert runs[1].spec.cancel is False


@pytest.mark.parametrize(
    ("tz", "schedule", "start", "fire"),
    [
        # Spring forward: 02:30 does not exist; fires once when the gap ends (03:00 local).
        (
            "Europe/Berlin",
            "30 2 * * *",
            datetime(2026, 3, 29, 0, 0, tzinfo=UTC),
            datetime(2026, 3, 29, 1, 0, tzinfo=UTC),
        ),
        (
            "America/New_York",
            "30 2 * * *",
            datetime(2026, 3, 8, 5, 0, tzinfo=UTC),
            datetime(2026, 3, 8, 7, 0, tzinfo=UTC),
        ),
        # Fall back: 02:30 (Berlin) / 01:30 (New York) happen twice; fires at the first only.
        (
            "Europe/Berlin",
            "30 2 * * *",
            datetime(2026, 10, 24, 22, 0, tzinfo=UTC),
            datetime(2026, 10, 25, 0, 30, tzinfo=UTC),
        ),
        (
            "America/New_York",
            "30 1 * * *",
            datetime(2026, 11, 1, 4, 0, tzinfo=UTC),
            datetime(2026, 11, 1, 5, 30, tzinfo=UTC),
        ),
    ],
)
async def test_dst_changes_fire_exactly_once(
    mirrors: GitMirrors, tz: str, schedule: str, start: datetime, fire: datetime
) -> None:
    clock = Clock(start)
    store = await make_store(clock)
    await store.create(cron_trigger([schedule], timezone=tz))
    reconciler = TriggerReconciler(store, mirrors=mirrors, clock=clock)
    await reconciler.reconcile(REQUEST)
    trigger = await store.get(Trigger, "default", "nightly")
    assert trigger.status.next_fire_time == fire
    # Walk the clock through the change in 5-minute steps: exactly one run, for `fire`.
    while clock.now < start + timedelta(hours=5):
        clock.now += timedelta(minutes=5)
        await reconciler.reconcile(REQUEST)
    runs = await runs_of(store)
    assert [r.spec.trigger.schedule_time for r in runs] == [fire]


async def test_suspended_trigger_does_not_fire(mirrors: GitMirrors) -> None:
    clock = Clock(datetime(2026, 1, 1, 12, 0, 30, tzinfo=UTC))
    store = await make_store(clock)
    trigger = cron_trigger(["* * * * *"])
    trigger.spec.suspend = True
    await store.create(trigger)
    reconciler = TriggerReconciler(store, mirrors=mirrors, clock=clock)
    clock.now = datetime(2026, 1, 1, 12, 5, tzinfo=UTC)
    await reconciler.reconcile(REQUEST)
    assert await runs_of(store) == []
    stored = await store.get(Trigger, "default", "nightly")
    ready = stored.status.condition("Ready")
    assert ready is not None and ready.reason == "Suspended"


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=Dev", "-c", "user.email=dev@example.com", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


async def test_git_polling_starts_a_run_per_new_commit(tmp_path: Path, mirrors: GitMirrors) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "commit", "-q", "--allow-empty", "-m", "first")
    clock = Clock(datetime(2026, 1, 1, 12, 0, tzinfo=UTC))
    store = await make_store(clock)
    await store.create(
        Trigger.model_validate(
            {
                "kind": "Trigger",
                "metadata": {"name": "nightly", "namespace": "default"},
                "spec": {
                    "flow": "build",
                    "source": {
                        "git": {"url": f"file://{repo}", "branch": "main", "interval": "30s"}
                    },
                },
            }
        )
    )
    reconciler = TriggerReconciler(store, mirrors=mirrors, clock=clock)
    result = await reconciler.reconcile(REQUEST)
    assert result.requeue_after == 30.0
    assert await runs_of(store) == []  # the first revision is the baseline

    git(repo, "commit", "-q", "--allow-empty", "-m", "$(touch /tmp/pwned) second")
    sha = git(repo, "rev-parse", "HEAD")
    await reconciler.reconcile(REQUEST)
    await reconciler.reconcile(REQUEST)
    runs = await runs_of(store)
    assert len(runs) == 1
    variables = runs[0].spec.variables
    assert variables["trigger.git_sha"] == sha
    assert variables["trigger.git_commit_message"] == "$(touch /tmp/pwned) second"
    assert variables["trigger.git_ref"] == "refs/heads/main"
    assert runs[0].spec.trigger.type == "git"
