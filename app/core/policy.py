"""The policy engine: request rates, AI request quotas, named counters, action limits.

Everything a tier limits is decided here, against shared state (Redis or SQL), so the
numbers hold across instances:
- request rate per caller (GCRA): every authenticated call, or per IP if anonymous;
- AI request quotas per calendar day/week/month (UTC): conditional SQL increments;
- named counters (`chat_messages` per day, `flashcard_generations` for life, ...);
- per-action limits with their scope (`otp_send` per email, per IP, ...).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.core.config import Settings, TierConfig
from app.core.db import TransactionNeeded
from app.core.errors import RateLimited
from app.core.quota import (
    Increment,
    decrement_counter,
    increment_counters,
    increment_within,
    period_window,
    read_counter,
)
from app.core.ratelimit import Decision, Rate, RateLimiter
from app.core.webhooks import QuotaWarnings

REQUESTS = "requests"
_REQUEST_WINDOWS = (("daily", "day"), ("weekly", "week"), ("monthly", "month"))


@dataclass(frozen=True, slots=True)
class WindowUsage:
    used: int
    limit: int | None
    reset_at: datetime | None

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else max(self.limit - self.used, 0)


class QuotaExhausted(RateLimited):
    """An AI request quota or a named counter is used up for its window."""

    code = "quota_exceeded"

    def __init__(self, message: str, *, window: str, usage: WindowUsage) -> None:
        wait = (usage.reset_at - datetime.now(UTC)).total_seconds() if usage.reset_at else 0
        retry = {"Retry-After": str(max(1, math.ceil(wait)))} if usage.reset_at else {}
        super().__init__(
            message,
            details={
                "window": window,
                "used": usage.used,
                "limit": usage.limit,
                "resetAt": int(usage.reset_at.timestamp()) if usage.reset_at else None,
            },
            headers=retry,
        )
        self.window = window
        self.usage = usage


class Policy:
    def __init__(self, settings: Settings, engine: AsyncEngine, limiter: RateLimiter) -> None:
        self._settings = settings
        self._engine = engine
        self._limiter = limiter
        self._warnings = QuotaWarnings(settings.webhooks.quota_warning_percents)
        # The request windows' (period, reset) for one UTC day: they change only at
        # midnight, and working them out costs more than the rest of the check.
        self._windows_day = -1
        self._windows: tuple[tuple[str, datetime | None], ...] = ()
        # Each tier's AI request increments on that day, made of its limits and those
        # windows: every relayed request takes them.
        self._increments: dict[str, tuple[Increment, ...]] = {}

    def tier(self, name: str) -> TierConfig:
        return self._settings.tier(name)

    # -- request rate -----------------------------------------------------------------

    def request_rate(self, tier_name: str, surface: str) -> Rate | None:
        tier = self.tier(tier_name)
        override = tier.surfaces.get(surface)
        per_minute = tier.requests_per_minute
        burst = tier.burst
        if override is not None:
            per_minute, burst = override.requests_per_minute, override.burst
        if per_minute is None:
            return None
        if per_minute == 0:
            return Rate(limit=0, period=60, burst=0)
        return Rate(limit=per_minute, period=60, burst=burst or per_minute)

    async def check_rate(self, caller: str, tier_name: str, surface: str) -> Decision | None:
        """One request by `caller` ("user:ID" or "ip:ADDR"); None when unlimited."""
        rate = self.request_rate(tier_name, surface)
        if rate is None:
            return None
        if rate.limit == 0:
            return Decision(False, 0, 60.0, 0, 60.0, 60.0)
        key = f"{caller}:{surface}" if surface in self.tier(tier_name).surfaces else caller
        return await self._limiter.hit(key, rate)

    async def limit_action(self, action: str, scope_value: str) -> Decision:
        """Count one `action` for its scope value; raise `RateLimited` past the limit."""
        config = self._settings.actions[action]
        # A sliding window, not a bucket: "3 per 10 minutes" must hold in any 10 minutes.
        decision = await self._limiter.hit_window(
            _action_key(action, scope_value), config.limit, config.window_seconds
        )
        if not decision.allowed:
            raise RateLimited(
                f"Rate limit exceeded for {action}. Try again later.",
                details={"action": action, "scope": config.scope},
                headers={"Retry-After": str(decision.retry_after_seconds)},
            )
        return decision

    async def release_action(self, action: str, scope_value: str) -> None:
        """Take back one `action` counted for its scope value.

        For an action that counts only by its outcome (a wrong password): counted as it
        begins, so that a burst of them cannot all begin before any has counted, and
        given back if it turns out not to count.
        """
        await self._limiter.release_window(_action_key(action, scope_value))

    # -- AI request quotas ------------------------------------------------------------

    def _request_limits(self, tier: TierConfig) -> dict[str, int | None]:
        return {
            "daily": tier.daily_requests,
            "weekly": tier.weekly_requests,
            "monthly": tier.monthly_requests,
        }

    async def consume_ai_request(
        self, subject: str, tier_name: str, conn: AsyncConnection | None = None
    ) -> dict[str, WindowUsage]:
        """Count one AI request in every window, all or none; raise if any is full.

        In the caller's transaction when given one (raising then rolls it all back).
        """
        if conn is None:
            async with self._engine.begin() as own:
                return await self.consume_ai_request(subject, tier_name, own)
        increments = self.ai_request_increments(tier_name)
        counted = await increment_counters(conn, subject, increments)
        return await self.judge_ai_request(conn, subject, increments, counted)

    def ai_request_increments(self, tier_name: str) -> tuple[Increment, ...]:
        """One AI request for each window, within the tier's limits (daily, weekly,
        monthly); for `increment_counters`, alone or beside other counters."""
        windows = self._request_windows(datetime.now(UTC))
        increments = self._increments.get(tier_name)
        if increments is None:
            limits = self._request_limits(self.tier(tier_name))
            increments = tuple(
                Increment(REQUESTS, period, 1, limits[window])
                for (window, _), (period, _) in zip(_REQUEST_WINDOWS, windows, strict=True)
            )
            self._increments[tier_name] = increments
        return increments

    def _request_windows(self, now: datetime) -> tuple[tuple[str, datetime | None], ...]:
        """Each request window's (period, reset) at `now` (UTC)."""
        day = now.toordinal()
        if day != self._windows_day:
            self._windows = tuple(period_window(per, now) for _, per in _REQUEST_WINDOWS)
            self._windows_day = day
            self._increments = {}
        return self._windows

    async def judge_ai_request(
        self,
        conn: AsyncConnection | None,
        subject: str,
        increments: Sequence[Increment],
        counted: list[tuple[int, int] | None],
        *,
        warn: bool = True,
    ) -> dict[str, WindowUsage]:
        """Raise if a window refused the request (the caller's transaction then rolls
        every window back: all or none); else each window's use, warnings queued
        (unless not `warn`: the user has no webhook). Without `conn`,
        `TransactionNeeded` instead of reading or queuing anything."""
        usage: dict[str, WindowUsage] = {}
        windows = self._request_windows(datetime.now(UTC))
        for (window, _), (_, reset_at), inc, after in zip(
            _REQUEST_WINDOWS, windows, increments, counted, strict=True
        ):
            if after is None:
                if conn is None:
                    raise TransactionNeeded  # to read what the window holds
                current = await read_counter(conn, subject, REQUESTS, inc.period)
                raise QuotaExhausted(
                    f"{window.capitalize()} request limit reached",
                    window=window,
                    usage=WindowUsage(current, inc.limit, reset_at),
                )
            used = after[0]
            usage[window] = WindowUsage(used, inc.limit, reset_at)
            if warn:
                await self._warnings.check(conn, subject, window, used - 1, used, inc.limit)
        return usage

    async def refund_ai_request(self, subject: str, at: datetime) -> None:
        """Give back a request that failed upstream (it is not billed)."""
        async with self._engine.begin() as conn:
            for _, per in _REQUEST_WINDOWS:
                period, _ = period_window(per, at)
                await decrement_counter(conn, subject, REQUESTS, period)

    async def ai_request_usage(self, subject: str, tier_name: str) -> dict[str, WindowUsage]:
        limits = self._request_limits(self.tier(tier_name))
        now = datetime.now(UTC)
        usage: dict[str, WindowUsage] = {}
        async with self._engine.connect() as conn:
            for window, per in _REQUEST_WINDOWS:
                period, reset_at = period_window(per, now)
                used = await read_counter(conn, subject, REQUESTS, period)
                usage[window] = WindowUsage(used, limits[window], reset_at)
        return usage

    # -- named counters ---------------------------------------------------------------

    def _counter(self, tier_name: str, name: str) -> tuple[int | None, str]:
        counter = self.tier(tier_name).counters.get(name)
        if counter is None:
            return None, "lifetime"
        return counter.limit, counter.per

    async def consume_counter(
        self, subject: str, tier_name: str, name: str, amount: int = 1
    ) -> WindowUsage:
        """Add `amount` to counter `name` unless it would pass the tier's limit."""
        limit, per = self._counter(tier_name, name)
        period, reset_at = period_window(per, datetime.now(UTC))
        async with self._engine.begin() as conn:
            used = await increment_within(conn, subject, f"counter:{name}", period, amount, limit)
            if used is None:
                current = await read_counter(conn, subject, f"counter:{name}", period)
                raise QuotaExhausted(
                    f"Limit of {limit} {name.replace('_', ' ')} reached",
                    window=per,
                    usage=WindowUsage(current, limit, reset_at),
                )
        return WindowUsage(used, limit, reset_at)

    async def refund_counter(
        self, subject: str, tier_name: str, name: str, counted_at: datetime
    ) -> None:
        """Give back one count, in the window it was taken from (the action failed)."""
        _, per = self._counter(tier_name, name)
        period, _ = period_window(per, counted_at)
        async with self._engine.begin() as conn:
            await decrement_counter(conn, subject, f"counter:{name}", period)

    async def counter_usage(self, subject: str, tier_name: str, name: str) -> WindowUsage:
        limit, per = self._counter(tier_name, name)
        period, reset_at = period_window(per, datetime.now(UTC))
        async with self._engine.connect() as conn:
            used = await read_counter(conn, subject, f"counter:{name}", period)
        return WindowUsage(used, limit, reset_at)


def _action_key(action: str, scope_value: str) -> str:
    return f"action:{action}:{scope_value.lower()}"
