"""Token quotas: the monthly period, the fast counter, and the snapshot clients see."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.core.tables import quota_counters, usage_logs

TOKENS = "tokens"
# What an unlimited quota reports: the largest integer a JavaScript client holds exactly,
# so `remaining <= 0` checks in existing clients keep working.
UNLIMITED = 2**53 - 1


def month_period(at: datetime) -> str:
    return f"{at.year:04d}-{at.month:02d}"


def period_reset(period: str) -> datetime:
    """The instant the month `period` ("YYYY-MM") ends, when its quota resets."""
    year, month = int(period[:4]), int(period[5:7])
    if month == 12:
        return datetime(year + 1, 1, 1, tzinfo=UTC)
    return datetime(year, month + 1, 1, tzinfo=UTC)


def iso_z(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@functools.lru_cache(maxsize=16)
def reset_date(period: str) -> str:
    """`period_reset` as clients see it; one per month, and wanted by every push."""
    return iso_z(period_reset(period))


@dataclass(frozen=True, slots=True)
class QuotaSnapshot:
    """A user's token quota at one moment; `seq` orders snapshots of one period."""

    limit: int | None
    used: int
    period: str
    seq: int

    @property
    def total(self) -> int:
        return UNLIMITED if self.limit is None else self.limit

    @property
    def remaining(self) -> int:
        return max(self.total - self.used, 0)

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.used >= self.limit

    def as_dict(self) -> dict[str, object]:
        return {
            "total": self.total,
            "used": self.used,
            "remaining": self.remaining,
            "resetDate": reset_date(self.period),
        }

    def as_message(self) -> str:
        """The `/ws/quota` message, encoded once and fanned out as is."""
        return orjson.dumps(
            {"type": "quota", **self.as_dict(), "unlimited": self.limit is None, "seq": self.seq}
        ).decode()


@dataclass(frozen=True, slots=True)
class Increment:
    """Add `amount` to the counter (`metric`, `period`) unless that would pass `limit`."""

    metric: str
    period: str
    amount: int
    limit: int | None = None


# A counter as `apply_increments` keys it: (subject, metric, period).
CounterKey = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class CounterChange:
    """`increment` applied to `subject`'s counter as `steps` changes (its `seq` grows
    by that much, so changes folded into one keep their own places in the order)."""

    subject: str
    increment: Increment
    steps: int = 1


@dataclass(frozen=True, slots=True)
class RowInsert:
    """A row to insert by the same statement as the counters: PostgreSQL only (a
    data-modifying WITH), where it saves the round trip of a statement of its own."""

    table: sa.Table
    values: dict[str, object]


@functools.cache
def _counters_upsert(
    rows: int, insert: tuple[sa.Table, tuple[str, ...]] | None = None
) -> sa.TextClause:
    """One statement adding to `rows` counters, each only within its limit; with
    `insert`, inserting a row of that table with those columns first.

    Written out (the same SQL on PostgreSQL and SQLite) rather than built per call: a
    multi-row upsert is not cached by SQLAlchemy, and building one costs several times
    more than running it. A row whose limit would be passed is left alone and is
    missing from what the statement returns.
    """
    inserting = ""
    typed: list[sa.BindParameter[object]] = []
    if insert is not None:
        table, columns = insert
        inserting = (
            f"WITH inserted AS (INSERT INTO {table.name} ({', '.join(columns)}) "
            f"VALUES ({', '.join(f':{c}' for c in columns)})) "
        )
        typed = [sa.bindparam(c, type_=table.c[c].type) for c in columns]
    values = ", ".join(
        f"(:subject_{i}, :metric_{i}, :period_{i}, :amount_{i}, :steps_{i})" for i in range(rows)
    )
    limits = " ".join(
        f"WHEN quota_counters.user_id = :subject_{i} AND quota_counters.metric = :metric_{i} "
        f"AND quota_counters.period = :period_{i} THEN CAST(:limit_{i} AS BIGINT)"
        for i in range(rows)
    )
    return sa.text(
        f"{inserting}"
        f"INSERT INTO quota_counters (user_id, metric, period, used, seq) VALUES {values} "
        "ON CONFLICT (user_id, metric, period) DO UPDATE "
        "SET used = quota_counters.used + excluded.used, seq = quota_counters.seq + excluded.seq "
        f"WHERE quota_counters.used + excluded.used <= CASE {limits} ELSE {UNLIMITED} END "
        "RETURNING user_id, metric, period, used, seq"
    ).bindparams(
        *(sa.bindparam(f"amount_{i}", type_=sa.BigInteger) for i in range(rows)),
        *(sa.bindparam(f"limit_{i}", type_=sa.BigInteger) for i in range(rows)),
        *(sa.bindparam(f"steps_{i}", type_=sa.BigInteger) for i in range(rows)),
        *typed,
    )


# Rows per statement: a count is split into its binary digits up to this, so a few
# statement shapes serve any count and stay in the prepared-statement cache.
_MAX_ROWS = 64


def _applicable(changes: Sequence[CounterChange]) -> list[CounterChange]:
    """The changes a limit does not refuse outright, in the order counter rows are
    locked (see `apply_increments`)."""
    return sorted(
        (
            c
            for c in changes
            if c.increment.limit is None or c.increment.amount <= c.increment.limit
        ),
        key=lambda c: (c.subject, c.increment.metric, c.increment.period),
    )


def _upsert(
    changes: Sequence[CounterChange], insert: RowInsert | None
) -> tuple[sa.TextClause, dict[str, object]]:
    """The statement applying `changes` (and inserting `insert` first), and its parameters."""
    params: dict[str, object] = {}
    for n, change in enumerate(changes):
        inc = change.increment
        params[f"subject_{n}"] = change.subject
        params[f"metric_{n}"] = inc.metric
        params[f"period_{n}"] = inc.period
        params[f"amount_{n}"] = inc.amount
        params[f"limit_{n}"] = UNLIMITED if inc.limit is None else inc.limit
        params[f"steps_{n}"] = change.steps
    if insert is None:
        return _counters_upsert(len(changes)), params
    params.update(insert.values)
    return _counters_upsert(len(changes), (insert.table, tuple(insert.values))), params


def counter_upserts(
    changes: Sequence[CounterChange], insert: RowInsert | None = None
) -> list[tuple[sa.TextClause, dict[str, object]]]:
    """The statements applying `changes` (see `apply_increments`) and their parameters,
    in order: each of a few shapes of up to 64 rows; the first carries `insert`."""
    wanted = _applicable(changes)
    statements = []
    start = 0
    while start < len(wanted):
        size = min(_MAX_ROWS, 1 << ((len(wanted) - start).bit_length() - 1))
        statements.append(_upsert(wanted[start : start + size], insert))
        insert = None
        start += size
    return statements


async def apply_increments(
    conn: AsyncConnection, changes: Sequence[CounterChange], insert: RowInsert | None = None
) -> dict[CounterKey, tuple[int, int]]:
    """Apply each change within its limit; the (used, seq) after it of each counter
    changed. One refused by its limit is left alone and missing from the result.
    `insert` is inserted whatever becomes of the changes.

    The counters must be distinct. They are locked in sorted order whoever the
    caller, so concurrent transactions touching several cannot deadlock; concurrent
    callers serialize on the rows, so limits hold exactly whatever the concurrency.
    """
    statements = counter_upserts(changes, insert)
    found: dict[CounterKey, tuple[int, int]] = {}
    for statement, params in statements:
        for row in await conn.execute(statement, params):
            found[(row.user_id, row.metric, row.period)] = (int(row.used), int(row.seq))
    if insert is not None and not statements:  # no change to carry it
        await conn.execute(insert.table.insert(), insert.values)
    return found


def increments_upsert(
    subject: str, increments: Sequence[Increment], insert: RowInsert | None = None
) -> tuple[sa.TextClause, dict[str, object]]:
    """`increment_counters` as one statement, for a caller that runs it itself: the
    statement and its parameters. It returns a row (`user_id`, `metric`, `period`,
    `used`, `seq`) per counter changed; as one statement it is all or nothing even
    outside a transaction. An increment larger than its limit is left out (as by
    `increment_counters`); at least one must remain."""
    wanted = _applicable([CounterChange(subject, i) for i in increments])
    if not wanted or len(wanted) > _MAX_ROWS:
        raise ValueError(f"one statement takes 1 to {_MAX_ROWS} increments, not {len(wanted)}")
    return _upsert(wanted, insert)


async def increment_counters(
    conn: AsyncConnection,
    subject: str,
    increments: Sequence[Increment],
    insert: RowInsert | None = None,
) -> list[tuple[int, int] | None]:
    """Apply each increment within its limit, in one statement; per increment the
    counter's (used, seq) after it, or None where the limit refused it.

    The others are applied even where one is refused: a caller that wants all or
    none raises to roll its transaction back.
    """
    found = await apply_increments(conn, [CounterChange(subject, i) for i in increments], insert)
    return [found.get((subject, i.metric, i.period)) for i in increments]


def token_changes(deltas: dict[tuple[str, str], int]) -> list[CounterChange]:
    """The changes adding each (user_id, period)'s delta to its token counter."""
    return [
        CounterChange(user, Increment(TOKENS, period, delta))
        for (user, period), delta in deltas.items()
    ]


async def add_tokens_many(
    conn: AsyncConnection, deltas: dict[tuple[str, str], int]
) -> dict[tuple[str, str], tuple[int, int]]:
    """Add to many users' token counters; each (user_id, period)'s (used, seq) after it."""
    found = await apply_increments(conn, token_changes(deltas))
    return {(user, period): counter for (user, _, period), counter in found.items()}


async def add_tokens(
    conn: AsyncConnection, user_id: str, period: str, delta: int
) -> tuple[int, int]:
    """Add `delta` to the user's counter for `period`; return (used, seq) after it."""
    [counted] = await increment_counters(conn, user_id, [Increment(TOKENS, period, delta)])
    assert counted is not None  # no limit: always applied
    return counted


async def read_counter_state(
    conn: AsyncConnection, subject: str, metric: str, period: str
) -> tuple[int, int]:
    """A counter's (used, seq); (0, 0) before its first increment."""
    row = (
        await conn.execute(
            sa.select(quota_counters.c.used, quota_counters.c.seq).where(
                quota_counters.c.user_id == subject,
                quota_counters.c.metric == metric,
                quota_counters.c.period == period,
            )
        )
    ).first()
    return (0, 0) if row is None else (int(row.used), int(row.seq))


async def token_snapshot(
    engine: AsyncEngine, user_id: str, limit: int | None, now: datetime | None = None
) -> QuotaSnapshot:
    period = month_period(now or datetime.now(UTC))
    async with engine.connect() as conn:
        used, seq = await read_counter_state(conn, user_id, TOKENS, period)
    return QuotaSnapshot(limit=limit, used=used, period=period, seq=seq)


async def reconcile_tokens(engine: AsyncEngine, user_id: str, period: str) -> int:
    """Reset the counter to the sum over `usage_logs`; return that sum.

    Counter and rows are written in one transaction, so they only drift if the
    database was edited by hand; this is the repair for that. Safe under traffic: the
    zero increment first takes the counter row's lock (the database's write lock on
    SQLite), so no checkpoint commits between the sum and the correction.
    """
    async with engine.begin() as conn:
        used, _ = await add_tokens(conn, user_id, period, 0)
        total = (
            await conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(usage_logs.c.total_tokens), 0)).where(
                    usage_logs.c.user_id == user_id, usage_logs.c.period == period
                )
            )
        ).scalar_one()
        if used != total:
            await add_tokens(conn, user_id, period, int(total) - used)
    return int(total)


def period_window(per: str, now: datetime) -> tuple[str, datetime | None]:
    """The counter key of the calendar window (UTC) holding `now`, and when it resets."""
    now = now.astimezone(UTC)
    # Keys fit `quota_counters.period` (16 characters). Formatted field by field: a
    # `%Y-%m-%d` format spec costs several times more, and this runs per request.
    if per == "day":
        day = datetime(now.year, now.month, now.day, tzinfo=UTC)
        return f"d:{now.year:04d}-{now.month:02d}-{now.day:02d}", day + timedelta(days=1)
    if per == "week":
        year, week, weekday = now.isocalendar()
        day = datetime(now.year, now.month, now.day, tzinfo=UTC)
        return f"w:{year}-W{week:02d}", day + timedelta(days=8 - weekday)
    if per == "month":
        period = month_period(now)
        return f"m:{period}", period_reset(period)
    if per == "hour":
        start = now.replace(minute=0, second=0, microsecond=0)
        key = f"h:{now.year:04d}{now.month:02d}{now.day:02d}{now.hour:02d}"
        return key, start + timedelta(hours=1)
    if per == "minute":
        start = now.replace(second=0, microsecond=0)
        key = f"n:{now.year:04d}{now.month:02d}{now.day:02d}{now.hour:02d}{now.minute:02d}"
        return key, start + timedelta(minutes=1)
    if per == "lifetime":
        return "all", None
    raise ValueError(f"unknown period {per!r}")


async def increment_within(
    conn: AsyncConnection, subject: str, metric: str, period: str, amount: int, limit: int | None
) -> int | None:
    """Add `amount` unless that would pass `limit`; the new value, or None if refused."""
    [counted] = await increment_counters(conn, subject, [Increment(metric, period, amount, limit)])
    return None if counted is None else counted[0]


async def decrement_counter(
    conn: AsyncConnection, subject: str, metric: str, period: str, amount: int = 1
) -> None:
    """Give `amount` back, never below zero (a refund for a window already gone does
    nothing)."""
    used = quota_counters.c.used
    await conn.execute(
        quota_counters.update()
        .where(
            quota_counters.c.user_id == subject,
            quota_counters.c.metric == metric,
            quota_counters.c.period == period,
            used > 0,
        )
        .values(used=sa.case((used > amount, used - amount), else_=0), seq=quota_counters.c.seq + 1)
    )


async def read_counter(conn: AsyncConnection, subject: str, metric: str, period: str) -> int:
    used, _ = await read_counter_state(conn, subject, metric, period)
    return used
