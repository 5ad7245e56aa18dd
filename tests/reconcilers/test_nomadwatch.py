"""JobCache: what event batches do to tracked jobs, and who gets woken."""

from __future__ import annotations

from typing import Any

from nomad_pipeline.reconcilers.nomadwatch import JobCache, JobObservation

KEY = ("default", "r1-build")
OWNER = ("ci", "r1")


def job_event(modify_index: int, status: str, **extra: Any) -> dict[str, Any]:
    job = {
        "ID": KEY[1],
        "Namespace": KEY[0],
        "Status": status,
        "ModifyIndex": modify_index,
        "Meta": {"nomad_pipeline_run": OWNER[1], "nomad_pipeline_namespace": OWNER[0]},
    }
    return {
        "Topic": "Job",
        "Type": "JobRegistered",
        "Key": KEY[1],
        "Payload": {"Job": job},
        **extra,
    }


def alloc_event(alloc_id: str, modify_index: int, client_status: str) -> dict[str, Any]:
    alloc = {
        "ID": alloc_id,
        "JobID": KEY[1],
        "Namespace": KEY[0],
        "ClientStatus": client_status,
        "ModifyIndex": modify_index,
    }
    return {"Topic": "Allocation", "Type": "AllocationUpdated", "Payload": {"Allocation": alloc}}


def make_cache() -> tuple[JobCache, list[tuple[str, str]]]:
    cache, woken, _ = make_cache_with_starts()
    return cache, woken


def make_cache_with_starts() -> tuple[JobCache, list[tuple[str, str]], list[list[str]]]:
    """A cache, the runs it woke, and for each ``started`` call the allocations it saw."""
    woken: list[tuple[str, str]] = []
    starts: list[list[str]] = []

    def started(owner: tuple[str, str], observation: JobObservation) -> None:
        assert owner == OWNER
        starts.append(sorted(observation.allocations))

    return JobCache(woken.append, started), woken, starts


def test_an_allocation_starting_calls_started_and_wakes_nobody() -> None:
    cache, woken, starts = make_cache_with_starts()
    cache.track(KEY, OWNER)
    cache.fill(KEY, {"ID": KEY[1], "Status": "running", "ModifyIndex": 3}, [], None)
    cache.apply({"Index": 4, "Events": [alloc_event("a1", 4, "pending")]})
    cache.apply({"Index": 5, "Events": [alloc_event("a1", 5, "pending")]})
    # Nothing for the run to do until the allocation runs (placement failures are evaluations).
    assert woken == [] and starts == []
    cache.apply({"Index": 6, "Events": [alloc_event("a1", 6, "running")]})
    # Starting changes nothing the run records: its logs are followed, no reconcile.
    assert woken == [] and starts == [["a1"]]
    cache.apply({"Index": 7, "Events": [alloc_event("a1", 7, "failed")]})
    assert woken == [OWNER] and starts == [["a1"]]


def test_an_allocation_starting_with_a_stop_requested_wakes_the_run() -> None:
    cache, woken, starts = make_cache_with_starts()
    cache.track(KEY, OWNER)
    cache.fill(KEY, {"ID": KEY[1], "Status": "running", "ModifyIndex": 3}, [], None)
    cache.apply({"Index": 4, "Events": [alloc_event("a1", 4, "pending")]})
    stopping = alloc_event("a1", 5, "running")
    stopping["Payload"]["Allocation"]["DesiredStatus"] = "stop"
    cache.apply({"Index": 5, "Events": [stopping]})
    assert woken == [OWNER] and starts == []


def test_a_finished_jobs_late_events_wake_nobody() -> None:
    cache, woken = make_cache()
    cache.track(KEY, OWNER)
    cache.fill(KEY, {"ID": KEY[1], "Status": "running", "ModifyIndex": 3}, [], None)
    cache.forget(KEY)
    cache.apply({"Index": 7, "Events": [job_event(7, "dead")]})
    assert woken == []
    assert cache.get(KEY) is None


def test_untracked_jobs_are_not_cached_but_wake_their_owner_by_meta() -> None:
    cache, woken = make_cache()
    cache.apply({"Index": 5, "Events": [job_event(5, "pending")]})
    assert cache.get(KEY) is None
    assert woken == [OWNER]
    assert cache.last_index == 5


def test_tracked_job_follows_events_and_newer_data_wins() -> None:
    cache, woken = make_cache()
    cache.track(KEY, OWNER)
    cache.registered(KEY, {"ID": KEY[1], "TaskGroups": []}, "eval-1")
    observation = cache.get(KEY)
    assert observation is not None and observation.job is not None
    assert observation.job["Status"] == "pending"
    cache.apply(
        {
            "Index": 9,
            "Events": [alloc_event("a1", 8, "running"), alloc_event("a1", 9, "failed")],
        }
    )
    # An older read arriving late does not roll the allocation back.
    cache.fill(KEY, {"ID": KEY[1], "Status": "running", "ModifyIndex": 7}, [], None)
    cache.apply({"Index": 7, "Events": [alloc_event("a1", 7, "pending")]})
    observation = cache.get(KEY)
    assert observation is not None
    assert observation.allocations["a1"]["ClientStatus"] == "failed"
    # One wake-up per batch that changed something the run acts on; the stale one changed none.
    assert woken == [OWNER]


def test_placement_failure_evaluation_is_kept_over_the_blocked_one() -> None:
    cache, _ = make_cache()
    cache.track(KEY, OWNER)
    failed = {"ID": "e1", "JobID": KEY[1], "Namespace": KEY[0], "ModifyIndex": 3}
    failed["FailedTGAllocs"] = {"step": {"ConstraintFiltered": {"missing drivers": 1}}}
    blocked = {"ID": "e2", "JobID": KEY[1], "Namespace": KEY[0], "ModifyIndex": 4}
    events = [
        {"Topic": "Evaluation", "Payload": {"Evaluation": failed}},
        {"Topic": "Evaluation", "Payload": {"Evaluation": blocked}},
    ]
    cache.apply({"Index": 4, "Events": events})
    cache.fill(KEY, {"ID": KEY[1], "Status": "pending", "ModifyIndex": 2}, [], None)
    observation = cache.get(KEY)
    assert observation is not None and observation.evaluation is not None
    assert observation.evaluation["ID"] == "e1"


def test_invalidate_distrusts_entries_until_refilled() -> None:
    cache, _ = make_cache()
    cache.track(KEY, OWNER)
    cache.fill(KEY, None, [], None)
    observation = cache.get(KEY)
    assert observation is not None and observation.missing
    assert cache.invalidate() == [OWNER]
    assert cache.get(KEY) is None
    cache.fill(KEY, {"ID": KEY[1], "Status": "dead", "ModifyIndex": 3}, [], None)
    refilled = cache.get(KEY)
    assert refilled is not None and not refilled.missing


def test_purged_job_reads_missing_and_forget_drops_it() -> None:
    cache, _ = make_cache()
    cache.track(KEY, OWNER)
    cache.fill(KEY, {"ID": KEY[1], "Status": "dead", "ModifyIndex": 3}, [], None)
    purge = job_event(10, "dead")
    purge["Payload"]["Deleted"] = True
    cache.apply({"Index": 10, "Events": [purge]})
    observation = cache.get(KEY)
    assert observation is not None and observation.missing
    cache.forget_owner(OWNER)
    assert cache.get(KEY) is None
    assert len(cache) == 0


def test_a_completed_allocation_wakes_the_run_with_its_job_dead_in_either_order() -> None:
    cache, woken = make_cache()
    cache.track(KEY, OWNER)
    cache.registered(KEY, {"ID": KEY[1], "TaskGroups": []}, "eval-1")
    cache.apply({"Index": 4, "Events": [alloc_event("a1", 4, "running")]})
    cache.apply({"Index": 5, "Events": [job_event(5, "running")]})
    assert woken == []
    # The step ends when its job is dead: the completed allocation alone changes nothing yet.
    cache.apply({"Index": 6, "Events": [alloc_event("a1", 6, "complete")]})
    assert woken == []
    cache.apply({"Index": 7, "Events": [job_event(7, "dead")]})
    assert woken == [OWNER]

    other, other_woken = make_cache()
    other.track(KEY, OWNER)
    other.registered(KEY, {"ID": KEY[1], "TaskGroups": []}, "eval-1")
    other.apply({"Index": 7, "Events": [job_event(7, "dead")]})
    other.apply({"Index": 8, "Events": [alloc_event("a1", 8, "complete")]})
    assert other_woken == [OWNER, OWNER]
