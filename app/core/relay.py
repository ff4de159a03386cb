"""Relaying chat completions to providers, metered token by token.

`Relay.complete` answers a non-streamed request; `Relay.open_stream` returns the
client's byte stream once the upstream has accepted the request (so a refusal is
still an ordinary error response). While the stream runs, every token that reaches
the client is counted; the generator learns that a chunk was sent when it is resumed
after yielding it, so a chunk lost to a disconnect is never billed.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

from app.core.auth import Principal
from app.core.config import Settings
from app.core.errors import ApiError, BadRequest, QuotaExceeded, UpstreamError
from app.core.formats import StreamFormat, with_usage
from app.core.metering import Metering, RequestInfo, Usage, UsageMeter, run_to_completion
from app.core.policy import Policy
from app.core.providers import (
    Completion,
    StreamChunk,
    UpstreamStream,
    estimate_prompt_tokens,
    estimate_tokens,
)
from app.core.quota import QuotaSnapshot
from app.core.routing import ModelRouter, Target, first_answer
from app.core.tables import UsageStatus

QUOTA_FINISH_REASON = "quota_exhausted"
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A validated OpenAI chat completion request."""

    body: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool


@dataclass(frozen=True, slots=True)
class RequestContext:
    request_id: str
    device_id: str | None = None
    platform: str | None = None


def parse_chat_request(payload: object) -> ChatRequest:
    """Check the fields the relay relies on; the provider validates the rest."""
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("`model` must be a non-empty string", details={"param": "model"})
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("`messages` must be a non-empty array", details={"param": "messages"})
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(
                f"`messages[{i}]` must be an object with a string `role`",
                details={"param": f"messages[{i}]"},
            )
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("`stream` must be a boolean", details={"param": "stream"})
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("`stream_options` must be an object", details={"param": "stream_options"})
    for name in ("max_tokens", "max_completion_tokens", "n"):
        value = payload.get(name)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise BadRequest(f"`{name}` must be a positive integer", details={"param": name})
    stop = payload.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise BadRequest(
            "`stop` must be a string or an array of strings", details={"param": "stop"}
        )
    include_usage = bool(stream and options and options.get("include_usage") is True)
    body = dict(payload)
    if stream:
        # Always ask for the upstream's own count; the client gets it only if it asked.
        body["stream_options"] = {**(options or {}), "include_usage": True}
    return ChatRequest(body=body, model=model, stream=stream, include_usage=include_usage)


class Relay:
    def __init__(
        self,
        settings: Settings,
        router: ModelRouter,
        metering: Metering,
        policy: Policy,
    ) -> None:
        self._settings = settings
        self._router = router
        self._metering = metering
        self._policy = policy

    async def _started(
        self,
        principal: Principal,
        request: ChatRequest,
        context: RequestContext,
        call: Callable[[Target], Awaitable[T]],
    ) -> tuple[UsageMeter, T]:
        """The request's meter, once its start is written, and the first target's answer.

        A start that a limit may refuse is written before any upstream is called: a
        user out of quota costs the upstream nothing. A start that nothing can refuse
        (no limit at all) is written while the upstream is called, so the answer does
        not wait for the database too. Either way nothing reaches the client before
        the start is written, and a request no target answered is not billed.
        """
        chain = self._router.chain(request.model)
        user = principal.user
        limit = self._settings.tier(user.tier).monthly_tokens
        prompt_tokens = estimate_prompt_tokens(request.body["messages"])

        requests = self._policy.ai_request_increments(user.tier)

        async def admit(
            conn: AsyncConnection | None,
            quota: QuotaSnapshot,
            counted: list[tuple[int, int] | None],
        ) -> None:
            """With the prompt already counted: refuse over the quota, count the request."""
            if limit is not None:
                before = QuotaSnapshot(limit, quota.used - prompt_tokens, quota.period, quota.seq)
                if before.exhausted:
                    raise QuotaExceeded(
                        "Token quota exhausted for this period",
                        details={"quota": before.as_dict()},
                    )
                if quota.used >= limit:
                    raise QuotaExceeded(
                        "The prompt alone would use up the remaining token quota",
                        details={"quota": before.as_dict(), "prompt_tokens": prompt_tokens},
                    )
            await self._policy.judge_ai_request(
                conn, user.id, requests, counted, warn=user.has_webhooks
            )

        info = RequestInfo(
            request_id=context.request_id,
            user_id=user.id,
            api_key_id=principal.api_key_id,
            model=request.model,
            provider=chain[0].provider.name,
            stream=request.stream,
            token_limit=limit,
            device_id=context.device_id,
            platform=context.platform,
            has_webhooks=user.has_webhooks,
        )
        if limit is None and all(inc.limit is None for inc in requests):
            # Nothing to admit: the start goes beside the upstream call.
            starting = self._metering.begin_beside(info, prompt_tokens, also=requests)
            return await self._answered_beside(starting, chain, call)
        meter = await self._metering.begin(info, prompt_tokens, admit, also=requests)
        remaining = meter.remaining
        if remaining is not None and not request.stream:
            # A whole answer cannot be cut mid-way: cap what it may cost instead.
            _cap_completion(request.body, remaining)
        try:
            target, answer = await first_answer(chain, call)
        except asyncio.CancelledError:
            await asyncio.shield(self._refused(meter, UsageStatus.CANCELLED, "client disconnected"))
            raise
        except Exception as exc:
            await self._refused(meter, UsageStatus.ERROR, _describe(exc))
            raise
        meter.answered_by(target)
        return meter, answer

    async def _answered_beside(
        self,
        starting: asyncio.Future[UsageMeter],
        chain: list[Target],
        call: Callable[[Target], Awaitable[T]],
    ) -> tuple[UsageMeter, T]:
        """The first target's answer and the meter of the start written meanwhile."""
        answered: tuple[Target, T] | None = None
        try:
            answered = await first_answer(chain, call)
            # Most starts are committed by the time the answer is in.
            meter = starting.result() if starting.done() else await asyncio.shield(starting)
        except BaseException as exc:
            answer = answered[1] if answered is not None else None
            await run_to_completion(functools.partial(self._abandoned, starting, answer, exc))
            raise
        target, answer = answered
        meter.answered_by(target)
        return meter, answer

    async def _abandoned(
        self, starting: asyncio.Future[UsageMeter], answer: object, exc: BaseException
    ) -> None:
        """No answer, no start, or no client: close what came, give back what was written."""
        if isinstance(answer, _OpenedStream):
            await answer.aclose()
        try:
            meter = await starting
        except Exception:
            return  # not written (the metering ends what it may have left)
        if isinstance(exc, Exception):
            await self._refused(meter, UsageStatus.ERROR, _describe(exc))
        else:  # cancelled: the client left
            await self._refused(meter, UsageStatus.CANCELLED, "client disconnected")

    async def _refused(self, meter: UsageMeter, status: UsageStatus, error: str) -> None:
        """The upstream never delivered: bill nothing and give the request back."""
        await meter.discard(status, error)
        await self._policy.refund_ai_request(meter.info.user_id, meter.started_at)

    async def complete(
        self, principal: Principal, request: ChatRequest, context: RequestContext
    ) -> bytes:
        async def call(target: Target) -> Completion:
            return await target.provider.complete({**request.body, "model": target.model})

        meter, completion = await self._started(principal, request, context, call)
        answer, usage = completion.body, completion.usage
        if usage is None:  # the client is told the count billed, as a stream's is
            usage = Usage(
                prompt_tokens=meter.prompt_tokens,
                completion_tokens=estimate_tokens(completion.completion_text),
            )
            answer = with_usage(answer, usage)
        meter.answer = answer
        await meter.finish(UsageStatus.COMPLETED, usage=usage, finish_reason="stop")
        return answer

    async def open_stream(
        self,
        principal: Principal,
        request: ChatRequest,
        context: RequestContext,
        fmt: StreamFormat,
    ) -> AsyncGenerator[bytes, None]:
        """The client's stream, once a provider has sent its first event."""

        async def call(target: Target) -> _OpenedStream:
            return await _open_stream(target, {**request.body, "model": target.model})

        meter, opened = await self._started(principal, request, context, call)
        return relay_stream(opened, meter, fmt)


# Below this many tokens left, a non-streamed request's `max_tokens` is capped to them.
CAP_BELOW = 32_768


def _cap_completion(body: dict[str, Any], remaining: int) -> None:
    """Keep a whole answer within the quota left (streams are cut instead).

    Only near the limit: a cap set on every request would change answers for nothing.
    The client's own field is capped if it set one, else `max_tokens`.
    """
    if remaining >= CAP_BELOW:
        return
    field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    asked = body.get(field)
    body[field] = min(asked, remaining) if isinstance(asked, int) else remaining


class _OpenedStream:
    """An upstream stream whose first event has been read (so it is known to work)."""

    def __init__(
        self,
        upstream: UpstreamStream,
        events: AsyncIterator[list[StreamChunk]],
        first: list[StreamChunk],
    ) -> None:
        self._upstream = upstream
        self._events = events
        self._first: list[StreamChunk] | None = first

    def __aiter__(self) -> _OpenedStream:
        return self

    async def __anext__(self) -> list[StreamChunk]:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await anext(self._events)

    async def aclose(self) -> None:
        closer = getattr(self._events, "aclose", None)
        try:
            if closer is not None:
                await closer()
        finally:
            await self._upstream.aclose()


async def _open_stream(target: Target, body: dict[str, Any]) -> _OpenedStream:
    upstream = await target.provider.open_stream(body)
    events = aiter(upstream)
    try:
        first = await anext(events)
    except StopAsyncIteration:
        await upstream.aclose()
        raise UpstreamError(f"provider {target.provider.name} ended the stream at once") from None
    except BaseException:
        await upstream.aclose()
        raise
    return _OpenedStream(upstream, events, first)


async def relay_stream(
    upstream: UpstreamStream, meter: UsageMeter, fmt: StreamFormat
) -> AsyncGenerator[bytes, None]:
    """The client's bytes in `fmt`; finalizes the meter however the stream ends.

    Must be closed with `aclose()` (the streaming responses do), so that a client
    that went away finalizes the row as `cancelled` and closes the upstream at once.
    """
    status, finish_reason = UsageStatus.CANCELLED, None
    error: str | None = "client disconnected"
    usage: Usage | None = None
    # The id, created and model of chunks we add come from the last event, or the first
    # where the last has none (some upstreams name them on their first event only).
    first: StreamChunk | None = None
    last: StreamChunk | None = None
    try:
        try:
            async for batch in upstream:
                opening = first is None
                first = first or batch[0]
                tokens = sum([chunk.tokens for chunk in batch])
                budget = meter.remaining
                # A batch without tokens (a finish) costs nothing: it goes through even
                # with the quota overrun meanwhile by another request.
                if tokens and budget is not None and tokens > budget:
                    # More tokens than the quota holds: end here, cleanly, as a length cut.
                    sent = _within(batch, budget)
                    if data := fmt.encode(sent):
                        yield data
                    if delivered := sum([chunk.tokens for chunk in sent]):
                        meter.deliver(delivered)
                    # The first chunk not sent; all were if one chunk holds several tokens.
                    last = batch[min(len(sent), len(batch) - 1)]
                    status, finish_reason, error = UsageStatus.COMPLETED, QUOTA_FINISH_REASON, None
                    # A usage the upstream sent so far (some send one on every chunk)
                    # counts what it had generated then, not what reached the client:
                    # a cut bills the delivered tokens, and the upstream's prompt count.
                    usage = _delivered(meter, usage)
                    yield b"".join(fmt.cut(_meta(first, last), usage))
                    return
                last = batch[-1]
                for chunk in batch:
                    if chunk.usage is not None:
                        usage = chunk.usage
                    if chunk.finish_reason:
                        finish_reason = chunk.finish_reason
                # One write for what one upstream read brought. The first read yields
                # even with nothing to send (Navi's format drops a role-only event): a
                # caller may close the stream there, before the upstream is read again.
                if (data := fmt.encode(batch)) or opening:
                    yield data
                # Resumed: everything above was handed to the client.
                if tokens:
                    meter.deliver(tokens)
            if finish_reason is None:
                raise UpstreamError("provider ended the stream before finishing")
        except Exception as exc:
            status, error = UsageStatus.ERROR, _describe(exc)
            if not isinstance(exc, ApiError):
                raise
            yield fmt.error(exc)
            return
        status, error = UsageStatus.COMPLETED, None
        yield b"".join(fmt.finish(_meta(first, last), meter.counted, usage))
    finally:
        try:
            # Closing only ends generators and hands the connection back: it never
            # waits, so no cancellation can cut it, and it needs no task to shield it.
            await upstream.aclose()
        finally:
            # Runs to its end by itself, cancelled or not.
            await meter.finish(status, usage=usage, finish_reason=finish_reason, error=error)


def _within(batch: list[StreamChunk], budget: int) -> list[StreamChunk]:
    """The chunks of `batch` before the first token past `budget`."""
    pending = 0
    for i, chunk in enumerate(batch):
        if chunk.tokens and pending >= budget:
            return batch[:i]
        pending += chunk.tokens
    return batch


def _delivered(meter: UsageMeter, upstream: Usage | None) -> Usage:
    """What a stream cut short bills: the delivered tokens, after the prompt tokens the
    upstream reported, or else the estimated ones."""
    prompt = upstream.prompt_tokens if upstream is not None else meter.prompt_tokens
    return Usage(prompt, meter.completion_tokens)


def _meta(first: StreamChunk | None, last: StreamChunk | None) -> dict[str, Any]:
    return (last.meta if last is not None else {}) or (first.meta if first is not None else {})


def _describe(exc: Exception) -> str:
    return exc.message if isinstance(exc, ApiError) else f"internal error: {type(exc).__name__}"
