"""Metering relayed requests into `usage_logs` and the quota counter.

A request's row is written when it starts, checkpointed while tokens flow (every
`checkpoint_tokens` tokens or `checkpoint_ms`, whichever comes first) and finalized
once with a status. Each write updates the row and the user's counter in one
transaction (shared with other requests' writes, see `usage_writer`), so the counter
always equals the sum of the rows, and pushes the new quota. Checkpoints run beside
the stream, never in front of the next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.core.config import MeteringConfig
from app.core.db import dialect_insert
from app.core.errors import ApiError, well_formed
from app.core.live import LimitChange, QuotaPublisher
from app.core.quota import (
    TOKENS,
    Increment,
    QuotaSnapshot,
    add_tokens,
    decrement_counter,
    month_period,
)
from app.core.security import new_id
from app.core.tables import UsageStatus, instances, quota_counters, usage_logs, users
from app.core.usage_writer import Counted, RequestStart, UsageWrite, UsageWriter
from app.core.webhooks import Event, QuotaWarnings, enqueue

if TYPE_CHECKING:
    from app.core.routing import Target

logger = logging.getLogger("livegate.metering")

_FINISH_REASON_LENGTH: int = usage_logs.c.finish_reason.type.length  # type: ignore[attr-defined]


def _storable(text: str | None, length: int | None = None) -> str | None:
    """Text an upstream chose (a finish reason, an error message) as its column holds it.

    PostgreSQL refuses a NUL in text and a string longer than its column, and a write
    it refuses would leave the row unfinished; SQLite takes both, so both databases
    get the same row. Neither driver can encode a lone surrogate.
    """
    if text is None:
        return None
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    text = well_formed(text)
    return text if length is None else text[:length]


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What a usage row records about the request besides its tokens."""

    request_id: str
    user_id: str
    api_key_id: str | None
    model: str
    provider: str
    stream: bool
    token_limit: int | None
    device_id: str | None = None
    platform: str | None = None
    # False: the user had no active webhook when the request started, so neither its
    # start nor its end queues an event or looks for subscribers.
    has_webhooks: bool = True


# Decides, inside the starting transaction, whether a request may go ahead.
# It gets the quota with the prompt counted, and what became of `also` (see `begin`).
# Without a connection it judges from those alone, raising `TransactionNeeded` where
# it would read or write.
Admission = Callable[
    [AsyncConnection | None, QuotaSnapshot, list[tuple[int, int] | None]], Awaitable[None]
]
FINISH_ATTEMPTS = 4  # a database blip must not leave a row `streaming` unbilled
# Seconds a limit change overrides the limit a start carries: longer than a request
# takes from reading its principal (cached until the change's invalidation reaches
# this instance) to committing its start.
RECENT_CHANGE = 60.0
# Seconds the last quota a user's requests here pushed is kept once none is in flight:
# longer than a limit change's announcement takes to arrive (see `_limit_changed`).
ENDED_RECENTLY = 5.0


def task_event_id(row_id: str, event: Event) -> str:
    """The id of a request's `ai.task.*` event: the same however often the transaction
    that queues it runs (a sweep and a late end of the same row still make two)."""
    return f"evt_{row_id}_{event.value.rsplit('.', 1)[-1]}"


async def run_to_completion(step: Callable[[], Awaitable[None]]) -> None:
    """Run a clean-up step to its end even if the surrounding task is being cancelled.

    Both kinds of cancellation: asyncio's (once; `shield` absorbs it) and anyio's
    (sse-starlette's task groups cancel again at every await; a shielded scope holds
    that off until the step is done). The scope is entered only once cancelled: it
    costs more than the rest of this together, and most steps are never cancelled.
    """
    task = asyncio.ensure_future(step())
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        with anyio.CancelScope(shield=True):
            while not task.done():
                # A cancellation still on its way (anyio's, sent before the scope
                # was entered) must not end the wait, nor reach the step.
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(task)
        raise


class InFlight:
    """The metered requests of one user and period in flight on this instance, and the
    newest reading of their quota any of them had.

    A request alone would hold the tokens it has not yet written against the quota as
    it last read it, so ten streams of one user would each spend all that was left.
    Together they count every one's unwritten tokens against the newest reading.
    (Another instance's unwritten tokens still show only once written: at most one
    checkpoint's worth per request.)

    The limit is kept apart from the counter's readings: a request reads it once, as
    it starts, so the newest reading of the counter may come with an older limit. The
    limit kept is the newest `LimitChange`'s, else the one of the start of the highest
    `seq`.
    """

    __slots__ = ("change_seq", "limit", "limit_seq", "requests", "snapshot", "unwritten")

    def __init__(self, snapshot: QuotaSnapshot) -> None:
        self.requests = 0
        self.snapshot = snapshot
        self.limit = snapshot.limit
        self.limit_seq = snapshot.seq
        self.change_seq = -1  # of the newest `LimitChange` taken
        # The meters' tokens not yet in the counter, kept as they change: summed on
        # each read, a user's k streams would cost O(k) at every upstream read.
        self.unwritten = 0

    def read(self, snapshot: QuotaSnapshot) -> None:
        """Take a reading of the counter, if newer than the one held."""
        if snapshot.seq > self.snapshot.seq:
            self.snapshot = snapshot

    def read_limit(self, limit: int | None, seq: int) -> None:
        """Take a start's limit, the start's counter at `seq`, if later than the one held."""
        if seq > self.limit_seq:
            self.limit, self.limit_seq = limit, seq

    def take_change(self, change: LimitChange) -> None:
        """Take an announced limit, over any start's: a start may commit after the
        change with the limit of a principal read before it."""
        if change.seq >= self.change_seq:  # again: a start may have read the old one
            self.limit, self.change_seq = change.limit, change.seq
            self.limit_seq = max(self.limit_seq, change.seq)

    @property
    def remaining(self) -> int | None:
        if self.limit is None:
            return None
        return self.limit - self.snapshot.used - self.unwritten


class UsageMeter:
    """The meter of one relayed request. Not shared between tasks except its flusher."""

    def __init__(
        self,
        metering: Metering,
        info: RequestInfo,
        row_id: str,
        period: str,
        prompt_tokens: int,
        snapshot: QuotaSnapshot,
        started_at: datetime,
        *,
        unsure: bool = False,
    ) -> None:
        """`unsure`: the row's start failed, and may have been committed all the same."""
        self.info = info
        self.started_at = started_at
        self.row_id = row_id
        self.period = period
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self._metering = metering
        self._config = metering.config
        self._flushed_total = prompt_tokens
        self._unsure = unsure  # whether the row's last write failed (`UsageWrite.rebase`)
        self._snapshot = snapshot
        self._since_flush = 0
        self._last_flush = asyncio.get_running_loop().time()
        self._flusher: asyncio.Task[None] | None = None
        self._dirty = False
        self.finished = False
        self.provider = info.provider
        self.upstream_model: str | None = None
        self._target: Target | None = None
        # A non-streamed request's whole answer, for the `ai.task.completed` webhook.
        self.answer: bytes | None = None
        # The user's requests in flight with it, once it is one of them.
        self.in_flight: InFlight | None = None

    def answered_by(self, target: Target) -> None:
        """Record the provider that answered (the fallback chain may have moved on)."""
        self._target = target
        self.provider = target.provider.name
        self.upstream_model = target.model

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def counted(self) -> Usage:
        """What has been billed so far: the prompt estimate and the delivered tokens."""
        return Usage(self.prompt_tokens, self.completion_tokens)

    @property
    def unwritten(self) -> int:
        """Tokens counted here and not yet in the quota counter."""
        return self.total_tokens - self._flushed_total

    @property
    def limit(self) -> int | None:
        """The user's token limit: as the request started, unless a later one is known."""
        return self.info.token_limit if self.in_flight is None else self.in_flight.limit

    @property
    def remaining(self) -> int | None:
        """Tokens left in the quota, counting what the user's requests in flight on this
        instance have not yet written."""
        if self.in_flight is not None:
            return self.in_flight.remaining
        if self._snapshot.limit is None:
            return None
        return self._snapshot.limit - self._snapshot.used - self.unwritten

    def exhausted_after(self, pending: int) -> bool:
        """Whether the quota is used up once `pending` more tokens are delivered."""
        remaining = self.remaining
        return remaining is not None and remaining - pending <= 0

    def deliver(self, tokens: int = 1) -> None:
        """Count tokens that reached the client; schedule a checkpoint when one is due."""
        if self.finished:
            return
        self.completion_tokens += tokens
        if self.in_flight is not None:
            self.in_flight.unwritten += tokens
        self._since_flush += tokens
        now = asyncio.get_running_loop().time()
        due = (
            self._since_flush >= self._config.checkpoint_tokens
            or (now - self._last_flush) * 1000 >= self._config.checkpoint_ms
        )
        if due:
            self._since_flush = 0
            self._last_flush = now
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.create_task(self._flush_loop())
            else:
                self._dirty = True

    async def _flush_loop(self) -> None:
        # A stream that ended before its checkpoint ran (an unpaced upstream sends the
        # whole answer in one read) needs none: its final write counts everything.
        while not self.finished:
            self._dirty = False
            try:
                await self._write(status=UsageStatus.STREAMING)
            except Exception:
                logger.exception("checkpoint of usage row %s failed", self.row_id)
            if not self._dirty:
                return

    async def _write(
        self,
        status: UsageStatus,
        finish_reason: str | None = None,
        error: str | None = None,
    ) -> None:
        prompt, completion = self.prompt_tokens, self.completion_tokens
        total = prompt + completion
        delta = total - self._flushed_total
        now = datetime.now(UTC)
        values: dict[str, object] = {
            "row_id": self.row_id,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": total,
            "provider": self.provider,
            "upstream_model": self.upstream_model,
            "cost": self._target.cost(prompt, completion) if self._target else 0.0,
            "updated_at": now,
        }
        if status is not UsageStatus.STREAMING:
            values.update(
                status=status,
                finish_reason=_storable(finish_reason, _FINISH_REASON_LENGTH),
                error=_storable(error),
                finished_at=now,
            )
        then: Callable[[AsyncConnection], Awaitable[object]] | None = None
        if status is not UsageStatus.STREAMING and self.info.has_webhooks:
            # In the finalizing transaction: the event exists exactly if the row does.
            event = Event.TASK_COMPLETED if status is UsageStatus.COMPLETED else Event.TASK_FAILED
            then = functools.partial(
                enqueue,
                user_id=self.info.user_id,
                event=event,
                data=lambda: self._task_event(status, finish_reason, error),
                event_id=task_event_id(self.row_id, event),
            )
        write = UsageWrite(
            values,
            self.info.user_id,
            self.period,
            delta,
            self.limit,
            then,
            rebase=self._unsure,
            warnings=self.info.has_webhooks,
        )
        try:
            counter = await self._metering.writer.write(write)
        except Exception:
            # It may have been committed all the same (only the COMMIT's answer lost):
            # the next write must not count its tokens again blindly.
            self._unsure = True
            raise
        self._unsure = False
        if counter is not None:
            used, seq = counter
            if self.in_flight is not None:
                self.in_flight.unwritten -= total - self._flushed_total
            self._flushed_total = total
            self._snapshot = QuotaSnapshot(self.limit, used, self.period, seq)
            if self.in_flight is not None:
                self.in_flight.read(self._snapshot)
            self._metering.publisher.push(self.info.user_id, self._snapshot)
        if status is not UsageStatus.STREAMING:
            self._metering.leave(self)  # all it billed is in the counter now

    def _task_event(
        self, status: UsageStatus, finish_reason: str | None, error: str | None
    ) -> dict[str, Any]:
        data: dict[str, Any] = {"task_id": self.row_id, "model": self.info.model}
        if status is not UsageStatus.COMPLETED:
            return {**data, "status": "failed", "error": error or status.value}
        usage = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }
        # A stream's text already reached the client; its event carries the outcome.
        result = (
            json.loads(self.answer)
            if self.answer is not None
            else {"choices": [{"index": 0, "finish_reason": finish_reason}], "usage": usage}
        )
        return {**data, "status": "completed", "result": result}

    async def finish(
        self,
        status: UsageStatus,
        *,
        usage: Usage | None = None,
        finish_reason: str | None = None,
        error: str | None = None,
    ) -> None:
        """Finalize the row once. `usage` is the upstream's, trusted on completion only.

        A request that ended another way bills what was delivered: the counted
        completion tokens, and the upstream's prompt tokens if it sent them.
        """
        if self.finished:
            return
        self.finished = True
        self._metering.active.discard(self)
        if status is UsageStatus.CANCELLED and self._metering.draining:
            status = UsageStatus.INTERRUPTED  # cut by our shutdown, not by the client
        # In a task of its own: a caller cancelled meanwhile (a client leaving) must
        # not leave the row half-finalized.
        await run_to_completion(lambda: self._finalize(status, usage, finish_reason, error))

    async def _finalize(
        self,
        status: UsageStatus,
        usage: Usage | None,
        finish_reason: str | None,
        error: str | None,
    ) -> None:
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher
        if usage is not None:
            completion = self.completion_tokens
            if status is UsageStatus.COMPLETED:
                completion = usage.completion_tokens
            self._recount(usage.prompt_tokens, completion)
        for attempt in range(FINISH_ATTEMPTS):
            try:
                await self._write(status, finish_reason, error)
                return
            except Exception:
                logger.exception(
                    "finalizing usage row %s failed (attempt %d)", self.row_id, attempt + 1
                )
                await asyncio.sleep(0.2 * 2**attempt)
        # This instance lives on, so no sweep will end the row: the metering service
        # retries the write until the database takes it.
        logger.error("usage row %s left unfinished; its end is retried", self.row_id)
        self._metering.unwritten_ends[self] = functools.partial(
            self._write, status, finish_reason, error
        )

    async def discard(self, status: UsageStatus, error: str) -> None:
        """Finalize a request that delivered nothing: nothing is billed."""
        self._recount(0, 0)
        await self.finish(status, error=error)

    def _recount(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Bill these counts instead of those so far (not yet written)."""
        if self.in_flight is not None:
            self.in_flight.unwritten += prompt_tokens + completion_tokens - self.total_tokens
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens


@dataclass(frozen=True, slots=True)
class _Start:
    """A start queued with the usage writer: what its meter is made of once committed."""

    info: RequestInfo
    row_id: str
    period: str
    prompt_tokens: int
    at: datetime
    also: Sequence[Increment]  # its other counters (see `Metering.begin`)
    counted: asyncio.Future[Counted]  # the writer's outcome (see `UsageWriter.start`)

    def snapshot(self, tokens: tuple[int, int]) -> QuotaSnapshot:
        """The quota as the start left it: its token counter's (used, seq)."""
        return QuotaSnapshot(self.info.token_limit, tokens[0], self.period, tokens[1])


class Metering:
    """The per-process metering service, created in the lifespan."""

    def __init__(
        self,
        engine: AsyncEngine,
        publisher: QuotaPublisher,
        config: MeteringConfig,
        instance_id: str | None = None,
        warnings: QuotaWarnings | None = None,
        tier_limit: Callable[[str], int | None] | None = None,
    ) -> None:
        """`tier_limit`: a tier's token limit, to read the limits of the users with
        requests in flight afresh when the bus may have lost a limit change."""
        self.engine = engine
        self.publisher = publisher
        self.config = config
        self.warnings = warnings or QuotaWarnings(())
        self.writer = UsageWriter(engine, self.warnings)
        self.instance_id = instance_id or new_id()
        self.active: set[UsageMeter] = set()
        self._in_flight: dict[tuple[str, str], InFlight] = {}  # by user and period
        # Set once the server starts cancelling requests to shut down.
        self.draining = False
        self._heartbeat: asyncio.Task[None] | None = None
        self._stop_watching: Callable[[], Awaitable[None]] | None = None
        # The limit changes announced lately, by user and period, with when they came:
        # they override the limits of starts that committed after them (see `_started`).
        self._recent_changes: dict[tuple[str, str], tuple[float, LimitChange]] = {}
        self._tier_limit = tier_limit
        self._rereading: asyncio.Task[None] | None = None
        # The newest quota pushed for users whose last request here ended lately
        # (oldest first, with when).
        self._ended: OrderedDict[tuple[str, str], tuple[float, QuotaSnapshot]] = OrderedDict()
        self._cleanups: set[asyncio.Task[None]] = set()
        # The final writes of meters that failed all their attempts, retried at every
        # heartbeat and at shutdown until they are written.
        self.unwritten_ends: dict[UsageMeter, Callable[[], Awaitable[None]]] = {}

    def drain(self) -> None:
        """Mark requests cancelled from now on as interrupted by shutdown."""
        self.draining = True

    async def begin(
        self,
        info: RequestInfo,
        prompt_tokens: int,
        admit: Admission | None = None,
        also: Sequence[Increment] = (),
    ) -> UsageMeter:
        """Write the row of a starting request and bill its (estimated) prompt tokens.

        `also` are the request's other counters (its request quotas), added in the same
        statement as the tokens, each within its limit. `admit` runs inside the same
        transaction with the quota as it now stands and what became of `also` (None
        where a limit refused); if it raises, nothing of the request is written. The
        transaction is shared with other requests starting at the same moment. Leave
        `admit` out when there is nothing to check: starts without it and without any
        limit (token or `also`) commit together as one statement on PostgreSQL.
        """
        start = self._start(info, prompt_tokens, admit, also)
        try:
            tokens, *_ = await asyncio.shield(start.counted)
        except asyncio.CancelledError:
            # The caller left (a client disconnecting) while its start was queued: the
            # start may still commit, and its row must then end, billing nothing.
            await run_to_completion(lambda: self._end_abandoned(start))
            raise
        except ApiError:
            raise  # refused: rolled back, nothing written
        except Exception:
            self._end_failed_start_later(start)
            raise
        assert tokens is not None
        return self._started(start, tokens)

    def begin_beside(
        self, info: RequestInfo, prompt_tokens: int, also: Sequence[Increment] = ()
    ) -> asyncio.Future[UsageMeter]:
        """`begin` for a start nothing can refuse (no limit, nothing to admit), written
        beside the upstream call: the meter once the row is committed.

        The row is queued at once and the meter made as it commits, with no task in
        between. Await the future shielded; a caller that gives up on the request
        discards the meter it resolves to.
        """
        start = self._start(info, prompt_tokens, None, also)
        meter: asyncio.Future[UsageMeter] = asyncio.get_running_loop().create_future()

        def committed(counted: asyncio.Future[Counted]) -> None:
            if meter.cancelled():  # no one will take the meter: end the row now
                self._in_background(self._end_abandoned(start))
                return
            if counted.cancelled():
                meter.cancel()
                return
            # Whatever happens here must settle `meter`: nothing else would.
            try:
                tokens, *_ = counted.result()
                assert tokens is not None
                meter.set_result(self._started(start, tokens))
            except Exception as exc:
                if not isinstance(exc, ApiError):
                    self._end_failed_start_later(start)
                meter.set_exception(exc)

        start.counted.add_done_callback(committed)
        return meter

    def _start(
        self,
        info: RequestInfo,
        prompt_tokens: int,
        admit: Admission | None,
        also: Sequence[Increment],
    ) -> _Start:
        """Queue the row of a starting request and its counters (see `begin`)."""
        now = datetime.now(UTC)
        period = month_period(now)
        row_id = new_id()
        row: dict[str, object] = {
            "id": row_id,
            "request_id": info.request_id,
            "user_id": info.user_id,
            "api_key_id": info.api_key_id,
            "instance_id": self.instance_id,
            "model": info.model,
            "provider": info.provider,
            "device_id": info.device_id,
            "platform": info.platform,
            "stream": int(info.stream),
            "status": UsageStatus.STREAMING,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": 0,
            "total_tokens": prompt_tokens,
            "period": period,
            "started_at": now,
            "updated_at": now,
        }

        async def check(
            conn: AsyncConnection | None, counted: list[tuple[int, int] | None]
        ) -> None:
            used, seq = counted[0] or (0, 0)  # no limit on tokens: always applied
            if info.has_webhooks:
                await self.warnings.check(
                    conn,
                    info.user_id,
                    "monthly_tokens",
                    used - prompt_tokens,
                    used,
                    info.token_limit,
                )
            if admit is not None:
                # What requests in flight here delivered and have yet to write is used too.
                used += self.unwritten_tokens(info.user_id, period)
                await admit(conn, QuotaSnapshot(info.token_limit, used, period, seq), counted[1:])

        increments = [Increment(TOKENS, period, prompt_tokens), *also]
        # With no token limit and nothing to admit, `check` has nothing to do, and no
        # transaction need wait for it (see `RequestStart.unlimited`).
        unchecked = info.token_limit is None and admit is None
        start = RequestStart(row, info.user_id, increments, None if unchecked else check)
        return _Start(info, row_id, period, prompt_tokens, now, also, self.writer.start(start))

    def _started(self, start: _Start, tokens: tuple[int, int]) -> UsageMeter:
        """The meter of a start now committed, with the quota it left pushed."""
        snapshot = start.snapshot(tokens)
        key = (start.info.user_id, start.period)
        in_flight = self._in_flight.get(key)
        if in_flight is None:
            in_flight = self._in_flight[key] = InFlight(snapshot)
        else:
            in_flight.read(snapshot)
            in_flight.read_limit(snapshot.limit, snapshot.seq)
        if self._recent_changes and (change := self._recent_change(key)) is not None:
            in_flight.take_change(change)
        if in_flight.limit != snapshot.limit:  # the start read its limit before a change
            snapshot = dataclasses.replace(snapshot, limit=in_flight.limit)
            if in_flight.snapshot.seq == snapshot.seq:
                in_flight.snapshot = snapshot  # as pushed (see `_limit_changed`)
        self.publisher.push(start.info.user_id, snapshot)
        meter = self._meter(start, start.info, snapshot)
        self.active.add(meter)
        in_flight.requests += 1
        in_flight.unwritten += meter.unwritten
        meter.in_flight = in_flight
        return meter

    def leave(self, meter: UsageMeter) -> None:
        """Take `meter` out of its user's requests in flight: all it billed is written."""
        in_flight = meter.in_flight
        if in_flight is None:
            return
        meter.in_flight = None
        in_flight.requests -= 1
        in_flight.unwritten -= meter.unwritten
        if not in_flight.requests:
            key = (meter.info.user_id, meter.period)
            del self._in_flight[key]
            self._ended_with(key, in_flight.snapshot)

    def _ended_with(self, key: tuple[str, str], snapshot: QuotaSnapshot) -> None:
        now = asyncio.get_running_loop().time()
        ended = self._ended
        ended[key] = (now, snapshot)
        ended.move_to_end(key)
        while now - next(iter(ended.values()))[0] > ENDED_RECENTLY:
            ended.popitem(last=False)

    def _limit_changed(self, *changes: LimitChange) -> None:
        """Users' limits changed (on any instance): their requests in flight here count
        against them from now on, and push them with their checkpoints; so do those
        that start soon after with an old limit (a principal read before the change).

        A checkpoint here may have committed after the change and before its
        announcement came, and pushed the old limit with a newer `seq` than the
        change's: devices keep the newer. Its user's counter is then moved on once
        more and their limit pushed again, as their tier now says.
        """
        now = asyncio.get_running_loop().time()
        for old in [k for k, (at, _) in self._recent_changes.items() if now - at > RECENT_CHANGE]:
            del self._recent_changes[old]
        overtaken: list[tuple[str, str]] = []
        for change in changes:
            key = (change.user_id, change.period)
            held = self._recent_changes.get(key)
            if held is None or change.seq > held[1].seq:
                self._recent_changes[key] = (now, change)
            in_flight = self._in_flight.get(key)
            pushed: QuotaSnapshot | None = None
            # An older change than one already taken was overtaken by it: not looked at.
            if in_flight is not None:
                if change.seq >= in_flight.change_seq:
                    pushed = in_flight.snapshot
                in_flight.take_change(change)
            elif (
                (held is None or change.seq >= held[1].seq)
                and (ended := self._ended.get(key)) is not None
                and now - ended[0] <= ENDED_RECENTLY
            ):
                pushed = ended[1]
            # An equal `seq`: a re-read change (`_reread_limits`) takes the counter's
            # newest, which a write may have pushed with the old limit.
            if pushed is not None and pushed.seq >= change.seq and pushed.limit != change.limit:
                overtaken.append(key)
        if overtaken and self._tier_limit is not None:
            self._in_background(self._push_limits_again(overtaken, self._tier_limit))

    async def _push_limits_again(
        self, keys: list[tuple[str, str]], tier_limit: Callable[[str], int | None]
    ) -> None:
        """Push each user's limit as their tier says, under a `seq` newer than any
        pushed so far (see `_limit_changed`). Two such pushes of one user at once
        are harmless: the later `seq` reads the later tier."""
        for key in keys:
            user_id, period = key
            try:
                async with self.engine.begin() as conn:
                    # The counter first: a move holds it until it commits, and the tier
                    # read next then sees the move; a later move gets a newer `seq`.
                    used, seq = await add_tokens(conn, user_id, period, 0)
                    tier = await conn.scalar(sa.select(users.c.tier).where(users.c.id == user_id))
                if tier is None:
                    continue
                snapshot = QuotaSnapshot(tier_limit(tier), used, period, seq)
            except Exception:
                logger.warning(
                    "pushing a limit overtaken by a write again failed; the user's devices "
                    "show the old limit until their next request",
                    exc_info=True,
                )
                continue
            if (in_flight := self._in_flight.get(key)) is not None:
                in_flight.read(snapshot)
            elif key in self._ended:
                self._ended_with(key, snapshot)
            # Taken as an announced change: the tier read may be newer than any change
            # announced yet, and the checkpoints and starts here must carry it too.
            self._limit_changed(LimitChange(user_id, period, seq, snapshot.limit))
            self.publisher.push(user_id, snapshot)

    def _limits_lost(self) -> None:
        if self._tier_limit is None or not self._in_flight:
            return
        if self._rereading is not None:
            self._rereading.cancel()  # the read about to start is as new as it gets
        self._rereading = asyncio.create_task(
            self._reread_limits(self._tier_limit), name="metering-limits"
        )

    async def _reread_limits(self, tier_limit: Callable[[str], int | None]) -> None:
        """The limits of the users with requests in flight here, as their tiers now
        say, taken as announced changes: one announced while the bus was away was lost.

        Each tier is read with its user's counter `seq` in one statement: a move writes
        both in one transaction, so a move the read missed has a higher `seq` (its
        announcement wins) and one it saw a lower or equal one.
        """
        by_period: dict[str, list[str]] = {}
        for user_id, period in self._in_flight:
            by_period.setdefault(period, []).append(user_id)
        try:
            changes = [
                LimitChange(row.id, period, row.seq or 0, tier_limit(row.tier))
                for period, user_ids in by_period.items()
                for row in await self._tiers_and_seqs(period, user_ids)
            ]
        except Exception:
            logger.warning(
                "reading users' limits after the bus reconnected failed; their requests "
                "in flight keep the limits they have",
                exc_info=True,
            )
            return
        finally:
            if self._rereading is asyncio.current_task():
                self._rereading = None
        self._limit_changed(*changes)

    async def _tiers_and_seqs(self, period: str, user_ids: list[str]) -> list[sa.Row[Any]]:
        counter = sa.and_(
            quota_counters.c.user_id == users.c.id,
            quota_counters.c.metric == TOKENS,
            quota_counters.c.period == period,
        )
        query = sa.select(users.c.id, users.c.tier, quota_counters.c.seq).select_from(
            users.outerjoin(quota_counters, counter)
        )
        rows: list[sa.Row[Any]] = []
        async with self.engine.connect() as conn:
            for at in range(0, len(user_ids), 1000):  # within any driver's parameter limit
                batch = user_ids[at : at + 1000]
                rows.extend(await conn.execute(query.where(users.c.id.in_(batch))))
        return rows

    def _recent_change(self, key: tuple[str, str]) -> LimitChange | None:
        recent = self._recent_changes.get(key)
        if recent is None:
            return None
        if asyncio.get_running_loop().time() - recent[0] > RECENT_CHANGE:
            del self._recent_changes[key]
            return None
        return recent[1]

    def unwritten_tokens(self, user_id: str, period: str) -> int:
        """Tokens the user's requests in flight here have counted but not yet written."""
        in_flight = self._in_flight.get((user_id, period))
        return 0 if in_flight is None else in_flight.unwritten

    def _meter(
        self, start: _Start, info: RequestInfo, snapshot: QuotaSnapshot, *, unsure: bool = False
    ) -> UsageMeter:
        return UsageMeter(
            self,
            info,
            start.row_id,
            start.period,
            start.prompt_tokens,
            snapshot,
            start.at,
            unsure=unsure,
        )

    def _end_failed_start_later(self, start: _Start) -> None:
        # In the background: with the database away, its retries take seconds, and
        # the request's error need not wait for them.
        self._in_background(self._end_failed_start(start))

    def _in_background(self, cleanup: Coroutine[Any, Any, None]) -> None:
        """Run `cleanup` in a task of its own, which `close` waits for."""
        task = asyncio.create_task(cleanup)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _end_abandoned(self, start: _Start) -> None:
        """End the row of a start its caller gave up on while it was queued (a client
        that left), once committed: it bills nothing, and what it took from its other
        counters (the user's request quotas) is given back."""
        try:
            tokens, *also = await start.counted
        except ApiError:
            return  # refused: nothing was written
        except Exception:
            await self._end_failed_start(start)
            return
        assert tokens is not None
        meter = self._meter(start, start.info, start.snapshot(tokens))
        await meter.discard(UsageStatus.CANCELLED, "client disconnected")
        taken = [inc for inc, counted in zip(start.also, also, strict=True) if counted is not None]
        if not taken:
            return
        try:
            async with self.engine.begin() as conn:
                for inc in taken:
                    await decrement_counter(
                        conn, start.info.user_id, inc.metric, inc.period, inc.amount
                    )
        except Exception:
            logger.exception("giving back the counters of usage row %s failed", start.row_id)

    async def _end_failed_start(self, start: _Start) -> None:
        """End the row of a start that failed other than by a refusal, billing nothing.

        It may have been committed all the same, if only its COMMIT's answer was lost;
        if it was not, there is nothing to end. Either way no webhook event: the
        request failed before it began.
        """
        quiet = dataclasses.replace(start.info, has_webhooks=False)
        unknown = QuotaSnapshot(start.info.token_limit, 0, start.period, 0)
        meter = self._meter(start, quiet, unknown, unsure=True)
        await meter.discard(UsageStatus.ERROR, "the request could not start")

    async def start(self) -> None:
        """Register this instance, sweep what dead instances left, listen for limit
        changes, start the heartbeat."""
        await self._register()
        await self.sweep_interrupted()
        self._stop_watching = await self.publisher.watch_limits(
            self._limit_changed, self._limits_lost
        )
        self._heartbeat = asyncio.create_task(self._beat(), name="metering-heartbeat")

    async def close(self) -> None:
        """Finalize streams still open as interrupted and deregister this instance."""
        if self._stop_watching is not None:
            await self._stop_watching()
        if self._rereading is not None:
            self._rereading.cancel()  # its requests are about to end: nothing to apply to
            with contextlib.suppress(asyncio.CancelledError):
                await self._rereading
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        for meter in list(self.active):
            await meter.finish(UsageStatus.INTERRUPTED, error="server shut down")
        await asyncio.gather(*self._cleanups, return_exceptions=True)
        # Last: the ends just written may have failed all their attempts too.
        await self._write_unwritten()
        if self.unwritten_ends:
            logger.error(
                "%d usage rows left unfinished at shutdown; another instance's sweep "
                "ends them as interrupted",
                len(self.unwritten_ends),
            )
        try:
            async with self.engine.begin() as conn:
                await conn.execute(instances.delete().where(instances.c.id == self.instance_id))
        finally:
            await self.writer.close()

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_seconds)
            try:
                await self._register()
                await self.sweep_interrupted()
            except Exception:
                logger.exception("metering heartbeat failed")
            if self.unwritten_ends:
                await self._write_unwritten()

    async def _write_unwritten(self) -> None:
        """Try each final write left unwritten once more."""
        for meter, write in list(self.unwritten_ends.items()):
            # To its end even if the heartbeat is cancelled (a shutdown): a write
            # abandoned midway may still commit, and its retry would count it twice.
            try:
                await run_to_completion(functools.partial(self._write_end, meter, write))
            except Exception:
                logger.exception("finalizing usage row %s failed again", meter.row_id)

    async def _write_end(self, meter: UsageMeter, write: Callable[[], Awaitable[None]]) -> None:
        await write()
        del self.unwritten_ends[meter]

    async def _register(self) -> None:
        """Insert or refresh this instance's row (another's sweep may have removed it
        after a long pause, and an instance without a row is swept as dead)."""
        now = datetime.now(UTC)
        insert = dialect_insert(self.engine)
        stmt = insert(instances).values(id=self.instance_id, started_at=now, heartbeat_at=now)
        async with self.engine.begin() as conn:
            await conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[instances.c.id], set_={"heartbeat_at": now}
                )
            )

    async def sweep_interrupted(self) -> int:
        """Finalize rows of instances that stopped beating as `interrupted`.

        Their tokens stay as of the last checkpoint, which the counter already holds;
        each ends as a failed task for the user's webhooks, in the same transaction.
        Returns the number of rows finalized.
        """
        now = datetime.now(UTC)
        cutoff = now - timedelta(seconds=3 * self.config.heartbeat_seconds)
        live = sa.select(instances.c.id).where(instances.c.heartbeat_at >= cutoff)
        error = "instance stopped before the request finished"
        async with self.engine.begin() as conn:
            swept = (
                await conn.execute(
                    usage_logs.update()
                    .where(
                        usage_logs.c.status == UsageStatus.STREAMING,
                        usage_logs.c.instance_id.not_in(live),
                    )
                    .values(
                        status=UsageStatus.INTERRUPTED,
                        error=error,
                        finished_at=now,
                        updated_at=now,
                    )
                    .returning(usage_logs.c.id, usage_logs.c.user_id, usage_logs.c.model)
                )
            ).all()
            for row in swept:
                data = {"task_id": row.id, "model": row.model, "status": "failed", "error": error}
                event_id = task_event_id(row.id, Event.TASK_FAILED)
                await enqueue(conn, row.user_id, Event.TASK_FAILED, data.copy, event_id)
            await conn.execute(instances.delete().where(instances.c.heartbeat_at < cutoff))
        if swept:
            logger.warning("finalized %d usage rows left by stopped instances", len(swept))
        return len(swept)
