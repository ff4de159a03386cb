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
    are folded into one publish at its end. A user with nothing pending holds no
    state here.
    """

    def __init__(self, bus: Bus, interval: float) -> None:
        self._bus = bus
        self._interval = interval
        self._pending: dict[str, QuotaSnapshot] = {}
        self._cooling: dict[str, asyncio.Task[None]] = {}

    def push(self, user_id: str, snapshot: QuotaSnapshot) -> None:
        # Pending until published, so a close() at any moment still sends it.
        self._pending[user_id] = newer(self._pending.get(user_id), snapshot)
        if user_id not in self._cooling:
            self._cooling[user_id] = asyncio.create_task(self._publish_and_cool(user_id))

    async def _publish_and_cool(self, user_id: str) -> None:
        try:
            while (snapshot := self._pending.get(user_id)) is not None:
                await self._publish(user_id, snapshot)
                if self._pending.get(user_id) is snapshot:
                    del self._pending[user_id]
                await asyncio.sleep(self._interval)
        finally:
            self._cooling.pop(user_id, None)

    async def _publish(self, user_id: str, snapshot: QuotaSnapshot) -> None:
        try:
            await self._bus.publish(quota_channel(user_id), snapshot.as_message())
        except Exception:
            # A lost push is repaired by the next one or by the client's next snapshot;
            # it must never fail the request that metered the tokens.
            logger.exception("quota push for user %s failed", user_id)

    async def close(self) -> None:
        """Publish whatever is pending now, then stop."""
        for task in list(self._cooling.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._cooling.clear()
        pending, self._pending = self._pending, {}
        for user_id, snapshot in pending.items():
            await self._publish(user_id, snapshot)
