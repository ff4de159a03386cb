"""Navi's account and sync routes: `/api/user`, `/api/conversations`, `/api/messages`."""

from __future__ import annotations

from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app.api.requests import read_json_object, require_principal, services
from app.core import conversations as sync
from app.core.errors import BadRequest
from app.core.pagination import parse_offset
from app.core.quota import iso_z


async def user(request: Request) -> Response:
    principal = await require_principal(request)
    u = principal.user
    return JSONResponse(
        {
            "success": True,
            "user": {
                "id": u.id,
                "email": u.email,
                "firstName": u.first_name,
                "lastName": u.last_name,
                "profilePictureUrl": u.image_url,
            },
        }
    )


def _conversation_shape(c: sync.Conversation) -> dict[str, str]:
    return {
        "id": c.id,
        "title": c.title,
        "createdAt": iso_z(c.created_at),
        "updatedAt": iso_z(c.updated_at),
    }


async def list_conversations(request: Request) -> Response:
    principal = await require_principal(request)
    limit, offset = parse_offset(
        request.query_params.get("limit"), request.query_params.get("offset"), 50, 200
    )
    found, total = await sync.list_conversations(
        services(request).engine, principal.user.id, limit, offset
    )
    return JSONResponse(
        {"success": True, "conversations": [_conversation_shape(c) for c in found], "total": total}
    )


async def create_conversation(request: Request) -> Response:
    principal = await require_principal(request)
    body = await read_json_object(request)
    title = body.get("title", "New Conversation")
    if not isinstance(title, str) or len(title) > sync.MAX_TITLE:
        raise BadRequest(f"`title` must be a string of at most {sync.MAX_TITLE} characters")
    conversation = await sync.create_conversation(
        services(request).engine,
        principal.user.id,
        sync.validate_id(body.get("id"), "id"),
        title or "New Conversation",
    )
    return JSONResponse({"success": True, "conversation": _conversation_shape(conversation)})


async def delete_conversation(request: Request) -> Response:
    principal = await require_principal(request)
    conversation_id = sync.validate_id(request.query_params.get("id"), "id")
    await sync.delete_conversation(services(request).engine, principal.user.id, conversation_id)
    return JSONResponse({"success": True})


async def list_messages(request: Request) -> Response:
    principal = await require_principal(request)
    conversation_id = sync.validate_id(request.query_params.get("conversationId"), "conversationId")
    limit, offset = parse_offset(
        request.query_params.get("limit"), request.query_params.get("offset"), 100, 1000
    )
    found = await sync.list_messages(
        services(request).engine, principal.user.id, conversation_id, limit, offset
    )
    return JSONResponse(
        {
            "success": True,
            "messages": [
                {
                    "id": m.id,
                    "conversationId": m.conversation_id,
                    "role": m.role,
                    "content": m.content,
                    "createdAt": iso_z(m.created_at),
                }
                for m in found
            ],
        }
    )


async def save_messages(request: Request) -> Response:
    principal = await require_principal(request)
    body = await read_json_object(request)
    conversation_id = sync.validate_id(body.get("conversationId"), "conversationId")
    saved = await sync.save_messages(
        services(request).engine,
        principal.user.id,
        conversation_id,
        sync.validate_messages(body.get("messages")),
    )
    return JSONResponse({"success": True, "savedCount": saved})


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok", "timestamp": iso_z(datetime.now(UTC))})


routes = [
    Route("/api/user", user, methods=["GET"]),
    Route("/api/conversations", list_conversations, methods=["GET"]),
    Route("/api/conversations", create_conversation, methods=["POST"]),
    Route("/api/conversations", delete_conversation, methods=["DELETE"]),
    Route("/api/messages", list_messages, methods=["GET"]),
    Route("/api/messages", save_messages, methods=["POST"]),
    Route("/api/health", health, methods=["GET"]),
]
