"""The Playground's AI routes: `/api/v1/ai/chat|generate|models|usage` and `/api/v1/usage`."""

from __future__ import annotations

import json
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.api.requests import read_json_object, request_context, require_principal, services
from app.api.responses import iso_millis, playground_ok
from app.api.streaming import SSE_HEADERS, cancel_on_disconnect, open_for_client
from app.core import reports
from app.core.auth import Principal
from app.core.errors import BadRequest
from app.core.formats import OpenAIFormat
from app.core.pagination import parse_page
from app.core.relay import ChatRequest, parse_chat_request

# The Playground's documented defaults.
DEFAULTS = {"max_tokens": 1000, "temperature": 0.7, "top_p": 0.9}


def _number(body: dict[str, Any], name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise BadRequest(f"`{name}` must be a number from {low} to {high}", details={"field": name})


def _chat_body(request: Request, body: dict[str, Any], messages: object) -> dict[str, Any]:
    svc = services(request)
    merged = {**DEFAULTS, **{k: v for k, v in body.items() if v is not None}}
    merged["messages"] = messages
    merged.setdefault("model", svc.router.chat_model(svc.settings.server.chat_model))
    _number(merged, "temperature", 0, 2)
    _number(merged, "top_p", 0, 1)
    return merged


async def _answer(request: Request, principal: Principal, chat: ChatRequest) -> dict[str, Any]:
    svc = services(request)
    raw = await cancel_on_disconnect(
        request.receive, svc.relay.complete(principal, chat, request_context(request))
    )
    if raw is None:
        raise BadRequest("client disconnected")
    answer: dict[str, Any] = json.loads(raw)
    return answer


async def chat(request: Request) -> Response:
    principal = await require_principal(request, "ai:write")
    body = await read_json_object(request)
    payload = _chat_body(request, body, body.get("messages"))
    payload.setdefault("stream", False)
    chat_request = parse_chat_request(payload)
    if chat_request.stream:
        svc = services(request)
        stream = await open_for_client(
            request,
            svc.relay.open_stream(
                principal, chat_request, request_context(request), OpenAIFormat(True)
            ),
        )
        if stream is None:  # the client is gone
            return Response(status_code=499)
        return EventSourceResponse(stream, ping=15, headers=SSE_HEADERS)
    answer = await _answer(request, principal, chat_request)
    return playground_ok(
        {
            "id": answer.get("id"),
            "model": answer.get("model"),
            "choices": answer.get("choices", []),
            "usage": answer.get("usage"),
            "created": answer.get("created"),
        }
    )


async def generate(request: Request) -> Response:
    principal = await require_principal(request, "ai:write")
    body = await read_json_object(request)
    prompt = body.pop("prompt", None)
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest("`prompt` must be a non-empty string", details={"field": "prompt"})
    n = body.get("n")
    if n is not None and (type(n) is not int or not 1 <= n <= 10):
        raise BadRequest("`n` must be a whole number from 1 to 10", details={"field": "n"})
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str)
        or (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop))
    ):
        raise BadRequest("`stop` must be a string or up to 4 strings", details={"field": "stop"})
    body["stream"] = False
    payload = _chat_body(request, body, [{"role": "user", "content": prompt}])
    answer = await _answer(request, principal, parse_chat_request(payload))
    choices = [
        {
            "text": (choice.get("message") or {}).get("content") or "",
            "index": choice.get("index", i),
            "finish_reason": choice.get("finish_reason"),
        }
        for i, choice in enumerate(answer.get("choices") or [])
    ]
    return playground_ok(
        {
            "id": answer.get("id"),
            "model": answer.get("model"),
            "choices": choices,
            "usage": answer.get("usage"),
        }
    )


async def models(request: Request) -> Response:
    await require_principal(request, "ai:read")
    listed = [
        {
            "id": m.name,
            "name": m.name,
            "description": m.description or f"{m.name} via {m.owned_by}",
            "max_tokens": m.max_tokens,
            "supported_endpoints": ["chat", "generate"],
            "pricing": {
                "per_1k_tokens": round(m.price.completion / 1000, 8) if m.price else 0.0,
                "prompt_per_1k_tokens": round(m.price.prompt / 1000, 8) if m.price else 0.0,
                "completion_per_1k_tokens": (
                    round(m.price.completion / 1000, 8) if m.price else 0.0
                ),
            },
        }
        for m in services(request).router.catalogue()
    ]
    return playground_ok({"models": listed})


def _totals(t: reports.Totals) -> dict[str, Any]:
    return {"requests": t.requests, "tokens": t.tokens, "cost": t.cost}


async def usage(request: Request) -> Response:
    principal = await require_principal(request, "usage:read")
    query = request.query_params
    start, end = reports.parse_range(query.get("start_date"), query.get("end_date"))
    svc = services(request)
    report = await reports.usage_report(
        svc.engine, principal.user.id, start, end, query.get("model") or None
    )
    quota = await svc.policy.ai_request_usage(principal.user.id, principal.user.tier)
    return playground_ok(
        {
            "usage": {
                "total_requests": report.total.requests,
                "total_tokens": report.total.tokens,
                "total_cost": report.total.cost,
                "by_model": {m: _totals(t) for m, t in report.by_model.items()},
                "by_date": [{"date": d, **_totals(t)} for d, t in report.by_date],
                "start_date": iso_millis(report.start),
                "end_date": iso_millis(report.end),
            },
            "quota": {w: {"used": u.used, "limit": u.limit} for w, u in quota.items()},
        }
    )


def _usage_item(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "request_id": row["request_id"],
        "model": row["model"],
        "provider": row["provider"],
        "status": row["status"],
        "finish_reason": row["finish_reason"],
        "prompt_tokens": row["prompt_tokens"],
        "completion_tokens": row["completion_tokens"],
        "total_tokens": row["total_tokens"],
        "cost": row["cost"],
        "stream": bool(row["stream"]),
        "device_id": row["device_id"],
        "platform": row["platform"],
        "started_at": iso_millis(row["started_at"]),
        "finished_at": iso_millis(row["finished_at"]) if row["finished_at"] else None,
    }


async def usage_log(request: Request) -> Response:
    principal = await require_principal(request, "usage:read")
    query = request.query_params
    page = parse_page(query.get("page"), query.get("limit"), query.get("sort"))
    items, total = await reports.list_usage(services(request).engine, principal.user.id, page)
    return playground_ok(
        {"items": [_usage_item(r) for r in items], "pagination": page.describe(total)}
    )


routes = [
    Route("/api/v1/ai/chat", chat, methods=["POST"]),
    Route("/api/v1/ai/generate", generate, methods=["POST"]),
    Route("/api/v1/ai/models", models, methods=["GET"]),
    Route("/api/v1/ai/usage", usage, methods=["GET"]),
    Route("/api/v1/usage", usage_log, methods=["GET"]),
]
