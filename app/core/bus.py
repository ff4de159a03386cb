"""Pub/sub between the parts of one instance, and across instances through Redis.

A `Bus` delivers each message published on a channel to every local `Subscription`
of that channel. `LocalBus` is one process; `RedisBus` holds one subscriber
connection per process, subscribes a Redis channel while it has local subscribers,
and fans messages out to them. Messages published while that connection was down
are lost, so after a reconnect every subscription receives `RESYNC`, the cue to
fetch a fresh snapshot.

A `RedisBus` hands what it publishes to its own subscribers at once, without the
round trip through Redis: other instances get it through Redis, and its echo is
recognised by the tag it carries there and skipped. So a process's own messages
reach its subscribers in the order published, even while Redis is away, while the
order between two processes' messages is Redis's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    # redis-py is imported by a server with a Redis only (~6 MiB of memory).
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub

logger = logging.getLogger("livegate.bus")


class Signal(enum.Enum):
    RESYNC = "resync"


RESYNC: Final = Signal.RESYNC


# Called in the event loop with each message of a channel, instead of a mailbox.
Listener = Callable[[str | Signal], None]


class Subscription:
    """One local subscriber's mailbox on one channel.

    Holds at most `maxlen` undelivered messages; when full the oldest is dropped,
    which for state pushes (latest value wins) is exactly right. With a `listener`,
    each message goes to it instead, as it arrives, and `get` is not used: a
    subscriber then needs no task of its own waiting for messages.
    """

    __slots__ = ("_bus", "_listener", "_pending", "_ready", "channel")

    def __init__(
        self, bus: Bus, channel: str, maxlen: int, listener: Listener | None = None
    ) -> None:
        self.channel = channel
        self._bus = bus
        self._listener = listener
        # A listener needs no mailbox: none is allocated (one per socket adds up).
        self._pending: collections.deque[str | Signal] | None = (
            collections.deque(maxlen=maxlen) if listener is None else None
        )
        self._ready = asyncio.Event() if listener is None else None

    def deliver(self, message: str | Signal) -> None:
        if self._listener is not None:
            self._listener(message)
            return
        assert self._pending is not None and self._ready is not None
        self._pending.append(message)
        self._ready.set()

    async def get(self, within: float | None = None) -> str | Signal | None:
        """The next message, or None if `within` seconds pass without one."""
        if self._pending is None or self._ready is None:
            raise TypeError("a subscription with a listener has no mailbox")
        if not self._pending:
            self._ready.clear()
            try:
                async with asyncio.timeout(within):
                    await self._ready.wait()
            except TimeoutError:
                return None
        return self._pending.popleft()

    async def close(self) -> None:
        await self._bus.unsubscribe(self)


class Bus:
    """The interface, and the local fan-out both implementations share."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[Subscription]] = {}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    @property
    def healthy(self) -> bool:
        """Whether every message published now reaches this instance's subscribers."""
        return True

    async def publish(self, channel: str, message: str) -> None:
        raise NotImplementedError

    async def publish_many(self, messages: list[tuple[str, str]]) -> None:
        """Publish each (channel, message), in order."""
        for channel, message in messages:
            await self.publish(channel, message)

    async def subscribe(
        self, channel: str, maxlen: int = 1, listener: Listener | None = None
    ) -> Subscription:
        sub = Subscription(self, channel, maxlen, listener)
        subs = self._subscribers.setdefault(channel, set())
        subs.add(sub)
        await self._joined(channel, first=len(subs) == 1)
        return sub

    async def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subscribers.get(sub.channel)
        if subs is None or sub not in subs:
            return
        subs.discard(sub)
        if not subs:
            del self._subscribers[sub.channel]
            await self._last_unsubscriber(sub.channel)

    def _fan_out(self, channel: str, message: str | Signal) -> None:
        for sub in self._subscribers.get(channel, ()):
            sub.deliver(message)

    async def _joined(self, channel: str, first: bool) -> None:
        """Return once messages published on `channel` reach the new subscriber."""

    async def _last_unsubscriber(self, channel: str) -> None:
        pass


class LocalBus(Bus):
    """One process: publishing is delivering."""

    async def publish(self, channel: str, message: str) -> None:
        self._fan_out(channel, message)


class RedisBus(Bus):
    """Redis pub/sub with one subscriber connection per process.

    Only the reader task touches that connection: subscribing asks the reader to
    subscribe and waits until it has, so a caller that subscribes and then reads a
    snapshot misses no later message. The reader polls briefly between reads so
    such requests never wait on a quiet channel.
    """

    _CONTROL = "bus:control"
    POLL_SECONDS = 0.05
    SUBSCRIBE_WAIT = 2.0  # longer, and Redis is down: the reader resyncs when it is back

    def __init__(
        self, url: str, prefix: str, *, publisher: Redis, max_backoff: float = 5.0
    ) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        super().__init__()
        self._prefix = f"{prefix}:"
        self._publisher = publisher  # shared, owned by the caller
        # Failures must surface here rather than be retried inside redis-py, so that
        # we know a reconnect happened and can tell subscribers to resync.
        self._subscriber = Redis.from_url(
            url, retry=Retry(NoBackoff(), 0), health_check_interval=15, socket_keepalive=True
        )
        self._max_backoff = max_backoff
        # Prefixed to what this process publishes: "<16 hex digits>|".
        self._origin = f"{secrets.token_hex(8)}|"
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()  # the wanted channels changed
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._connected = asyncio.Event()
        self.reconnects = 0

    async def start(self) -> None:
        self._reader = asyncio.create_task(self._read_forever(), name="redis-bus-reader")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self._connected.wait()

    async def close(self) -> None:
        if self._reader is not None:
            # Cancel until it ends: on Python 3.11 a cancellation that lands as
            # redis-py's read timeout expires is swallowed, and the reader reads on.
            while not self._reader.done():
                self._reader.cancel()
                await asyncio.wait({self._reader}, timeout=0.1)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        await self._subscriber.aclose()

    @property
    def healthy(self) -> bool:
        return self._connected.is_set()

    async def publish(self, channel: str, message: str) -> None:
        self._fan_out(channel, message)
        await self._publisher.publish(self._prefix + channel, self._origin + message)

    async def publish_many(self, messages: list[tuple[str, str]]) -> None:
        """One round trip for all of them."""
        if len(messages) == 1:
            await self.publish(*messages[0])
            return
        if messages:
            for channel, message in messages:
                self._fan_out(channel, message)
            async with self._publisher.pipeline(transaction=False) as pipe:
                for channel, message in messages:
                    pipe.publish(self._prefix + channel, self._origin + message)
                await pipe.execute()

    async def _joined(self, channel: str, first: bool) -> None:
        # A later subscriber waits too while the first one's SUBSCRIBE is under way:
        # returning at once, it could miss what is published before Redis listens.
        if not first and channel not in self._waiters:
            return  # subscribed already
        ready = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(channel, []).append(ready)
        self._changed.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.SUBSCRIBE_WAIT):
                await asyncio.shield(ready)

    async def _last_unsubscriber(self, channel: str) -> None:
        self._changed.set()

    async def _read_forever(self) -> None:
        backoff = 0.05
        first = True
        while True:
            pubsub = self._subscriber.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._prefix + self._CONTROL)
                active: set[str] = set()
                await self._sync(pubsub, active)
                self._connected.set()
                if not first:
                    self.reconnects += 1
                    logger.info("redis bus reconnected; asking subscribers to resync")
                    for channel in list(self._subscribers):
                        self._fan_out(channel, RESYNC)
                first, backoff = False, 0.05
                while True:
                    if self._changed.is_set():
                        await self._sync(pubsub, active)
                    message = await pubsub.get_message(timeout=self.POLL_SECONDS)
                    if message is None or message["type"] != "message":
                        continue
                    data = message["data"]
                    text = data.decode() if isinstance(data, bytes) else str(data)
                    if text.startswith(self._origin):
                        continue  # our own: our subscribers had it when it was published
                    if text[16:17] == "|":
                        text = text[17:]  # another instance's tag
                    channel = message["channel"].decode()[len(self._prefix) :]
                    self._fan_out(channel, text)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Whatever broke, start over on a fresh connection and resync: a reader
                # that dies leaves every socket of this instance deaf.
                self._connected.clear()
                logger.warning("redis bus connection lost (%r); retrying in %.2fs", exc, backoff)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)

    async def _sync(self, pubsub: PubSub, active: set[str]) -> None:
        """Make the Redis subscriptions match the local subscribers; wake the waiters."""
        while True:
            self._changed.clear()
            wanted = set(self._subscribers)
            added, dropped = wanted - active, active - wanted
            if added:
                await pubsub.subscribe(*(self._prefix + c for c in added))
            if dropped:
                await pubsub.unsubscribe(*(self._prefix + c for c in dropped))
            active.clear()
            active.update(wanted)
            for channel in list(self._waiters):
                if channel in active or channel not in self._subscribers:
                    for ready in self._waiters.pop(channel):
                        if not ready.done():
                            ready.set_result(None)
            if not self._changed.is_set():
                return
