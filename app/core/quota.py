"""Token quotas: the monthly period, the fast counter, and the snapshot clients see."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.core.db import dialect_insert
from app.core.tables import quota_counters, usage_logs

TOKENS = "tokens"
# What an unlimited quota reports: the largest integer a JavaScript client holds exactly,
# so `remaining <= 0` checks in existing clients keep working.
UNLIMITED = 2**53 - 1


def month_period(at: datetime) -> str:
    return f"{at.year:04d}-{at.month:02d}"


def period_reset(period: str) -> datetime:
    """The instant the month `period` ("YYYY-MM") ends, when its quota resets."""
    year, month = (int(part) for part in period.split("-"))
    if month == 12:
        return datetime(year + 1, 1, 1, tzinfo=UTC)
    return datetime(year, month + 1, 1, tzinfo=UTC)


def iso_z(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
            "resetDate": iso_z(period_reset(self.period)),
        }

    def as_message(self) -> str:
        """The `/ws/quota` message, encoded once and fanned out as is."""
        return json.dumps(
            {"type": "quota", **self.as_dict(), "unlimited": self.limit is None, "seq": self.seq},
            separators=(",", ":"),
        )


def _counter_upsert(
    conn: AsyncConnection,
    subject: str,
    metric: str,
    period: str,
    amount: int,
    where: sa.ColumnElement[bool] | None = None,
) -> Any:
    """Add `amount` to a counter row, creating it; with `where`, only if it holds."""
    insert = dialect_insert(conn)
    return (
        insert(quota_counters)
        .values(user_id=subject, metric=metric, period=period, used=amount, seq=1)
        .on_conflict_do_update(
            index_elements=[
                quota_counters.c.user_id,
                quota_counters.c.metric,
                quota_counters.c.period,
            ],
            set_={"used": quota_counters.c.used + amount, "seq": quota_counters.c.seq + 1},
            where=where,
        )
        .returning(quota_counters.c.used, quota_counters.c.seq)
    )


async def add_tokens(
    conn: AsyncConnection, user_id: str, period: str, delta: int
) -> tuple[int, int]:
    """Add `delta` to the user's counter for `period`; return (used, seq) after it."""
    row = (await conn.execute(_counter_upsert(conn, user_id, TOKENS, period, delta))).one()
    return int(row.used), int(row.seq)


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
    day = datetime(now.year, now.month, now.day, tzinfo=UTC)
    # Keys fit `quota_counters.period` (16 characters).
    if per == "minute":
        start = now.replace(second=0, microsecond=0)
        return f"n:{start:%Y%m%d%H%M}", start + timedelta(minutes=1)
    if per == "hour":
        start = now.replace(minute=0, second=0, microsecond=0)
        return f"h:{start:%Y%m%d%H}", start + timedelta(hours=1)
    if per == "day":
        return f"d:{day:%Y-%m-%d}", day + timedelta(days=1)
    if per == "week":
        year, week, weekday = now.isocalendar()
        return f"w:{year}-W{week:02d}", day + timedelta(days=8 - weekday)
    if per == "month":
        period = month_period(now)
        return f"m:{period}", period_reset(period)
    if per == "lifetime":
        return "all", None
    raise ValueError(f"unknown period {per!r}")


async def increment_within(
    conn: AsyncConnection, subject: str, metric: str, period: str, amount: int, limit: int | None
) -> int | None:
    """Add `amount` unless that would pass `limit`; the new value, or None if refused.

    One conditional upsert: concurrent callers serialize on the row, so the limit
    holds exactly whatever the concurrency.
    """
    if limit is not None and amount > limit:
        return None
    where = None if limit is None else quota_counters.c.used + amount <= limit
    row = (
        await conn.execute(_counter_upsert(conn, subject, metric, period, amount, where))
    ).first()
    return None if row is None else int(row.used)


async def decrement_counter(conn: AsyncConnection, subject: str, metric: str, period: str) -> None:
    """Give one back, never below zero (a refund for a window already gone does nothing)."""
    await conn.execute(
        quota_counters.update()
        .where(
            quota_counters.c.user_id == subject,
            quota_counters.c.metric == metric,
            quota_counters.c.period == period,
            quota_counters.c.used > 0,
        )
        .values(used=quota_counters.c.used - 1, seq=quota_counters.c.seq + 1)
    )


async def read_counter(conn: AsyncConnection, subject: str, metric: str, period: str) -> int:
    used, _ = await read_counter_state(conn, subject, metric, period)
    return used
