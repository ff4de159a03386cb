"""Rate limiting with GCRA (the generic cell rate algorithm).

A `Rate` admits `burst` requests at once and refills one every `period / limit`.
GCRA keeps one number per key, the theoretical arrival time (TAT), and decides in
O(1): exact under concurrency because each decision is one atomic step (a Lua script
on the Redis server's clock, or a synchronous block on the event loop in-process).
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from app.core.batching import Batcher
from app.core.security import new_id

if TYPE_CHECKING:
    from redis.asyncio import Redis


@dataclass(frozen=True, slots=True)
class Rate:
    limit: int  # requests per period
    period: float  # seconds
    burst: int  # requests admitted at once from a full bucket

    @property
    def interval_ms(self) -> float:
        return self.period * 1000 / self.limit

    @property
    def window(self) -> float:
        return self.burst * self.interval_ms / 1000


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int  # the bucket's capacity (the burst): what `remaining` counts down from
    window: float  # seconds an empty bucket takes to fill again
    remaining: int
    retry_after: float  # seconds until a request would be admitted (0 if allowed)
    reset_after: float  # seconds until the bucket is full again

    @property
    def retry_after_seconds(self) -> int:
        return max(1, math.ceil(self.retry_after))


class RateLimiter(Protocol):
    async def hit(self, key: str, rate: Rate) -> Decision:
        """One request against a GCRA bucket."""

    async def hit_window(self, key: str, limit: int, window: float) -> Decision:
        """One event against "at most `limit` in any `window` seconds" (a sliding log)."""

    async def release_window(self, key: str) -> None:
        """Take back the latest event recorded under `key` (one whose outcome, known
        only once admitted, turned out not to count)."""


def _decide(now_ms: float, tat_ms: float | None, rate: Rate) -> tuple[Decision, float | None]:
    """The GCRA step; returns the decision and the new TAT to store (None: unchanged)."""
    interval = rate.interval_ms
    tolerance = interval * rate.burst
    tat = max(tat_ms if tat_ms is not None else now_ms, now_ms)
    new_tat = tat + interval
    allow_at = new_tat - tolerance
    if allow_at > now_ms:
        remaining = max(0, math.floor((now_ms - (tat - tolerance)) / interval))
        return (
            Decision(
                False,
                rate.burst,
                rate.window,
                remaining,
                (allow_at - now_ms) / 1000,
                (tat - now_ms) / 1000,
            ),
            None,
        )
    remaining = max(0, math.floor((now_ms - (new_tat - tolerance)) / interval))
    return (
        Decision(True, rate.burst, rate.window, remaining, 0.0, (new_tat - now_ms) / 1000),
        new_tat,
    )


def _window_decision(
    now_ms: float, times: list[float], limit: int, window: float
) -> tuple[Decision, bool]:
    """Decide on a log of event times already cut to the window; (decision, record?)."""
    if len(times) >= limit:
        retry = (times[0] + window * 1000 - now_ms) / 1000
        return Decision(False, limit, window, 0, retry, retry), False
    reset = (times[0] + window * 1000 - now_ms) / 1000 if times else window
    return Decision(True, limit, window, limit - len(times) - 1, 0.0, reset), True


class LocalRateLimiter:
    """One process. Each decision runs without an await, so it is atomic on the loop."""

    def __init__(self, max_keys: int = 100_000) -> None:
        # Past `max_keys` full buckets are forgotten (a full bucket is the same as none),
        # at most once per doubling so the scan stays amortized O(1). Past ten times
        # that, the least recently hit are dropped too: that can only ever admit a
        # request, never refuse one wrongly, and it keeps memory bounded.
        self._tats: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._purge_at = max_keys
        self._logs: collections.OrderedDict[str, collections.deque[float]] = (
            collections.OrderedDict()
        )
        self._max_keys = max_keys

    async def hit_window(self, key: str, limit: int, window: float) -> Decision:
        now = time.time() * 1000
        log = self._logs.setdefault(key, collections.deque())
        self._logs.move_to_end(key)
        while log and log[0] <= now - window * 1000:
            log.popleft()
        decision, record = _window_decision(now, list(log), limit, window)
        if record:
            log.append(now)
        while len(self._logs) > 10 * self._max_keys:
            self._logs.popitem(last=False)
        return decision

    async def release_window(self, key: str) -> None:
        log = self._logs.get(key)
        if log:
            log.pop()

    async def hit(self, key: str, rate: Rate) -> Decision:
        now = time.time() * 1000
        decision, new_tat = _decide(now, self._tats.get(key), rate)
        if new_tat is not None:
            self._tats[key] = new_tat
            self._tats.move_to_end(key)
            if len(self._tats) > self._purge_at:
                for full in [k for k, tat in self._tats.items() if tat <= now]:
                    del self._tats[full]
                self._purge_at = max(self._max_keys, 2 * len(self._tats))
            while len(self._tats) > 10 * self._max_keys:
                self._tats.popitem(last=False)
        return decision


# Same arithmetic as `_decide`, on the Redis server's clock so instances agree, for
# each key in turn: KEYS[i] with ARGV[2i-1] (the interval, ms) and ARGV[2i] (the
# burst); four values per key. A key twice in one call is decided twice, in order.
_GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local out = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i - 1])
  local tolerance = interval * tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - tolerance
  local n = #out
  if allow_at > now then
    local remaining = math.floor((now - (tat - tolerance)) / interval)
    if remaining < 0 then remaining = 0 end
    out[n + 1], out[n + 2] = 0, remaining
    out[n + 3], out[n + 4] = tostring(allow_at - now), tostring(tat - now)
  else
    -- All 17 digits: `tostring` keeps 14, and a TAT rounded up by a fraction of a ms
    -- costs the next hit in the same call (same clock) a token.
    redis.call('SET', key, string.format('%.17g', new_tat), 'PX', math.ceil(new_tat - now) + 1)
    local remaining = math.floor((now - (new_tat - tolerance)) / interval)
    if remaining < 0 then remaining = 0 end
    out[n + 1], out[n + 2], out[n + 3], out[n + 4] = 1, remaining, '0', tostring(new_tat - now)
  end
end
return out
"""


# A sorted set of event times per key, cut to the window, on the server's clock.
_WINDOW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local window = tonumber(ARGV[1]) * 1000
local limit = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]
if count >= limit then
  return {0, 0, tostring(tonumber(oldest) + window - now)}
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(window) + 1)
local reset = window
if oldest then reset = tonumber(oldest) + window - now end
return {1, limit - count - 1, tostring(reset)}
"""


class RedisRateLimiter:
    """Shared by every instance: a Lua script decides, atomically on the server.

    The buckets hit while a call is out are decided together by the next one: the
    client's own work is about 0.25 ms of CPU per call, more than the decision, and
    a busy server would otherwise pay it for every request. One call's keys must be
    on one server: a Redis Cluster would refuse them unless they shared a hash slot.
    """

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = f"{prefix}:rl:"
        self._script = redis.register_script(_GCRA_LUA)
        self._window_script = redis.register_script(_WINDOW_LUA)
        self._hits: Batcher[tuple[str, Rate], Decision] = Batcher("rate-limit", self._decide)

    async def hit_window(self, key: str, limit: int, window: float) -> Decision:
        allowed, remaining, seconds_ms = await self._window_script(
            keys=[f"{self._prefix}w:{key}"], args=[window, limit, new_id()]
        )
        wait = float(seconds_ms) / 1000
        return Decision(
            allowed=bool(allowed),
            limit=limit,
            window=window,
            remaining=int(remaining),
            retry_after=0.0 if allowed else wait,
            reset_after=wait,
        )

    async def release_window(self, key: str) -> None:
        await self._redis.zpopmax(f"{self._prefix}w:{key}")

    async def hit(self, key: str, rate: Rate) -> Decision:
        return await self._hits.submit((self._prefix + key, rate))

    async def _decide(self, hits: list[tuple[str, Rate]]) -> list[Decision | Exception]:
        """One script call for every hit of the batch, in order."""
        args: list[float] = []
        for _, rate in hits:
            args += (rate.interval_ms, rate.burst)
        values = await self._script(keys=[key for key, _ in hits], args=args)
        return [
            Decision(
                allowed=bool(values[i]),
                limit=rate.burst,
                window=rate.window,
                remaining=int(values[i + 1]),
                retry_after=float(values[i + 2]) / 1000,
                reset_after=float(values[i + 3]) / 1000,
            )
            for i, (_, rate) in zip(range(0, 4 * len(hits), 4), hits, strict=True)
        ]
