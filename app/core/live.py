"""Pushing each user's quota to all of their connected devices."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson

from app.core.bus import Bus, Signal
from app.core.quota import QuotaSnapshot

logger = logging.getLogger("livegate.live")

# Every instance listens here for the token limits that changed (a user's tier moved).
LIMITS_CHANNEL = "quota-limits"


def quota_channel(user_id: str) -> str:
    return f"quota:{user_id}"


@dataclass(frozen=True, slots=True)
class LimitChange:
    """A user's token limit as of `seq` of their counter for `period`.

    Announced to every instance, so that the requests each has in flight for the user
    count against the new limit and push it with their checkpoints: without it, a
    stream that began on the old tier went on pushing the old limit under newer `seq`s.
    """

    user_id: str
    period: str
    seq: int
    limit: int | None

    def encode(self) -> str:
        return orjson.dumps([self.user_id, self.period, self.seq, self.limit]).decode()

    @classmethod
    def decode(cls, text: str) -> LimitChange:
        """Raises ValueError for anything `encode` did not write."""
        try:
            user_id, period, seq, limit = orjson.loads(text)
        except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
            raise ValueError(f"not a limit change: {text[:100]!r}") from exc
        if not (
            isinstance(user_id, str)
            and isinstance(period, str)
            and type(seq) is int
            and (limit is None or type(limit) is int)
        ):
            raise ValueError(f"not a limit change: {text[:100]!r}")
        return cls(user_id, period, seq, limit)


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
        self._announcements: list[str] = []  # limit changes not yet published
        self._limit_watchers: list[Callable[[LimitChange], None]] = []

    def push(self, user_id: str, snapshot: QuotaSnapshot) -> None:
        # Pending until published, so a close() at any moment still sends it.
        self._pending[user_id] = newer(self._pending.get(user_id), snapshot)
        if user_id not in self._cooling:
            self._make_due(user_id)

    def limit_changed(self, user_id: str, snapshot: QuotaSnapshot) -> None:
        """Push `snapshot`, which carries a new limit, and announce that limit to every
        instance (see `LimitChange`): to this one's watchers before returning, so that
        no checkpoint of its own goes out with the old limit meanwhile."""
        change = LimitChange(user_id, snapshot.period, snapshot.seq, snapshot.limit)
        for watcher in self._limit_watchers:
            watcher(change)  # the bus brings it back to them too: they keep the newest
        self.push(user_id, snapshot)
        self._announcements.append(change.encode())
        self._start_flusher()

    async def watch_limits(
        self, watcher: Callable[[LimitChange], None], lost: Callable[[], None]
    ) -> Callable[[], Awaitable[None]]:
        """Call `watcher` with each limit change announced by any instance, and `lost`
        when announcements may have been lost (the bus reconnected); what to await to
        stop."""

        def received(message: str | Signal) -> None:
            if isinstance(message, Signal):
                lost()
                return
            try:
                change = LimitChange.decode(message)
            except ValueError:
                logger.warning("ignored a malformed message on %s", LIMITS_CHANNEL)
                return
            watcher(change)

        subscription = await self._bus.subscribe(LIMITS_CHANNEL, listener=received)
        self._limit_watchers.append(watcher)

        async def stop() -> None:
            if watcher in self._limit_watchers:
                self._limit_watchers.remove(watcher)
            await subscription.close()

        return stop

    def _make_due(self, user_id: str) -> None:
        self._due[user_id] = None
        self._start_flusher()

    def _start_flusher(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="quota-publisher")

    def _cooled(self, user_id: str) -> None:
        del self._cooling[user_id]
        if user_id in self._pending:
            self._make_due(user_id)

    async def _flush(self) -> None:
        try:
            while self._due or self._announcements:
                due, self._due = self._due, {}
                loop = asyncio.get_running_loop()
                messages = [(LIMITS_CHANNEL, text) for text in self._announcements]
                self._announcements.clear()
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
        announcements, self._announcements = self._announcements, []
        await self._publish(
            [
                *((LIMITS_CHANNEL, text) for text in announcements),
                *((quota_channel(u), s.as_message()) for u, s in pending.items()),
            ]
        )
