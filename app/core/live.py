"""Pushing each user's quota to all of their connected devices."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from app.core.bus import Bus
from app.core.quota import QuotaSnapshot

logger = logging.getLogger("livegate.live")


def quota_channel(user_id: str) -> str:
    return f"quota:{user_id}"


def newer(a: QuotaSnapshot | None, b: QuotaSnapshot) -> QuotaSnapshot:
    """The later of two snapshots: a later period, or a higher `seq` in the same one."""
    if a is None or (b.period, b.seq) >= (a.period, a.seq):
        return b
    return a


class QuotaPublisher:
    """Publishes quota snapshots, at most one per user per `interval`, latest wins.

    The first change is published at once; changes during the following interval
    are folded into one publish at its end. Publishes due at the same moment go to
    the bus together (one round trip to Redis for all of them). A user with nothing
    pending and no interval running holds no state here.
    """

    def __init__(self, bus: Bus, interval: float) -> None:
        self._bus = bus
        self._interval = interval
        self._pending: dict[str, QuotaSnapshot] = {}
        self._due: dict[str, None] = {}  # users to publish now, in order
        self._cooling: dict[str, asyncio.TimerHandle] = {}
        self._flusher: asyncio.Task[None] | None = None

    def push(self, user_id: str, snapshot: QuotaSnapshot) -> None:
        # Pending until published, so a close() at any moment still sends it.
        self._pending[user_id] = newer(self._pending.get(user_id), snapshot)
        if user_id not in self._cooling:
            self._make_due(user_id)

    def _make_due(self, user_id: str) -> None:
        self._due[user_id] = None
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="quota-publisher")

    def _cooled(self, user_id: str) -> None:
        del self._cooling[user_id]
        if user_id in self._pending:
            self._make_due(user_id)

    async def _flush(self) -> None:
        try:
            while self._due:
                due, self._due = self._due, {}
                loop = asyncio.get_running_loop()
                messages = []
                for user_id in due:
                    snapshot = self._pending.pop(user_id, None)
                    if snapshot is None:
                        continue
                    messages.append((quota_channel(user_id), snapshot.as_message()))
                    if self._interval > 0:
                        self._cooling[user_id] = loop.call_later(
                            self._interval, self._cooled, user_id
                        )
                await self._publish(messages)
        finally:
            self._flusher = None

    async def _publish(self, messages: list[tuple[str, str]]) -> None:
        try:
            await self._bus.publish_many(messages)
        except Exception:
            # A lost push is repaired by the next one or by the client's next snapshot;
            # it must never fail the request that metered the tokens.
            logger.exception("quota push of %d users failed", len(messages))

    async def close(self) -> None:
        """Publish whatever is pending now, then stop."""
        for timer in self._cooling.values():
            timer.cancel()
        self._cooling.clear()
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher
        pending, self._pending = self._pending, {}
        await self._publish([(quota_channel(u), s.as_message()) for u, s in pending.items()])
