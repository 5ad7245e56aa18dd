"""The work queue, the controller loop and the manager, on the real event loop clock."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

import pytest

from nomad_pipeline.controller.manager import Manager, watch_store
from nomad_pipeline.controller.runtime import Controller, Request, Result
from nomad_pipeline.controller.workqueue import Backoff, QueueShutDownError, WorkQueue
from nomad_pipeline.errors import TerminalError
from nomad_pipeline.resources.kinds import Flow
from nomad_pipeline.store.memory import MemoryStore


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` until true, failing after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.002)


def request(name: str) -> Request:
    return Request("Run", "default", name)


async def test_queue_dedupes_waiting_keys() -> None:
    queue: WorkQueue[str] = WorkQueue()
    for key in ("a", "b", "a", "a", "b"):
        queue.add(key)
    assert len(queue) == 2
    assert [await queue.get(), await queue.get()] == ["a", "b"]


async def test_key_re_added_while_processing_is_delivered_after_done() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.add("a")
    key = await queue.get()
    queue.add("a")
    queue.add("a")
    assert len(queue) == 0, "a key in flight must not be handed to a second worker"
    queue.done(key)
    assert len(queue) == 1
    assert await queue.get() == "a"
    queue.done("a")
    assert len(queue) == 0


async def test_add_after_waits_on_loop_clock_and_earliest_deadline_wins() -> None:
    queue: WorkQueue[str] = WorkQueue()
    loop = asyncio.get_running_loop()
    started = loop.time()
    queue.add_after("a", 10.0)
    queue.add_after("a", 0.05)
    queue.add_after("a", 5.0)
    assert queue.delayed == 1
    assert await queue.get() == "a"
    elapsed = loop.time() - started
    assert 0.05 <= elapsed < 1.0


async def test_backoff_grows_per_key_and_forget_resets_it() -> None:
    backoff = Backoff(base=0.01, cap=0.04)
    assert [backoff.delay(n) for n in range(5)] == [0.01, 0.02, 0.04, 0.04, 0.04]
    queue: WorkQueue[str] = WorkQueue(backoff=backoff)
    queue.add_rate_limited("a")
    queue.add_rate_limited("a")
    assert queue.failures("a") == 2
    assert queue.failures("b") == 0
    queue.forget("a")
    assert queue.failures("a") == 0


async def test_shut_down_wakes_waiting_getters() -> None:
    queue: WorkQueue[str] = WorkQueue()
    getter = asyncio.create_task(queue.get())
    await eventually(lambda: len(queue._getters) == 1)
    queue.add_after("x", 30.0)
    queue.shut_down()
    with pytest.raises(QueueShutDownError):
        await getter
    assert queue.delayed == 0
    queue.add("y")
    assert len(queue) == 0


class RecordingReconciler:
    """Counts calls per key and checks that no key is reconciled twice at once."""

    def __init__(self) -> None:
        self.calls: dict[Request, int] = {}
        self.active: set[Request] = set()
        self.overlaps = 0
        self.release = asyncio.Event()

    async def reconcile(self, request: Request) -> Result:
        if request in self.active:
            self.overlaps += 1
        self.active.add(request)
        self.calls[request] = self.calls.get(request, 0) + 1
        try:
            await self.release.wait()
        finally:
            self.active.discard(request)
        return Result()


async def run_controller(controller: Controller) -> asyncio.Task[None]:
    return asyncio.create_task(controller.run(), name=f"test-{controller.name}")


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_controller_never_reconciles_one_key_on_two_workers() -> None:
    reconciler = RecordingReconciler()
    controller = Controller("runs", reconciler, workers=4)
    task = await run_controller(controller)
    hot, other = request("hot"), request("other")
    controller.enqueue(hot)
    controller.enqueue(other)
    await eventually(lambda: len(reconciler.active) == 2)
    for _ in range(10):
        controller.enqueue(hot)
    assert controller.queue.in_flight == 2
    reconciler.release.set()
    await eventually(lambda: reconciler.calls.get(hot) == 2 and not reconciler.active)
    assert reconciler.overlaps == 0
    assert reconciler.calls == {hot: 2, other: 1}
    await stop(task)


async def test_worker_tasks_are_named() -> None:
    reconciler = RecordingReconciler()
    controller = Controller("flows", reconciler, workers=2)
    task = await run_controller(controller)
    await eventually(
        lambda: {t.get_name() for t in asyncio.all_tasks()} >= {"flows-worker-0", "flows-worker-1"}
    )
    await stop(task)


async def test_transient_errors_back_off_then_success_resets() -> None:
    loop = asyncio.get_running_loop()
    attempts: list[float] = []

    class Flaky:
        async def reconcile(self, request: Request) -> Result:
            attempts.append(loop.time())
            if len(attempts) <= 3:
                raise ConnectionError("nomad is restarting")
            return Result()

    controller = Controller("flaky", Flaky(), WorkQueue(backoff=Backoff(base=0.02, cap=1.0)))
    task = await run_controller(controller)
    controller.enqueue(request("r"))
    await eventually(lambda: len(attempts) == 4)
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.02
    assert gaps[1] >= 0.04
    assert gaps[2] >= 0.08
    await eventually(lambda: controller.queue.failures(request("r")) == 0)
    assert controller.errors == 3
    await stop(task)


async def test_terminal_error_is_not_requeued_and_requeue_after_is() -> None:
    calls: dict[str, int] = {"terminal": 0, "again": 0}
    seen_twice = asyncio.Event()

    class Mixed:
        async def reconcile(self, request: Request) -> Result:
            calls[request.name] += 1
            if request.name == "terminal":
                raise TerminalError("the flow does not exist")
            if calls["again"] == 2:
                seen_twice.set()
                return Result()
            return Result(requeue_after=0.01)

    controller = Controller("mixed", Mixed(), workers=2)
    task = await run_controller(controller)
    controller.enqueue(request("terminal"))
    controller.enqueue(request("again"))
    async with asyncio.timeout(5):
        await seen_twice.wait()
    await eventually(lambda: controller.queue.in_flight == 0)
    assert calls["terminal"] == 1
    assert controller.queue.delayed == 0
    assert controller.queue.failures(request("terminal")) == 0
    await stop(task)


async def test_cancelling_the_controller_cancels_a_running_reconcile() -> None:
    reconciler = RecordingReconciler()
    controller = Controller("cancel", reconciler)
    task = await run_controller(controller)
    controller.enqueue(request("slow"))
    await eventually(lambda: bool(reconciler.active))
    await stop(task)
    assert not reconciler.active
    assert controller.queue.is_shut_down


class Component:
    def __init__(self, name: str, stopped: list[str], *, fail: bool = False) -> None:
        self._name = name
        self._stopped = stopped
        self._fail = fail
        self.started = asyncio.Event()

    @property
    def name(self) -> str:
        return self._name

    async def run(self) -> None:
        self.started.set()
        if self._fail:
            raise RuntimeError(f"{self._name} broke")
        try:
            await asyncio.Event().wait()
        finally:
            self._stopped.append(self._name)


async def test_manager_stops_runnables_in_reverse_order() -> None:
    stopped: list[str] = []
    components = [Component(name, stopped) for name in ("server", "source", "controller")]
    manager = Manager(components)
    task = asyncio.create_task(manager.run())
    for component in components:
        async with asyncio.timeout(5):
            await component.started.wait()
    assert manager.names == ["server", "source", "controller"]
    manager.stop()
    async with asyncio.timeout(5):
        await task
    assert stopped == ["controller", "source", "server"]


async def test_manager_propagates_a_failing_runnable_and_stops_the_rest() -> None:
    stopped: list[str] = []
    manager = Manager([Component("server", stopped), Component("broken", stopped, fail=True)])
    with pytest.raises(ExceptionGroup) as raised:
        async with asyncio.timeout(5):
            await manager.run()
    assert "broken broke" in str(raised.value.exceptions[0])
    assert stopped == ["server"]


def flow_object(name: str) -> Flow:
    return Flow.model_validate(
        {
            "kind": "Flow",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"inline": {"steps": [{"name": "say", "run": "echo hi"}]}},
        }
    )


async def test_watch_store_lists_then_follows_and_relists_when_expired() -> None:
    store = MemoryStore(history_size=2)
    await store.start()
    await store.create(flow_object("before"))
    queue: WorkQueue[Request] = WorkQueue()
    source = watch_store(store, Flow, queue.add)
    assert source.name == "watch-flow"
    task = asyncio.create_task(source.run())
    await eventually(lambda: len(queue) == 1)
    assert await queue.get() == Request("Flow", "default", "before")

    await store.create(flow_object("live"))
    await eventually(lambda: len(queue) == 1)
    assert await queue.get() == Request("Flow", "default", "live")

    # Five writes with no chance for the watcher to run overflow a history of two: the watch
    # expires, and the source re-lists so no change is lost.
    for index in range(5):
        await store.create(flow_object(f"burst-{index}"))
    await eventually(lambda: source.relists == 2)
    await eventually(lambda: len(queue) >= 5)
    names = set()
    while len(queue):
        request = await queue.get()
        queue.done(request)
        names.add(request.name)
    assert {f"burst-{index}" for index in range(5)} <= names
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await store.close()
