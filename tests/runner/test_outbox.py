"""The runner's outbox keeps order and bounded memory, spilling the overflow to a file."""

from __future__ import annotations

from pathlib import Path

from nomad_pipeline.runner.reporting import Outbox


async def test_events_spill_to_a_file_beyond_the_memory_limit_and_keep_their_order(
    tmp_path: Path,
) -> None:
    spill = tmp_path / "alloc" / "events"
    outbox = Outbox(spill, memory_limit=100)
    events = [f'{{"seq":{n},"data":"{"x" * 20}"}}'.encode() for n in range(1, 41)]
    for event in events:
        await outbox.put(event)
        assert outbox.pending_bytes <= 100
    assert spill.exists()
    assert len(outbox) == 40

    delivered: list[bytes] = []
    while len(outbox):
        batch = await outbox.peek(70)
        assert batch
        # A batch that is not committed (a failed send) comes back unchanged.
        assert await outbox.peek(70) == batch
        await outbox.commit(len(batch))
        delivered.extend(batch)
        if len(delivered) == 10:
            # Events emitted while draining queue up behind the spilled ones.
            events.append(b'{"seq":41}')
            await outbox.put(events[-1])
    assert delivered == events
    assert not spill.exists()


async def test_a_single_event_larger_than_a_batch_still_goes_out(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "events", memory_limit=1024)
    await outbox.put(b"x" * 500)
    await outbox.put(b"y")
    assert await outbox.peek(100) == [b"x" * 500]
    await outbox.commit(1)
    assert await outbox.peek(100) == [b"y"]


async def test_a_spill_file_left_by_an_earlier_runner_is_not_replayed(tmp_path: Path) -> None:
    spill = tmp_path / "events"
    spill.write_bytes(b'{"seq":1,"stale":true}\n')
    outbox = Outbox(spill, memory_limit=10)
    await outbox.put(b'{"seq":7}')
    assert await outbox.peek(1000) == [b'{"seq":7}']
