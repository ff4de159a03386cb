"""Batches of calls: what many tasks ask for at once, done in one call.

The first item goes out at once (no timer to wait for); whatever is submitted while a
batch is in flight goes together in the next one. When idle, a call therefore costs
what it cost alone; under load, a round trip and the client's own work per call are
shared by every item of a batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

logger = logging.getLogger("livegate.batching")

Item = TypeVar("Item")
Outcome = TypeVar("Outcome")

MAX_BATCH = 256


class Batcher(Generic[Item, Outcome]):
    """Queues items and runs them in batches with `run`, one batch at a time.

    `run` returns one outcome per item, or an exception for an item that failed on its
    own. If `run` raises, each item is run again alone as `retry` makes it, so that one
    bad item cannot fail the others; without `retry`, the error is every item's.
    """

    def __init__(
        self,
        name: str,
        run: Callable[[list[Item]], Awaitable[list[Outcome | Exception]]],
        retry: Callable[[Item], Item] | None = None,
    ) -> None:
        """`retry`: an item as it runs again alone after its batch failed (a batch that
        raised may have been done all the same, if only its answer was lost)."""
        self._name = name
        self._run = run
        self._retry = retry
        self._queue: list[tuple[Item, asyncio.Future[Outcome]]] = []
        self._drainer: asyncio.Task[None] | None = None

    def submit(self, item: Item) -> asyncio.Future[Outcome]:
        """Queue `item`; the future of its outcome (cancelling it leaves the item queued)."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._drainer is None:
            self._drainer = asyncio.create_task(self._drain(), name=self._name)
        return future

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                try:
                    outcomes = await self._run([item for item, _ in batch])
                except Exception as exc:
                    if len(batch) == 1 or self._retry is None:
                        for _, future in batch:
                            _settle(future, exc)
                        continue
                    logger.warning(
                        "%s: a batch of %d failed; retrying each", self._name, len(batch)
                    )
                    for item, future in batch:
                        try:
                            [outcome] = await self._run([self._retry(item)])
                        except Exception as one:
                            outcome = one
                        _settle(future, outcome)
                    continue
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    _settle(future, outcome)
        finally:
            self._drainer = None


def _settle(future: asyncio.Future[Outcome], outcome: Outcome | Exception) -> None:
    """Hand the outcome to a submitter still waiting (one that was cancelled is not)."""
    if future.done():
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
