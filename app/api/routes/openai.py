"""The OpenAI-compatible relay: `/v1/chat/completions` and `/v1/models`."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app.api.requests import read_json, request_context, require_principal, services
from app.api.streaming import RelayStreamResponse, cancel_on_disconnect, open_for_client
from app.core.auth import Principal
from app.core.formats import OpenAIFormat
from app.core.relay import ChatRequest, parse_chat_request


async def chat_completions(request: Request) -> Response:
    principal = await require_principal(request, "ai:write")
    chat = parse_chat_request(await read_json(request))
    return await relay_openai(request, principal, chat)


async def relay_openai(request: Request, principal: Principal, chat: ChatRequest) -> Response:
    """The upstream's OpenAI answer as is: streamed as SSE, or whole as JSON."""
    svc = services(request)
    relay = svc.relay
    context = request_context(request)
    if chat.stream:
        stream = await open_for_client(
            request, relay.open_stream(principal, chat, context, OpenAIFormat(chat.include_usage))
        )
        if stream is None:  # the client is gone
            return Response(status_code=499)
        return RelayStreamResponse(stream, on_server_cancel=svc.metering.drain)
    body = await cancel_on_disconnect(request.receive, relay.complete(principal, chat, context))
    if body is None:  # the client is gone; nobody reads this
        return Response(status_code=499)
    return Response(body, media_type="application/json")


async def list_models(request: Request) -> Response:
    await require_principal(request, "ai:read")
    created = int(time.time())
    models = [
        {"id": m.name, "object": "model", "created": created, "owned_by": m.owned_by}
        for m in services(request).router.catalogue()
    ]
    return JSONResponse({"object": "list", "data": models})


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
]
