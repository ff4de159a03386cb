"""Token quotas: the monthly period, the fast counter, and the snapshot clients see."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

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


async def add_tokens(
    conn: AsyncConnection, user_id: str, period: str, delta: int
) -> tuple[int, int]:
    """Add `delta` to the user's counter for `period`; return (used, seq) after it."""
    insert = dialect_insert(conn)
    stmt = insert(quota_counters).values(
        user_id=user_id, metric=TOKENS, period=period, used=delta, seq=1
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[quota_counters.c.user_id, quota_counters.c.metric, quota_counters.c.period],
        set_={"used": quota_counters.c.used + delta, "seq": quota_counters.c.seq + 1},
    ).returning(quota_counters.c.used, quota_counters.c.seq)
    row = (await conn.execute(stmt)).one()
    return int(row.used), int(row.seq)


async def read_tokens(conn: AsyncConnection, user_id: str, period: str) -> tuple[int, int]:
    row = (
        await conn.execute(
            sa.select(quota_counters.c.used, quota_counters.c.seq).where(
                quota_counters.c.user_id == user_id,
                quota_counters.c.metric == TOKENS,
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
        used, seq = await read_tokens(conn, user_id, period)
    return QuotaSnapshot(limit=limit, used=used, period=period, seq=seq)


async def reconcile_tokens(engine: AsyncEngine, user_id: str, period: str) -> int:
    """Reset the counter to the sum over `usage_logs`; return that sum.

    Counter and rows are written in one transaction, so they only drift if the
    database was edited by hand; this is the repair for that.
    """
    async with engine.begin() as conn:
        total = (
            await conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(usage_logs.c.total_tokens), 0)).where(
                    usage_logs.c.user_id == user_id, usage_logs.c.period == period
                )
            )
        ).scalar_one()
        used, _ = await read_tokens(conn, user_id, period)
        if used != total:
            await add_tokens(conn, user_id, period, int(total) - used)
    return int(total)
