"""`Batcher`: what is submitted while a batch runs goes together in the next one."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from app.core.batching import MAX_BATCH, Batcher


@dataclasses.dataclass
class Recorder:
    """A `run` that records each batch and can be held, failed, or made to refuse."""

    batches: list[list[int]] = dataclasses.field(default_factory=list)
    gate: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    fail_batches: bool = False
    refuse: frozenset[int] = frozenset()

    async def run(self, items: list[int]) -> list[int | Exception]:
        self.batches.append(list(items))
        await self.gate.wait()
        if self.fail_batches and len(items) > 1:
            raise ConnectionError("the batch was lost")
        return [ValueError(f"refused {i}") if i in self.refuse else i * 10 for i in items]


async def test_a_lone_item_goes_at_once_and_later_ones_share_the_next_batch():
    recorder = Recorder()
    batcher: Batcher[int, int] = Batcher("test", recorder.run)
    first = batcher.submit(1)
    await asyncio.sleep(0)
    assert recorder.batches == [[1]]  # out before anything else was asked for
    rest = [batcher.submit(i) for i in (2, 3, 4)]
    recorder.gate.set()
    assert await first == 10
    assert [await f for f in rest] == [20, 30, 40]
    assert recorder.batches == [[1], [2, 3, 4]]


async def test_an_item_refused_on_its_own_fails_alone():
    recorder = Recorder(refuse=frozenset({3}))
    recorder.gate.set()
    batcher: Batcher[int, int] = Batcher("test", recorder.run)
    results = await asyncio.gather(*(batcher.submit(i) for i in (2, 3, 4)), return_exceptions=True)
    assert results[0] == 20 and results[2] == 40
    assert isinstance(results[1], ValueError) and str(results[1]) == "refused 3"


async def test_without_retry_a_failed_batch_fails_every_item():
    recorder = Recorder(fail_batches=True)
    recorder.gate.set()
    batcher: Batcher[int, int] = Batcher("test", recorder.run)
    results = await asyncio.gather(*(batcher.submit(i) for i in (1, 2, 3)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    assert recorder.batches == [[1, 2, 3]]  # no second attempt


async def test_with_retry_a_failed_batch_runs_each_item_again_alone():
    recorder = Recorder(fail_batches=True)
    recorder.gate.set()
    batcher: Batcher[int, int] = Batcher("test", recorder.run, lambda i: i + 100)
    results = await asyncio.gather(*(batcher.submit(i) for i in (1, 2, 3)))
    assert results == [1010, 1020, 1030]
    assert recorder.batches == [[1, 2, 3], [101], [102], [103]]


async def test_a_cancelled_submitter_leaves_its_item_and_the_others_in_place():
    recorder = Recorder()
    batcher: Batcher[int, int] = Batcher("test", recorder.run)
    first = batcher.submit(1)
    await asyncio.sleep(0)
    gone, kept = batcher.submit(2), batcher.submit(3)
    gone.cancel()
    recorder.gate.set()
    assert await first == 10 and await kept == 30
    assert recorder.batches == [[1], [2, 3]]
    with pytest.raises(asyncio.CancelledError):
        await gone


async def test_batches_are_at_most_max_batch_and_keep_the_order():
    recorder = Recorder()
    batcher: Batcher[int, int] = Batcher("test", recorder.run)
    futures = [batcher.submit(i) for i in range(MAX_BATCH + 5)]
    recorder.gate.set()
    assert [await f for f in futures] == [i * 10 for i in range(MAX_BATCH + 5)]
    assert [len(b) for b in recorder.batches] == [MAX_BATCH, 5]
    assert [i for b in recorder.batches for i in b] == list(range(MAX_BATCH + 5))
