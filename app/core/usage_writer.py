"""Group commit of usage rows: many requests' starts, checkpoints and ends per transaction.

A request start, a checkpoint or a finalize queues its write and waits until it is
committed. Whatever was queued while the previous transaction ran goes into the next
one. When idle, a write goes alone and at once (no timer to wait for); under load one
transaction carries many writes, so each costs a fraction of a round trip and a
commit, and a user's counter rows are locked once per transaction instead of once
per request (requests of one user otherwise queue behind each other's commits).

Counter rows are locked in the order of their user ids, in starts and updates alike,
so the transactions of two instances cannot deadlock.

On PostgreSQL, what goes alone (the common case when the server is not busy) takes
fewer round trips: a start's row and counters are one statement, and a checkpoint or
an end with nothing else to do in its transaction (no event to queue, no row to read
first) is one statement committing on its own, where a transaction takes four. So is
a start that nothing can refuse (no limit on any of its counters). The statements
that commit on their own are run by the driver itself (`DriverStatement`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.core.db import DriverStatement
from app.core.quota import (
    TOKENS,
    CounterChange,
    CounterKey,
    Increment,
    RowInsert,
    add_tokens_many,
    apply_increments,
    increment_counters,
    increments_upsert,
)
from app.core.tables import usage_logs
from app.core.webhooks import QuotaWarnings

logger = logging.getLogger("livegate.metering")

# Built once: run with many parameter sets (executemany) per transaction.
_START_ROW = usage_logs.insert()
_UPDATE_ROW = usage_logs.update().where(usage_logs.c.id == sa.bindparam("row_id"))
MAX_BATCH = 256

Counted = list[tuple[int, int] | None]


@dataclass(frozen=True, slots=True)
class RequestStart:
    """A starting request's row and counters, and the check that may still refuse it."""

    row: dict[str, object]  # `usage_logs` values
    user_id: str
    increments: list[Increment]
    # Runs in the transaction with what became of `increments`; raising refuses the
    # request, and nothing of it is written. None: nothing can refuse the start or has
    # to be written with it (no limit on any of its counters).
    admit: Callable[[AsyncConnection, Counted], Awaitable[None]] | None


@dataclass(frozen=True, slots=True)
class UsageWrite:
    """One row's update and what it adds to its user's token counter."""

    row: dict[str, object]  # `_UPDATE_ROW` parameters; rows with the same keys run together
    user_id: str
    period: str
    delta: int
    token_limit: int | None
    # Runs in the same transaction after the row is written (a finalize's webhook event).
    then: Callable[[AsyncConnection], Awaitable[object]] | None = None
    # The row's last write failed: it may have been committed all the same (a lost
    # answer to its COMMIT), so `delta` may count it twice. The counter then takes the
    # row's total less the total the database holds for it instead.
    rebase: bool = False
    # Whether the counter passing a warning threshold queues a `quota.warning` event
    # (False: the user had no webhook when the request started).
    warnings: bool = True

    @property
    def alone(self) -> bool:
        """Whether the write needs nothing in its transaction besides its row and its
        counter, so that on PostgreSQL one statement can do it (`_update_alone`)."""
        return self.then is None and not self.rebase and not self.warnings


# (user_id, period) -> the token counter's (used, seq) once the transaction committed.
Counters = dict[tuple[str, str], tuple[int, int]]

Item = TypeVar("Item")
Outcome = TypeVar("Outcome")


class _GroupCommit(Generic[Item, Outcome]):
    """Queues items and commits them in batches with `commit`, one batch at a time.

    `commit` returns one outcome per item, or an exception for an item refused on its
    own. If it raises, the batch is retried item by item, so one bad item cannot fail
    the others.
    """

    def __init__(
        self,
        name: str,
        commit: Callable[[list[Item]], Awaitable[list[Outcome | Exception]]],
        retry: Callable[[Item], Item] = lambda item: item,
    ) -> None:
        """`retry`: an item as it is retried alone, after its batch failed (which may
        have been committed after all, if only the commit's answer was lost)."""
        self._name = name
        self._commit = commit
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
                    outcomes = await self._commit([item for item, _ in batch])
                except Exception as exc:
                    if len(batch) == 1:
                        _settle(batch[0][1], exc)
                        continue
                    logger.warning(
                        "%s: a batch of %d failed; retrying each", self._name, len(batch)
                    )
                    for item, future in batch:
                        try:
                            [outcome] = await self._commit([self._retry(item)])
                        except Exception as one:
                            outcome = one
                        _settle(future, outcome)
                    continue
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    _settle(future, outcome)
        finally:
            self._drainer = None


def _one_or_many(rows: list[dict[str, object]]) -> list[dict[str, object]] | dict[str, object]:
    """Parameters for `execute`: a single row runs as a plain statement, cheaper than
    the executemany path (the common case when the server is not busy)."""
    return rows[0] if len(rows) == 1 else rows


def _settle(future: asyncio.Future[Outcome], outcome: Outcome | Exception) -> None:
    """Hand the outcome to a submitter still waiting (one that was cancelled is not)."""
    if future.done():
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class UsageWriter:
    """The group commits of one `Metering`."""

    def __init__(self, engine: AsyncEngine, warnings: QuotaWarnings) -> None:
        self._engine = engine
        self._warnings = warnings
        self._postgres = engine.dialect.name == "postgresql"
        # Where a lone write runs as one statement (`_update_alone`): no BEGIN or COMMIT.
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        # The lone paths' statements, compiled once for the driver (see `DriverStatement`).
        self._driven: dict[sa.TextClause, DriverStatement] = {}
        self._starts = _GroupCommit("usage-starts", self._commit_starts)
        self._updates = _GroupCommit(
            "usage-updates", self._commit_updates, lambda w: replace(w, rebase=True)
        )

    def start(self, start: RequestStart) -> asyncio.Future[Counted]:
        """Insert the row and apply the increments, unless `admit` refuses (it raises).

        What became of each increment: the counter's (used, seq), or None where its
        limit refused it.
        """
        return self._starts.submit(start)

    async def write(self, write: UsageWrite) -> tuple[int, int] | None:
        """Commit `write`; its user's token counter after it, or None if it added nothing."""
        counters = await self._updates.submit(write)
        return counters.get((write.user_id, write.period)) if write.delta else None

    async def _commit_starts(self, starts: list[RequestStart]) -> list[Counted | Exception]:
        """One transaction for all starts admitted; one that is refused is left out and
        the rest run again (refusals are rare: a user out of quota). A lone start with
        nothing to admit commits on its own (PostgreSQL)."""
        if len(starts) == 1 and starts[0].admit is None and self._postgres:
            return [await self._start_alone(starts[0])]
        outcomes: dict[int, Counted | Exception] = {}
        singly: set[str] = set()  # users counted start by start (see `_count`)
        while pending := [i for i in range(len(starts)) if i not in outcomes]:
            async with self._engine.connect() as conn:
                transaction = await conn.begin()
                counted = await self._insert_and_count(conn, [starts[i] for i in pending], singly)
                refused = counted is None
                for i, counts in zip(pending, counted or (), strict=False):
                    admit = starts[i].admit
                    if admit is None:
                        continue
                    try:
                        await admit(conn, counts)
                    except Exception as exc:
                        outcomes[i], refused = exc, True
                        break
                if refused:
                    await transaction.rollback()
                    continue
                await transaction.commit()
            assert counted is not None
            outcomes.update(zip(pending, counted, strict=True))
        return [outcomes[i] for i in range(len(starts))]

    def _driver(self, statement: sa.TextClause) -> DriverStatement:
        if (driven := self._driven.get(statement)) is None:
            driven = self._driven[statement] = DriverStatement(statement, self._engine)
        return driven

    async def _start_alone(self, start: RequestStart) -> Counted:
        """A lone start nothing can refuse, on PostgreSQL: its row and its counters in
        one statement that commits on its own (no BEGIN, no COMMIT)."""
        insert = RowInsert(usage_logs, start.row)
        statement, params = increments_upsert(start.user_id, start.increments, insert)
        rows = await self._driver(statement).fetch(params)
        found = {(row["metric"], row["period"]): (row["used"], row["seq"]) for row in rows}
        return [found.get((i.metric, i.period)) for i in start.increments]

    async def _insert_and_count(
        self, conn: AsyncConnection, starts: list[RequestStart], singly: set[str]
    ) -> list[Counted] | None:
        """Insert the starts' rows and apply their increments (see `_count`)."""
        if len(starts) == 1 and self._postgres:
            # Alone: its row goes in with its counters, one statement for both.
            [start] = starts
            insert = RowInsert(usage_logs, start.row)
            return [await increment_counters(conn, start.user_id, start.increments, insert)]
        await conn.execute(_START_ROW, _one_or_many([start.row for start in starts]))
        return await _count(conn, starts, singly)

    async def _commit_updates(self, writes: list[UsageWrite]) -> list[Counters | Exception]:
        if len(writes) == 1 and writes[0].alone and self._postgres:
            return [await self._update_alone(writes[0])]
        by_keys: dict[frozenset[str], list[dict[str, object]]] = {}
        for write in writes:
            by_keys.setdefault(frozenset(write.row), []).append(write.row)
        async with self._engine.begin() as conn:
            deltas: dict[tuple[str, str], int] = {}
            limits: dict[str, int | None] = {}
            for write, delta in zip(writes, await _added(conn, writes), strict=True):
                if delta:
                    key = (write.user_id, write.period)
                    deltas[key] = deltas.get(key, 0) + delta
                    if write.warnings:
                        limits[write.user_id] = write.token_limit
            for rows in by_keys.values():
                await conn.execute(_UPDATE_ROW, _one_or_many(rows))
            for write in writes:
                if write.then is not None:
                    await write.then(conn)
            # Last before the commit: the counter rows stay locked as briefly as possible.
            counters = await add_tokens_many(conn, deltas)
            for (user_id, period), delta in deltas.items():
                if user_id not in limits:
                    continue
                used = counters[(user_id, period)][0]
                await self._warnings.check(
                    conn, user_id, "monthly_tokens", used - delta, used, limits[user_id]
                )
        return [counters] * len(writes)

    async def _update_alone(self, write: UsageWrite) -> Counters:
        """A lone write on PostgreSQL: its row and its counter in one statement.

        The counter moves only if the row exists, as the counter must stay the sum of
        the rows. Not for a write that must also queue events or read the row first.
        """
        if not write.delta:
            async with self._autocommit.connect() as conn:
                await conn.execute(_UPDATE_ROW, write.row)
            return {}
        params = {
            **write.row,
            "user_id": write.user_id,
            "period": write.period,
            "delta": write.delta,
        }
        rows = await self._driver(_update_and_count(frozenset(write.row))).fetch(params)
        if not rows:
            return {}
        return {(write.user_id, write.period): (rows[0]["used"], rows[0]["seq"])}


@functools.cache
def _update_and_count(keys: frozenset[str]) -> sa.TextClause:
    """PostgreSQL: update the row `row_id` and add `delta` to its user's token counter,
    in one statement; the counter's `used` and `seq` after it (no row: nothing).

    Written out, as a data-modifying WITH is PostgreSQL's own; one per set of keys
    (a checkpoint's, a finalize's), so each is prepared once per connection.
    """
    columns = sorted(keys - {"row_id"})
    assignments = ", ".join(f"{name} = :{name}" for name in columns)
    return sa.text(
        f"WITH updated AS (UPDATE usage_logs SET {assignments} WHERE id = :row_id RETURNING id) "
        "INSERT INTO quota_counters (user_id, metric, period, used, seq) "
        f"SELECT :user_id, '{TOKENS}', :period, :delta, 1 FROM updated "
        "ON CONFLICT (user_id, metric, period) DO UPDATE "
        "SET used = quota_counters.used + excluded.used, seq = quota_counters.seq + 1 "
        "RETURNING used, seq"
    ).bindparams(
        *(sa.bindparam(name, type_=usage_logs.c[name].type) for name in columns),
        sa.bindparam("delta", type_=sa.BigInteger),
    )


async def _added(conn: AsyncConnection, writes: list[UsageWrite]) -> list[int]:
    """What each write adds to its user's counter: its `delta`, or for one to `rebase`,
    its total less the total the database holds for the row."""
    rebased = [w.row["row_id"] for w in writes if w.rebase]
    if not rebased:
        return [w.delta for w in writes]
    query = sa.select(usage_logs.c.id, usage_logs.c.total_tokens).where(
        usage_logs.c.id.in_(rebased)
    )
    held = {row.id: row.total_tokens for row in await conn.execute(query)}
    added = []
    for w in writes:
        total = w.row.get("total_tokens")
        if not w.rebase or not isinstance(total, int):
            added.append(w.delta)
            continue
        before = held.get(w.row["row_id"])
        if before is None:
            added.append(0)  # a start that was never committed: nothing to count
            continue
        if total - before != w.delta:
            logger.warning(
                "usage row %s: its last write was committed although it failed; "
                "counting from the %d tokens the database holds",
                w.row["row_id"],
                before,
            )
        added.append(total - before)
    return added


async def _count(
    conn: AsyncConnection, starts: list[RequestStart], singly: set[str]
) -> list[Counted] | None:
    """Apply the starts' increments; what each start saw, as if they ran one by one.

    A user's starts are folded into one change per counter (one row in one statement
    for all users), and each start's view is taken back out of the sum. Where a folded
    change would pass a limit that some of them fit in, the user joins `singly` and
    None is returned: the caller rolls back and runs again, and that user's starts are
    then counted one statement each, each getting in as far as its limit allows.
    Users are taken in sorted order, so counter rows are locked in sorted order.
    """
    by_user: dict[str, list[int]] = {}
    for n, start in enumerate(starts):
        by_user.setdefault(start.user_id, []).append(n)
    counted: list[Counted] = [[] for _ in starts]
    folded: dict[CounterKey, CounterChange] = {}

    async def apply_folded() -> bool:
        found = await apply_increments(conn, list(folded.values()))
        for key, change in folded.items():
            if change.increment.limit is not None and key not in found and change.steps > 1:
                singly.add(key[0])
                return False
        # Each start's view: the counter after the sum, less what later starts added.
        later: dict[CounterKey, tuple[int, int]] = {}
        for user in {key[0] for key in folded}:
            for n in reversed(by_user[user]):
                views: Counted = []
                for inc in starts[n].increments:
                    key = (user, inc.metric, inc.period)
                    after = found.get(key)
                    amount, steps = later.get(key, (0, 0))
                    views.append(None if after is None else (after[0] - amount, after[1] - steps))
                    later[key] = (amount + inc.amount, steps + 1)
                counted[n] = views
        folded.clear()
        return True

    for user in sorted(by_user):
        if user in singly:
            if folded and not await apply_folded():
                return None
            for n in by_user[user]:
                counted[n] = await increment_counters(conn, user, starts[n].increments)
            continue
        for n in by_user[user]:
            for inc in starts[n].increments:
                key = (user, inc.metric, inc.period)
                change = folded.get(key)
                if change is None:
                    folded[key] = CounterChange(user, inc)
                    continue
                limits = [x for x in (change.increment.limit, inc.limit) if x is not None]
                total = Increment(
                    inc.metric,
                    inc.period,
                    change.increment.amount + inc.amount,
                    min(limits, default=None),
                )
                folded[key] = CounterChange(user, total, change.steps + 1)
    if folded and not await apply_folded():
        return None
    return counted
