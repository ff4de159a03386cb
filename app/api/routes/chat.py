"""`POST /api/chat`: one path, two clients, told apart by the body.

- `{"message": "...", "history": [...]}`: Navi's chat, streamed as SSE
  `data: {"content": "..."}` events, counted against the daily message limit (per
  user, or per client IP when anonymous).
- `{"messages": [...], ...}`: AnkiLingoFlash's OpenAI passthrough, the upstream's
  answer returned as is.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.api.envelopes import Surface, surface_error
from app.api.requests import (
    client_ip,
    json_of,
    read_body,
    request_context,
    require_principal,
    resolve_principal,
    services,
)
from app.api.routes.openai import relay_openai
from app.api.streaming import SSE_HEADERS, open_for_client
from app.core.auth import Principal
from app.core.errors import ApiError, BadRequest, RateLimited
from app.core.formats import ContentFormat
from app.core.policy import QuotaExhausted
from app.core.relay import parse_chat_request

CHAT_MESSAGES = "chat_messages"
MAX_MESSAGE = 32_000
MAX_HISTORY = 100
PING_SECONDS = 15


def _is_anki(payload: Any) -> bool:
    """Whether a chat body is AnkiLingoFlash's (OpenAI's shape) rather than Navi's."""
    return isinstance(payload, dict) and "messages" in payload and "message" not in payload


def _surface_of(body: bytes) -> Surface:
    """Whose envelope refuses a body the strict parse refused: AnkiLingoFlash's if the
    body has its shape once read leniently (with a NUL or a lone surrogate, say)."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # ValueError: and UnicodeDecodeError
        return Surface.NAVI
    return Surface.ANKI if _is_anki(payload) else Surface.NAVI


async def chat(request: Request) -> Response:
    try:
        body = await read_body(request)
    except ApiError as exc:
        return surface_error(Surface.NAVI, exc)
    try:
        payload = json_of(body)
    except ApiError as exc:
        return surface_error(_surface_of(body), exc)
    if _is_anki(payload):
        try:
            return await _anki_passthrough(request, payload)
        except ApiError as exc:
            return surface_error(Surface.ANKI, exc)
    try:
        return await _navi_chat(request, payload)
    except DailyLimitReached as exc:
        return _daily_limit_reached(exc.exhausted)
    except ApiError as exc:
        return surface_error(Surface.NAVI, exc)


class DailyLimitReached(Exception):
    """The `chat_messages` counter is full (not any other quota of the relay)."""

    def __init__(self, exhausted: QuotaExhausted) -> None:
        super().__init__(exhausted.message)
        self.exhausted = exhausted


async def _anki_passthrough(request: Request, payload: dict[str, Any]) -> Response:
    svc = services(request)
    if svc.anki.open_mode:
        principal = await resolve_principal(request) or Principal(user=svc.anonymous)
    else:
        principal = await require_principal(request, "ai:write")
    return await relay_openai(request, principal, parse_chat_request(payload))


def _navi_messages(payload: object) -> list[dict[str, str]]:
    if not isinstance(payload, dict):
        raise BadRequest("Message is required")
    message = payload.get("message")
    if not isinstance(message, str) or not message.strip():
        raise BadRequest("Message is required")
    if len(message) > MAX_MESSAGE:
        raise BadRequest(f"Message is longer than {MAX_MESSAGE} characters")
    history = payload.get("history") or []
    if not isinstance(history, list) or len(history) > MAX_HISTORY:
        raise BadRequest(f"history must be an array of at most {MAX_HISTORY} messages")
    turns = []
    for item in history:
        if (
            not isinstance(item, dict)
            or item.get("role") not in ("user", "assistant")
            or not isinstance(item.get("content"), str)
        ):
            raise BadRequest("each history entry needs a role (user|assistant) and content")
        turns.append({"role": item["role"], "content": item["content"]})
    return [*turns, {"role": "user", "content": message}]


async def _navi_chat(request: Request, payload: object) -> Response:
    svc = services(request)
    principal = await resolve_principal(request)
    messages = _navi_messages(payload)
    if principal is not None:
        principal.require("ai:write")
        subject, tier = principal.user.id, principal.user.tier
    else:
        subject, tier = f"ip:{client_ip(request)}", svc.settings.anonymous_tier
        principal = Principal(user=svc.anonymous)
    counted_at = datetime.now(UTC)
    try:
        counted = await svc.policy.consume_counter(subject, tier, CHAT_MESSAGES)
    except QuotaExhausted as exc:
        raise DailyLimitReached(exc) from exc
    chat = parse_chat_request(
        {
            "model": svc.router.chat_model(svc.settings.server.chat_model),
            "messages": messages,
            "stream": True,
        }
    )
    stream = None
    try:
        stream = await open_for_client(
            request,
            svc.relay.open_stream(principal, chat, request_context(request), ContentFormat()),
        )
    finally:
        if stream is None:  # no answer (a failure, or the client gone): no count
            await svc.policy.refund_counter(subject, tier, CHAT_MESSAGES, counted_at)
    if stream is None:
        return Response(status_code=499)
    headers = dict(SSE_HEADERS)
    if counted.limit is not None:
        headers["X-RateLimit-Remaining"] = str(counted.remaining)
    if counted.reset_at is not None:
        headers["X-RateLimit-Reset"] = str(int(counted.reset_at.timestamp()))
    return EventSourceResponse(stream, ping=PING_SECONDS, headers=headers)


def _daily_limit_reached(exc: QuotaExhausted) -> Response:
    usage = exc.usage
    reset_at = int(usage.reset_at.timestamp()) if usage.reset_at else None
    error = RateLimited(
        f"You've used all {usage.limit} messages for today. Come back tomorrow!",
        code="daily_limit_reached",
        details={"remaining": 0, "resetAt": reset_at},
        headers={
            **exc.headers,
            "X-RateLimit-Remaining": "0",
            **({"X-RateLimit-Reset": str(reset_at)} if reset_at else {}),
        },
    )
    return surface_error(Surface.NAVI, error)


routes = [Route("/api/chat", chat, methods=["POST"])]
