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
that found nothing is not kept). Writes that change one user's principals say whose
(`OF_USER`: a tier, a profile, a key or webhook of theirs): only that user's entries
are dropped, here and on the other instances. The token denylist's lookups are kept
here too, one entry per token or session id, and a revocation drops just that id's
entry, here and on the other instances (`forget`).

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
# Messages on CHANNEL that name one entry, or one user's entries, to drop them alone;
# any other drops all (instances on an older version send and take nothing finer).
FORGET = "forget:"
FORGET_USER = "forget-user:"
# An execution option for writes to the watched tables that change nothing a
# principal is read from (see above).
NEUTRAL = "auth_neutral"
# An execution option naming the one user (by id) whose principals a write to the
# watched tables changes. A write that names nobody may change anyone's.
OF_USER = "auth_of_user"
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
        # key -> (expires at, value, the user it was read for, if any)
        self._entries: dict[Hashable, tuple[float, Any, str | None]] = {}
        # user id -> the keys of their entries (a superset: stale keys are skipped).
        self._keys_of: dict[str, set[Hashable]] = {}
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
        expires_at, value, _ = entry
        if time.monotonic() > expires_at:
            self._remove(key)
            return None
        return value

    def put(
        self,
        key: Hashable,
        value: Any,
        generation: int,
        max_age: float | None = None,
        user: str | None = None,
    ) -> None:
        """Store what was read (for `user`, if it depends on one), for `max_age`
        seconds (by default the cache's own), unless an invalidation happened since
        it began."""
        if generation != self.generation or not self.usable:
            return
        now = time.monotonic()
        if len(self._entries) >= self._max_entries:
            self._sweep(now)
        self._entries[key] = (now + (self._max_age if max_age is None else max_age), value, user)
        if user is not None:
            self._keys_of.setdefault(user, set()).add(key)

    def _sweep(self, now: float) -> None:
        # Entries nobody asks for again (a token refreshed away) are only dropped here.
        self._entries = {key: entry for key, entry in self._entries.items() if entry[0] >= now}
        if len(self._entries) > self._max_entries // 2:
            self._entries.clear()  # rare; a full reload is cheaper than tracking use
        self._keys_of.clear()
        for key, (_, _, user) in self._entries.items():
            if user is not None:
                self._keys_of.setdefault(user, set()).add(key)

    async def read_through(
        self,
        key: Hashable,
        read: Callable[[], Awaitable[T]],
        max_age: float | None = None,
        user_of: Callable[[Any], str] | None = None,
    ) -> T:
        """What is cached for `key`, else what `read()` returns, stored for `max_age`
        seconds (see `put`) unless None, as read for the user `user_of` names (whose
        changes then drop it).

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
                    user = user_of(result) if user_of is not None else None
                    self.put(key, result, generation, max_age, user)

            task.add_done_callback(done)
        result: T = await asyncio.shield(pending[1])
        return result

    def invalidate(self) -> None:
        self.generation += 1
        self._entries.clear()
        self._keys_of.clear()

    def invalidate_user(self, user_id: str) -> None:
        """Drop the entries read for one user, and every read in flight (any of them
        may be theirs): a change to that user alone."""
        self.generation += 1
        for key in self._keys_of.pop(user_id, ()):
            entry = self._entries.get(key)
            if entry is not None and entry[2] == user_id:
                del self._entries[key]

    async def forget(self, key: str) -> None:
        """A change only `key`'s entry shows (a token revoked in Redis): drop it here
        now, and on the other instances through the bus."""
        self._drop(key)
        await self._announce(FORGET + key)

    def _drop(self, key: Hashable) -> None:
        self._remove(key)
        # A read in flight may have read what just changed: not joined, not stored.
        self._reading.pop(key, None)

    def _remove(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None and (user := entry[2]) is not None:
            keys = self._keys_of.get(user)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._keys_of[user]

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
        elif isinstance(message, str) and message.startswith(FORGET_USER):
            self.invalidate_user(message[len(FORGET_USER) :])
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
        options = context.execution_options if context is not None else {}
        if options.get(NEUTRAL) or not _WRITE_TO_WATCHED.match(statement):
            return
        user = options.get(OF_USER)
        # The users whose principals the transaction changed; None: maybe anyone's.
        changed: set[str | None] = conn.info.setdefault(_DIRTY, set())
        changed.add(user if isinstance(user, str) else None)

    def _on_checkin(self, dbapi_connection: DBAPIConnection, record: ConnectionPoolEntry) -> None:
        # After the transaction ended (committed or not): invalidating earlier would
        # let a read between the invalidation and the commit store the old row.
        changed: set[str | None] | None = record.info.pop(_DIRTY, None)
        if not changed:
            return
        if None in changed:
            self.invalidate()
            messages = ["*"]
        else:
            users = [user_id for user_id in changed if user_id is not None]
            for user_id in users:
                self.invalidate_user(user_id)
            messages = [FORGET_USER + user_id for user_id in users]
        try:
            task = asyncio.get_running_loop().create_task(self._announce(*messages))
        except RuntimeError:
            return  # no loop (a connection finalized at exit): nobody is left to tell
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)

    async def _announce(self, *messages: str) -> None:
        try:
            await self._bus.publish_many([(CHANNEL, message) for message in messages])
        except Exception:
            # The other instances' caches would stay stale: the bus's own recovery
            # (RESYNC on reconnect) clears them; until then they are not used.
            logger.exception("announcing a change of users, keys or revocations failed")
