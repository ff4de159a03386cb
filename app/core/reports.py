"""Usage reports over `usage_logs`: totals by model and by day, and paged listings."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from app.core.errors import BadRequest
from app.core.pagination import Page
from app.core.tables import usage_logs

MAX_RANGE_DAYS = 366
DEFAULT_RANGE_DAYS = 30


@dataclass(frozen=True, slots=True)
class Totals:
    requests: int
    tokens: int
    cost: float


@dataclass(frozen=True, slots=True)
class UsageReport:
    start: datetime
    end: datetime
    total: Totals
    by_model: dict[str, Totals]
    by_date: list[tuple[str, Totals]]


def parse_range(start: str | None, end: str | None) -> tuple[datetime, datetime]:
    """[start, end) in UTC from ISO dates or datetimes; the last 30 days by default."""
    now = datetime.now(UTC)
    end_at = _instant(end, "end_date", end_of_day=True) if end else now
    try:
        start_at = (
            _instant(start, "start_date", end_of_day=False)
            if start
            else end_at - timedelta(days=DEFAULT_RANGE_DAYS)
        )
    except OverflowError:
        raise BadRequest("`end_date` is out of range") from None
    if start_at >= end_at:
        raise BadRequest("start_date must be before end_date")
    if end_at - start_at > timedelta(days=MAX_RANGE_DAYS):
        raise BadRequest(f"the date range may span at most {MAX_RANGE_DAYS} days")
    return start_at, end_at


def _instant(value: str, field: str, *, end_of_day: bool) -> datetime:
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            at = datetime.combine(day, time(), tzinfo=UTC)
            return at + timedelta(days=1) if end_of_day else at
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        # In UTC, as stored: SQLite compares the text, and a time one offset away from
        # year 1 or 9999 is outside what a datetime holds.
        return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except ValueError:
        raise BadRequest(f"`{field}` must be an ISO date or datetime") from None
    except OverflowError:
        raise BadRequest(f"`{field}` is out of range") from None


async def usage_report(
    engine: AsyncEngine, user_id: str, start: datetime, end: datetime, model: str | None
) -> UsageReport:
    where = [
        usage_logs.c.user_id == user_id,
        usage_logs.c.started_at >= start,
        usage_logs.c.started_at < end,
    ]
    if model:
        where.append(usage_logs.c.model == model)
    async with engine.connect() as conn:
        by_model_rows = await conn.execute(
            sa.select(
                usage_logs.c.model,
                sa.func.count(),
                sa.func.coalesce(sa.func.sum(usage_logs.c.total_tokens), 0),
                sa.func.coalesce(sa.func.sum(usage_logs.c.cost), 0.0),
            )
            .where(*where)
            .group_by(usage_logs.c.model)
        )
        by_model = {
            row[0]: Totals(int(row[1]), int(row[2]), round(float(row[3]), 8))
            for row in by_model_rows
        }
        # Days are grouped here rather than in SQL: date functions differ by backend and
        # by the server's time zone, while the range is bounded to a year of one user.
        day_rows = await conn.execute(
            sa.select(usage_logs.c.started_at, usage_logs.c.total_tokens, usage_logs.c.cost).where(
                *where
            )
        )
        days: dict[str, list[float]] = {}
        for started_at, tokens, cost in day_rows:
            bucket = days.setdefault(started_at.astimezone(UTC).date().isoformat(), [0, 0, 0.0])
            bucket[0] += 1
            bucket[1] += int(tokens)
            bucket[2] += float(cost)
    total = Totals(
        sum(t.requests for t in by_model.values()),
        sum(t.tokens for t in by_model.values()),
        round(sum(t.cost for t in by_model.values()), 8),
    )
    by_date = [
        (day, Totals(int(v[0]), int(v[1]), round(v[2], 8))) for day, v in sorted(days.items())
    ]
    return UsageReport(start, end, total, by_model, by_date)


async def list_usage(
    engine: AsyncEngine, user_id: str, page: Page
) -> tuple[list[dict[str, Any]], int]:
    owned = usage_logs.c.user_id == user_id
    order = usage_logs.c.started_at.desc() if page.descending else usage_logs.c.started_at.asc()
    async with engine.connect() as conn:
        total = (
            await conn.execute(sa.select(sa.func.count()).select_from(usage_logs).where(owned))
        ).scalar_one()
        rows = await conn.execute(
            sa.select(usage_logs)
            .where(owned)
            .order_by(order, usage_logs.c.id)
            .limit(page.size)
            .offset(page.offset)
        )
        return [dict(row._mapping) for row in rows], int(total)
