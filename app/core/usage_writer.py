"""Group commit of usage rows: many requests' starts, checkpoints and ends per transaction.

A request start, a checkpoint or a finalize queues its write and waits until it is
committed. Whatever was queued while the previous transaction ran goes into the next
one. When idle, a write goes alone and at once (no timer to wait for); under load one
transaction carries many writes, so each costs a fraction of a round trip and a
commit, and a user's counter rows are locked once per transaction instead of once
per request (requests of one user otherwise queue behind each other's commits).

Counter rows are locked in the order of their user ids, in starts and updates alike,
so the transactions of two instances cannot deadlock.

The writes that need nothing but their rows and counters (the starts nothing can
refuse: no limit on any counter, nothing to admit; the checkpoints and ends with no
event to queue and no row to read first) are run by the driver itself, on a
connection their queue holds (`DriverConnection`). On PostgreSQL they have queues of
their own, and each of their batches is one statement committing on its own: a batch
passes its rows as one JSON text per shape of row; a write alone, as plain values,
which PostgreSQL runs faster for one row. A transaction takes at least four round
trips. On SQLite, which has one writer that a second queue would wait for, a batch
made only of such writes is one transaction run on the driver's thread.

A start that a limit may refuse needs a transaction, which its refusal rolls back. On
PostgreSQL a lone one (the server not busy) runs on a held connection too: BEGIN, the
statement, its check judging from the counts alone, COMMIT. The check says when it
cannot judge so (a refusal whose count it must read, a warning to queue), and the start
then runs again as the other writes do, in a transaction of SQLAlchemy's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.core.batching import Batcher
from app.core.db import PLAN_EACH_RUN, DriverConnection, DriverStatement, TransactionNeeded
from app.core.quota import (
    TOKENS,
    CounterChange,
    CounterKey,
    Increment,
    RowInsert,
    add_tokens_many,
    apply_increments,
    counter_upserts,
    increment_counters,
    increments_upsert,
    token_changes,
)
from app.core.tables import usage_logs
from app.core.webhooks import QuotaWarnings

logger = logging.getLogger("livegate.metering")

# Built once: run with many parameter sets (executemany) per transaction.
_START_ROW = usage_logs.insert()
_UPDATE_ROW = usage_logs.update().where(usage_logs.c.id == sa.bindparam("row_id"))

Counted = list[tuple[int, int] | None]


@dataclass(frozen=True, slots=True)
class RequestStart:
    """A starting request's row and counters, and the check that may still refuse it."""

    row: dict[str, object]  # `usage_logs` values
    user_id: str
    increments: list[Increment]
    # Runs in the transaction with what became of `increments`; raising refuses the
    # request, and nothing of it is written. None: nothing can refuse the start or has
    # to be written with it (no limit on any of its counters). Given no connection, it
    # judges from the counts alone or raises `TransactionNeeded`.
    admit: Callable[[AsyncConnection | None, Counted], Awaitable[None]] | None

    @property
    def unlimited(self) -> bool:
        """Whether nothing can refuse the start: nothing to admit, no limit on any of its
        counters (on PostgreSQL such starts are batched as one statement)."""
        return self.admit is None and all(i.limit is None for i in self.increments)


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
        counter, so that on PostgreSQL one statement can do it with others like it
        (`_commit_alone_updates`)."""
        return self.then is None and not self.rebase and not self.warnings


# (user_id, period) -> the token counter's (used, seq) once the transaction committed.
Counters = dict[tuple[str, str], tuple[int, int]]


def _one_or_many(rows: list[dict[str, object]]) -> list[dict[str, object]] | dict[str, object]:
    """Parameters for `execute`: a single row runs as a plain statement, cheaper than
    the executemany path (the common case when the server is not busy)."""
    return rows[0] if len(rows) == 1 else rows


class UsageWriter:
    """The group commits of one `Metering`."""

    def __init__(self, engine: AsyncEngine, warnings: QuotaWarnings) -> None:
        self._engine = engine
        self._warnings = warnings
        self._postgres = engine.dialect.name == "postgresql"
        # The statements of the driver's paths, compiled once for it, and the
        # connection each of their queues holds (its batches run one at a time).
        self._driven: dict[sa.TextClause, DriverStatement] = {}
        self._start_connection = DriverConnection(engine)
        self._checked_start_connection = DriverConnection(engine)
        self._update_connection = DriverConnection(engine)
        # Batched updates join `usage_logs` on a JSON recordset: planned for each batch,
        # as a plan kept from when the table was young would read all of it.
        self._batch_update_connection = DriverConnection(engine, settings=PLAN_EACH_RUN)
        self._starts = Batcher("usage-starts", self._commit_starts, lambda start: start)
        self._updates = Batcher(
            "usage-updates", self._commit_updates, lambda w: replace(w, rebase=True)
        )
        # PostgreSQL only: SQLite has one writer, which a second queue would wait for.
        self._unlimited_starts = Batcher(
            "usage-starts-unlimited", self._commit_unlimited, lambda start: start
        )
        self._alone_updates = Batcher(
            "usage-updates-alone", self._commit_alone_updates, lambda w: replace(w, rebase=True)
        )

    def start(self, start: RequestStart) -> asyncio.Future[Counted]:
        """Insert the row and apply the increments, unless `admit` refuses (it raises).

        What became of each increment: the counter's (used, seq), or None where its
        limit refused it.
        """
        if self._postgres and start.unlimited:
            return self._unlimited_starts.submit(start)
        return self._starts.submit(start)

    async def write(self, write: UsageWrite) -> tuple[int, int] | None:
        """Commit `write`; its user's token counter after it, or None if it added nothing."""
        queue = self._alone_updates if self._postgres and write.alone else self._updates
        counters = await queue.submit(write)
        return counters.get((write.user_id, write.period)) if write.delta else None

    async def _commit_starts(self, starts: list[RequestStart]) -> list[Counted | Exception]:
        """One transaction for all starts admitted; one that is refused is left out and
        the rest run again (refusals are rare: a user out of quota)."""
        if not self._postgres and all(start.unlimited for start in starts):
            return await self._commit_unlimited_sqlite(starts)
        if self._postgres and len(starts) == 1:
            with contextlib.suppress(TransactionNeeded):
                return [await self._commit_lone_start(starts[0])]
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

    async def _commit_lone_start(self, start: RequestStart) -> Counted:
        """A start alone (the server not busy) that a limit may refuse, on PostgreSQL:
        its row and counters in one statement and `admit` judging from the counts
        alone, on a held connection. A refusal with a count to read or an event to
        queue (`TransactionNeeded`) is left to SQLAlchemy's transaction: such starts
        are rare, and the judging of the common case costs a fraction of SQLAlchemy's
        transaction."""
        admit = start.admit
        insert = RowInsert(usage_logs, start.row)
        try:
            statement, params = increments_upsert(start.user_id, start.increments, insert)
        except ValueError:
            raise TransactionNeeded from None  # every increment past its limit

        async def judge(rows: list[Any]) -> Counted:
            counted = _counted(start, rows)
            if admit is not None:
                await admit(None, counted)
            return counted

        connection = self._checked_start_connection
        return await connection.fetch_judged(self._driver(statement), params, judge)

    async def close(self) -> None:
        """Hand the held connections back to the pool."""
        await self._start_connection.close()
        await self._checked_start_connection.close()
        await self._update_connection.close()
        await self._batch_update_connection.close()

    def _driver(self, statement: sa.TextClause) -> DriverStatement:
        if (driven := self._driven.get(statement)) is None:
            driven = self._driven[statement] = DriverStatement(statement, self._engine.dialect)
        return driven

    async def _commit_unlimited(self, starts: list[RequestStart]) -> list[Counted | Exception]:
        """Starts nothing can refuse, on PostgreSQL: all their rows and all their
        counters (one change per counter, as folded by `_fold`) in one statement that
        commits on its own. A lone start (the server not busy) takes a statement of
        its own shape: plain values, which PostgreSQL runs faster for one row."""
        connection = self._start_connection
        if len(starts) == 1:
            [start] = starts
            insert = RowInsert(usage_logs, start.row)
            statement, params = increments_upsert(start.user_id, start.increments, insert)
            rows = await connection.fetch(self._driver(statement), params)
            return [_counted(start, rows)]
        by_keys: dict[tuple[str, ...], list[dict[str, object]]] = {}
        for start in starts:
            by_keys.setdefault(tuple(start.row), []).append(start.row)
        keysets = tuple(sorted(by_keys))
        params = _records([by_keys[keys] for keys in keysets])
        by_user = _by_user(starts)
        changes = _fold(starts, by_user, by_user).values()
        params["changes"] = _json(
            [
                (c.subject, c.increment.metric, c.increment.period, c.increment.amount, c.steps)
                for c in changes
            ]
        )
        driven = self._driver(_rows_inserted_and_counted(keysets, self._engine.dialect))
        rows = await connection.fetch(driven, params)
        found = {(r["user_id"], r["metric"], r["period"]): (r["used"], r["seq"]) for r in rows}
        counted: list[Counted] = [[] for _ in starts]
        _views(starts, by_user, by_user, found, counted)
        return list(counted)

    async def _commit_unlimited_sqlite(
        self, starts: list[RequestStart]
    ) -> list[Counted | Exception]:
        """Starts nothing can refuse, on SQLite: all their rows and all their counters
        (one change per counter, as folded by `_fold`) in one transaction on the
        driver's thread."""
        by_keys: dict[tuple[str, ...], list[dict[str, object]]] = {}
        for start in starts:
            by_keys.setdefault(tuple(start.row), []).append(start.row)
        inserts = []
        for keys, rows in by_keys.items():
            driven = self._driver(_row_inserted(keys))
            inserts.append((driven.sql, [driven.arguments(row) for row in rows]))
        by_user = _by_user(starts)
        upserts = self._upserts(list(_fold(starts, by_user, by_user).values()))

        def run(connection: sqlite3.Connection) -> dict[CounterKey, tuple[int, int]]:
            for sql, rows in inserts:
                connection.executemany(sql, rows)
            return _counters_after(connection, upserts)

        found = await self._start_connection.transaction(run)
        counted: list[Counted] = [[] for _ in starts]
        _views(starts, by_user, by_user, found, counted)
        return list(counted)

    def _upserts(self, changes: list[CounterChange]) -> list[tuple[str, list[object]]]:
        """`counter_upserts` of `changes`, as the driver runs them."""
        upserts = []
        for statement, params in counter_upserts(changes):
            driven = self._driver(statement)
            upserts.append((driven.sql, driven.arguments(params)))
        return upserts

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
        if not self._postgres and _alone_and_distinct(writes):
            return await self._commit_alone_updates_sqlite(writes)
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

    async def _commit_alone_updates(self, writes: list[UsageWrite]) -> list[Counters | Exception]:
        """Writes that need nothing but their rows and counters, on PostgreSQL: all of
        them in one statement that commits on its own.

        A counter moves only with rows that exist, as it must stay the sum of the rows.
        A write retried after its batch failed must read its row first (`rebase`), and
        two writes of one row cannot share the statement: those go in a transaction.
        """
        if not _alone_and_distinct(writes):
            return await self._commit_updates(writes)
        if len(writes) == 1:  # the server not busy: plain values run faster for one row
            [write] = writes
            params = {**write.row, "delta": write.delta}
            driven = self._driver(_row_updated_and_counted(frozenset(write.row)))
            found = await self._update_connection.fetch(driven, params)
            return [{(r["user_id"], r["period"]): (r["used"], r["seq"]) for r in found}]
        by_keys: dict[tuple[str, ...], list[dict[str, object]]] = {}
        for write in writes:
            by_keys.setdefault((*sorted(write.row), "delta"), []).append(
                {**write.row, "delta": write.delta}
            )
        keysets = tuple(sorted(by_keys))  # one statement per combination, whatever the order
        params = _records([by_keys[keys] for keys in keysets])
        driven = self._driver(_rows_updated_and_counted(keysets, self._engine.dialect))
        found = await self._batch_update_connection.fetch(driven, params)
        counters = {(r["user_id"], r["period"]): (r["used"], r["seq"]) for r in found}
        return [counters] * len(writes)

    async def _commit_alone_updates_sqlite(
        self, writes: list[UsageWrite]
    ) -> list[Counters | Exception]:
        """Writes that need nothing but their rows and counters, on SQLite: all of them
        in one transaction on the driver's thread. As on PostgreSQL, a counter moves
        only with rows that exist, once per transaction."""
        updates = []
        for write in writes:
            driven = self._driver(_row_updated(frozenset(write.row)))
            updates.append((driven.sql, driven.arguments(write.row), write))

        def run(connection: sqlite3.Connection) -> dict[CounterKey, tuple[int, int]]:
            deltas: dict[tuple[str, str], int] = {}
            for sql, args, write in updates:
                if connection.execute(sql, args).rowcount and write.delta:
                    key = (write.user_id, write.period)
                    deltas[key] = deltas.get(key, 0) + write.delta
            return _counters_after(connection, self._upserts(token_changes(deltas)))

        found = await self._update_connection.transaction(run)
        counters = {(user, period): counter for (user, _, period), counter in found.items()}
        return [counters] * len(writes)


def _counted(start: RequestStart, rows: Iterable[Any]) -> Counted:
    """What became of each of a lone start's increments, from the rows its statement
    (`increments_upsert`) returned: the counter's (used, seq), or None if refused."""
    counters = {(row["metric"], row["period"]): (row["used"], row["seq"]) for row in rows}
    return [counters.get((i.metric, i.period)) for i in start.increments]


def _json(value: object) -> str:
    return orjson.dumps(value).decode()


def _records(groups: list[list[dict[str, object]]]) -> dict[str, object]:
    """The parameters of `_recordset`: the `n`th keyset's rows as one JSON array, `rows_n`.

    One JSON text per keyset rather than an array per column: asyncpg encodes arrays
    element by element, checking each element against abstract base classes. A dozen
    rows of `usage_logs` cost the client 175 µs of CPU as arrays and 65 µs as JSON
    (asyncpg alone, no SQLAlchemy bind processing); PostgreSQL's JSON parser runs on
    the database's CPU, not the relay's.
    """
    return {f"rows_{n}": _json(group) for n, group in enumerate(groups)}


def _recordset(keys: tuple[str, ...], n: int, dialect: sa.Dialect) -> str:
    """The rows of `rows_n` (see `_records`) as a table `d_n` with the columns `keys`,
    each typed as its column of `usage_logs` (`row_id` as `id`; `delta` a BIGINT)."""
    columns: list[str] = []
    for key in keys:
        column_type = (
            sa.BigInteger()
            if key == "delta"
            else usage_logs.c["id" if key == "row_id" else key].type
        )
        columns.append(f"{key} {column_type.compile(dialect=dialect)}")
    return f"json_to_recordset(CAST(:rows_{n} AS JSON)) AS d_{n} ({', '.join(columns)})"


def _recordset_binds(count: int) -> list[sa.BindParameter[object]]:
    return [sa.bindparam(f"rows_{n}", type_=sa.Text()) for n in range(count)]


# Adds a SELECT's rows (user_id, metric, period, amount, steps), in the order counter
# rows are to be locked, to their counters, without limits.
_ADD_TO_COUNTERS = (
    "INSERT INTO quota_counters (user_id, metric, period, used, seq) {rows} "
    "ON CONFLICT (user_id, metric, period) DO UPDATE "
    "SET used = quota_counters.used + excluded.used, seq = quota_counters.seq + excluded.seq "
    "RETURNING user_id, metric, period, used, seq"
)


@functools.cache
def _row_updated_and_counted(keys: frozenset[str]) -> sa.TextClause:
    """PostgreSQL: `_rows_updated_and_counted` for one row, its values as they are."""
    columns = sorted(keys - {"row_id"})
    assignments = ", ".join(f"{name} = :{name}" for name in columns)
    updated = (
        f"updated AS (UPDATE usage_logs SET {assignments} WHERE id = :row_id "
        "RETURNING user_id, period)"
    )
    counted = (
        f"SELECT user_id, '{TOKENS}', period, delta, 1 "
        "FROM updated, (SELECT CAST(:delta AS BIGINT) AS delta) AS d WHERE delta <> 0"
    )
    return sa.text(f"WITH {updated} " + _ADD_TO_COUNTERS.format(rows=counted)).bindparams(
        *(sa.bindparam(name, type_=usage_logs.c[name].type) for name in columns),
        sa.bindparam("delta", type_=sa.BigInteger()),
    )


@functools.cache
def _rows_inserted_and_counted(
    keysets: tuple[tuple[str, ...], ...], dialect: sa.Dialect
) -> sa.TextClause:
    """PostgreSQL: insert rows of `usage_logs` (each keyset's rows as JSON, see
    `_records`) and add `changes` (a JSON array of [user_id, metric, period, amount,
    steps], in the order counter rows are to be locked) to their counters, in one
    statement; each counter's `used` and `seq` after it. Written out, as a
    data-modifying WITH is PostgreSQL's own."""
    inserts = [
        f"inserted_{n} AS (INSERT INTO usage_logs ({', '.join(keys)}) "
        f"SELECT {', '.join(keys)} FROM {_recordset(keys, n, dialect)})"
        for n, keys in enumerate(keysets)
    ]
    changes = (
        "SELECT c->>0, c->>1, c->>2, CAST(c->>3 AS BIGINT), CAST(c->>4 AS BIGINT) "
        "FROM json_array_elements(CAST(:changes AS JSON)) AS c"
    )
    return sa.text(
        f"WITH {', '.join(inserts)} " + _ADD_TO_COUNTERS.format(rows=changes)
    ).bindparams(*_recordset_binds(len(keysets)), sa.bindparam("changes", type_=sa.Text()))


@functools.cache
def _rows_updated_and_counted(
    keysets: tuple[tuple[str, ...], ...], dialect: sa.Dialect
) -> sa.TextClause:
    """PostgreSQL: update rows of `usage_logs` (each keyset's rows as JSON, see
    `_records`, `row_id` naming the row) and add each row's `delta` to its user's token
    counter, in one statement; each counter's `used` and `seq` after it (a row that does
    not exist moves nothing). One statement per combination of keysets (checkpoints',
    ends'), so each is prepared once per connection."""
    updates: list[str] = []
    for n, keys in enumerate(keysets):
        assignments = ", ".join(f"{k} = d_{n}.{k}" for k in keys if k not in ("row_id", "delta"))
        updates.append(
            f"updated_{n} AS (UPDATE usage_logs SET {assignments} "
            f"FROM {_recordset(keys, n, dialect)} WHERE usage_logs.id = d_{n}.row_id "
            f"RETURNING usage_logs.user_id, usage_logs.period, d_{n}.delta)"
        )
    updated = " UNION ALL ".join(f"SELECT * FROM updated_{n}" for n in range(len(keysets)))
    # One step per counter and statement, as per transaction on the other path.
    sums = (
        f"SELECT user_id, '{TOKENS}', period, CAST(sum(delta) AS BIGINT), 1 "
        f"FROM ({updated}) AS updated WHERE delta <> 0 "
        "GROUP BY user_id, period ORDER BY user_id, period"
    )
    return sa.text(f"WITH {', '.join(updates)} " + _ADD_TO_COUNTERS.format(rows=sums)).bindparams(
        *_recordset_binds(len(keysets))
    )


def _alone_and_distinct(writes: list[UsageWrite]) -> bool:
    """Whether the driver may run `writes` together: each needs nothing but its row and
    its counter, and no two write one row."""
    rows = {write.row["row_id"] for write in writes}
    return len(rows) == len(writes) and all(write.alone for write in writes)


@functools.cache
def _row_inserted(keys: tuple[str, ...]) -> sa.TextClause:
    """SQLite: a row of `usage_logs` inserted with these columns."""
    return sa.text(
        f"INSERT INTO usage_logs ({', '.join(keys)}) VALUES ({', '.join(f':{k}' for k in keys)})"
    ).bindparams(*(sa.bindparam(key, type_=usage_logs.c[key].type) for key in keys))


@functools.cache
def _row_updated(keys: frozenset[str]) -> sa.TextClause:
    """SQLite: a row of `usage_logs` updated (`row_id` naming it)."""
    columns = sorted(keys - {"row_id"})
    assignments = ", ".join(f"{name} = :{name}" for name in columns)
    return sa.text(f"UPDATE usage_logs SET {assignments} WHERE id = :row_id").bindparams(
        *(sa.bindparam(name, type_=usage_logs.c[name].type) for name in columns),
        sa.bindparam("row_id", type_=usage_logs.c.id.type),
    )


def _counters_after(
    connection: sqlite3.Connection, upserts: list[tuple[str, list[object]]]
) -> dict[CounterKey, tuple[int, int]]:
    """SQLite, on the driver's thread: run `upserts`; each counter's (used, seq) after."""
    found: dict[CounterKey, tuple[int, int]] = {}
    for sql, args in upserts:
        for user_id, metric, period, used, seq in connection.execute(sql, args):
            found[(user_id, metric, period)] = (used, seq)
    return found


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


def _by_user(starts: list[RequestStart]) -> dict[str, list[int]]:
    """The starts' positions, by user."""
    by_user: dict[str, list[int]] = {}
    for n, start in enumerate(starts):
        by_user.setdefault(start.user_id, []).append(n)
    return by_user


def _fold(
    starts: list[RequestStart], by_user: dict[str, list[int]], users: Iterable[str]
) -> dict[CounterKey, CounterChange]:
    """The increments of `users`' starts folded into one change per counter, each
    limit folded to the smallest; in the order counter rows are locked."""
    # Summed apart, and the changes built once per counter rather than once per step.
    amounts: dict[CounterKey, int] = {}
    steps: dict[CounterKey, int] = {}
    limits: dict[CounterKey, int | None] = {}
    for user in users:
        for n in by_user[user]:
            for inc in starts[n].increments:
                key = (user, inc.metric, inc.period)
                if key not in amounts:
                    amounts[key], steps[key], limits[key] = inc.amount, 1, inc.limit
                    continue
                amounts[key] += inc.amount
                steps[key] += 1
                if inc.limit is not None:
                    limit = limits[key]
                    limits[key] = inc.limit if limit is None else min(limit, inc.limit)
    return {
        key: CounterChange(key[0], Increment(key[1], key[2], amounts[key], limits[key]), steps[key])
        for key in sorted(amounts)
    }


def _views(
    starts: list[RequestStart],
    by_user: dict[str, list[int]],
    users: Iterable[str],
    found: dict[CounterKey, tuple[int, int]],
    counted: list[Counted],
) -> None:
    """Into `counted`, the view of each of `users`' starts of its counters after their
    folded changes (`found`): the counter after the sum, less what later starts of its
    user added, as if they ran one by one."""
    later: dict[CounterKey, tuple[int, int]] = {}
    for user in users:
        for n in reversed(by_user[user]):
            views: Counted = []
            for inc in starts[n].increments:
                key = (user, inc.metric, inc.period)
                after = found.get(key)
                amount, steps = later.get(key, (0, 0))
                views.append(None if after is None else (after[0] - amount, after[1] - steps))
                later[key] = (amount + inc.amount, steps + 1)
            counted[n] = views


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
    counted: list[Counted] = [[] for _ in starts]
    by_user = _by_user(starts)
    # Runs of users folded together, split where a user is counted singly.
    batch: list[str] = []
    for user in [*sorted(by_user), None]:
        if user is not None and user not in singly:
            batch.append(user)
            continue
        if batch:
            folded = _fold(starts, by_user, batch)
            found = await apply_increments(conn, list(folded.values()))
            for key, change in folded.items():
                limited = change.increment.limit is not None
                if limited and key not in found and change.steps > 1:
                    singly.add(key[0])
                    return None
            _views(starts, by_user, batch, found, counted)
            batch = []
        if user is not None:
            for n in by_user[user]:
                counted[n] = await increment_counters(conn, user, starts[n].increments)
    return counted
