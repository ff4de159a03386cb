"""Who a credential belongs to, kept in memory until anything it was read from changes.

Every relayed request resolves its API key (or its session's user) before anything
else; reading that from the database each time was a round trip and most of a
millisecond of CPU. Entries stay until a transaction that wrote `users`, `api_keys`
or `webhooks` (what a principal is read from) has finished, on any instance: this
instance clears its cache when the connection that wrote goes back to the pool
(after the commit), and tells the others through the bus. So a revoked key stops
working everywhere within the bus's latency, not after a TTL. Writes that change
nothing a principal holds say so (`NEUTRAL`): taking a user's lock, a key's usage
statistics, a webhook's last delivery, a user or key added (a principal's lookup
that found nothing is not kept). The token denylist's lookups are kept here too,
one entry per token or session id, and a revocation drops just that id's entry, here
and on the other instances (`forget`).

Callers that miss the same entry together share one read (`read_through`): when a
server starts, or after a change empties the cache, every request in flight would
otherwise read the same row at once, each on a connection of its own (50 clients
opened the pool's 15 connections to SQLite on a cold start).

While the bus is down, messages from other instances may be lost: the cache is then
neither read nor filled, and is cleared when the bus resyncs. `max_age` bounds what
nothing can announce (a row edited by hand in the database).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, ExecutionContext
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import ConnectionPoolEntry

from app.core.bus import Bus, Signal, Subscription

logger = logging.getLogger("livegate.auth")

CHANNEL = "auth:changed"
# A message on CHANNEL that names one entry, to drop it alone; any other drops all.
FORGET = "forget:"
# An execution option for writes to the watched tables that change nothing a
# principal is read from (see above).
NEUTRAL = "auth_neutral"
_WRITE_TO_WATCHED = re.compile(
    r"^\s*(INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+\"?(users|api_keys|webhooks)\b", re.IGNORECASE
)
_DIRTY = "livegate_auth_dirty"

T = TypeVar("T")


class AuthCache:
    """Principals by credential, with the invalidation described above."""

    def __init__(self, bus: Bus, *, max_entries: int = 100_000, max_age: float = 60.0) -> None:
        self._bus = bus
        self._max_entries = max_entries
        self._max_age = max_age
        self._entries: dict[Hashable, tuple[float, Any]] = {}  # (expires at, value)
        # Bumped by every invalidation: a read that began before one is not stored.
        self.generation = 0
        self._subscription: Subscription | None = None
        self._engine: AsyncEngine | None = None
        self._announcing: set[asyncio.Task[None]] = set()
        # Reads in flight, by key: the generation each began in, and its task.
        self._reading: dict[Hashable, tuple[int, asyncio.Task[Any]]] = {}

    @property
    def usable(self) -> bool:
        return self._subscription is not None and self._bus.healthy

    def get(self, key: Hashable) -> Any | None:
        """What is kept for `key`, unless kept longer than it was stored for."""
        if not self.usable:
            return None
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires_at, value = entry
        if time.monotonic() > expires_at:
            del self._entries[key]
            return None
        return value

    def put(self, key: Hashable, value: Any, generation: int, max_age: float | None = None) -> None:
        """Store what was read, for `max_age` seconds (by default the cache's own),
        unless an invalidation happened since it began."""
        if generation != self.generation or not self.usable:
            return
        now = time.monotonic()
        if len(self._entries) >= self._max_entries:
            self._sweep(now)
        self._entries[key] = (now + (self._max_age if max_age is None else max_age), value)

    def _sweep(self, now: float) -> None:
        # Entries nobody asks for again (a token refreshed away) are only dropped here.
        self._entries = {key: entry for key, entry in self._entries.items() if entry[0] >= now}
        if len(self._entries) > self._max_entries // 2:
            self._entries.clear()  # rare; a full reload is cheaper than tracking use

    async def read_through(
        self, key: Hashable, read: Callable[[], Awaitable[T]], max_age: float | None = None
    ) -> T:
        """What is cached for `key`, else what `read()` returns, stored for `max_age`
        seconds (see `put`) unless None.

        Callers missing `key` together share one read, run as a task of its own so
        that a caller leaving does not cancel it for the others; its error is theirs
        too. A caller never joins a read that began before the last invalidation, or
        before `key` was forgotten, and such a read is not stored.
        """
        value: T | None = self.get(key)
        if value is not None:
            return value
        generation = self.generation
        pending = self._reading.get(key)
        if pending is None or pending[0] != generation:
            task = asyncio.ensure_future(read())
            self._reading[key] = pending = (generation, task)

            def done(finished: asyncio.Task[Any]) -> None:
                failed = finished.cancelled() or finished.exception() is not None
                if self._reading.get(key) is not pending:
                    return  # forgotten, or replaced after an invalidation
                del self._reading[key]
                if not failed and (result := finished.result()) is not None:
                    self.put(key, result, generation, max_age)

            task.add_done_callback(done)
        result: T = await asyncio.shield(pending[1])
        return result

    def invalidate(self) -> None:
        self.generation += 1
        self._entries.clear()

    async def forget(self, key: str) -> None:
        """A change only `key`'s entry shows (a token revoked in Redis): drop it here
        now, and on the other instances through the bus."""
        self._drop(key)
        await self._announce(FORGET + key)

    def _drop(self, key: Hashable) -> None:
        self._entries.pop(key, None)
        # A read in flight may have read what just changed: not joined, not stored.
        self._reading.pop(key, None)

    async def start(self, engine: AsyncEngine) -> None:
        """Listen for other instances' changes and watch this instance's writes."""
        self._subscription = await self._bus.subscribe(CHANNEL, listener=self._on_message)
        self._engine = engine
        sa.event.listen(engine.sync_engine, "before_cursor_execute", self._on_execute)
        sa.event.listen(engine.sync_engine, "checkin", self._on_checkin)

    async def close(self) -> None:
        if self._engine is not None:
            sa.event.remove(self._engine.sync_engine, "before_cursor_execute", self._on_execute)
            sa.event.remove(self._engine.sync_engine, "checkin", self._on_checkin)
            self._engine = None
        if self._subscription is not None:
            await self._subscription.close()
            self._subscription = None
        for task in list(self._announcing):
            with contextlib.suppress(Exception):
                await task
        self.invalidate()

    def _on_message(self, message: str | Signal) -> None:
        if isinstance(message, str) and message.startswith(FORGET):
            self._drop(message[len(FORGET) :])
        else:
            self.invalidate()  # a change elsewhere, or RESYNC after an outage

    def _on_execute(
        self,
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: ExecutionContext | None,
        executemany: bool,
    ) -> None:
        if context is not None and context.execution_options.get(NEUTRAL):
            return
        if _WRITE_TO_WATCHED.match(statement):
            conn.info[_DIRTY] = True

    def _on_checkin(self, dbapi_connection: DBAPIConnection, record: ConnectionPoolEntry) -> None:
        # After the transaction ended (committed or not): invalidating earlier would
        # let a read between the invalidation and the commit store the old row.
        if not record.info.pop(_DIRTY, False):
            return
        self.invalidate()
        try:
            task = asyncio.get_running_loop().create_task(self._announce("*"))
        except RuntimeError:
            return  # no loop (a connection finalized at exit): nobody is left to tell
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)

    async def _announce(self, message: str) -> None:
        try:
            await self._bus.publish(CHANNEL, message)
        except Exception:
            # The other instances' caches would stay stale: the bus's own recovery
            # (RESYNC on reconnect) clears them; until then they are not used.
            logger.exception("announcing a change of users, keys or revocations failed")
