"""The Playground's `/api/v1/webhooks`: endpoints that receive signed event deliveries."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.api.requests import read_json_object, require_principal, services
from app.api.responses import iso_millis, playground_ok
from app.core import webhooks
from app.core.auth import Principal
from app.core.errors import BadRequest
from app.core.pagination import parse_page

READERS = frozenset({"webhooks:read", "webhooks:write"})


async def _reader(request: Request) -> Principal:
    """A key that may manage webhooks may also see them."""
    principal = await require_principal(request)
    if principal.permissions is not None and not principal.permissions & READERS:
        principal.require("webhooks:read")
    return principal


def _shape(endpoint: webhooks.WebhookEndpoint) -> dict[str, Any]:
    return {
        "id": endpoint.id,
        "url": endpoint.url,
        "events": endpoint.events,
        "active": endpoint.active,
        "created_at": iso_millis(endpoint.created_at),
        "last_delivery": (
            iso_millis(endpoint.last_delivery_at) if endpoint.last_delivery_at else None
        ),
    }


async def create(request: Request) -> Response:
    principal = await require_principal(request, "webhooks:write")
    body = await read_json_object(request)
    svc = services(request)
    config = svc.settings.webhooks
    created = await webhooks.create_endpoint(
        svc.engine,
        svc.secrets,
        principal.user.id,
        url=webhooks.validate_url(body.get("url"), config.allow_private_networks),
        events=webhooks.validate_events(body.get("events")),
        secret=webhooks.validate_secret(body.get("secret")),
        active=webhooks.validate_active(body.get("active", True)),
        max_per_user=config.max_per_user,
    )
    shape = {**_shape(created.endpoint), "secret": created.secret}
    return playground_ok({"webhook": shape}, "Webhook created successfully", 201)


async def list_all(request: Request) -> Response:
    principal = await _reader(request)
    query = request.query_params
    page = parse_page(query.get("page"), query.get("limit"), query.get("sort"))
    found, total = await webhooks.list_endpoints(services(request).engine, principal.user.id, page)
    return playground_ok(
        {"webhooks": [_shape(e) for e in found], "pagination": page.describe(total)}
    )


async def detail(request: Request) -> Response:
    principal = await _reader(request)
    endpoint = await webhooks.get_endpoint(
        services(request).engine, principal.user.id, request.path_params["webhook_id"]
    )
    return playground_ok({"webhook": _shape(endpoint)})


async def update(request: Request) -> Response:
    principal = await require_principal(request, "webhooks:write")
    body = await read_json_object(request)
    fields = ("url", "events", "secret", "active")
    if not any(name in body for name in fields):
        raise BadRequest(f"nothing to update: give any of {', '.join(fields)}")
    svc = services(request)
    allow_private = svc.settings.webhooks.allow_private_networks
    endpoint = await webhooks.update_endpoint(
        svc.engine,
        svc.secrets,
        principal.user.id,
        request.path_params["webhook_id"],
        url=webhooks.validate_url(body["url"], allow_private) if "url" in body else None,
        events=webhooks.validate_events(body["events"]) if "events" in body else None,
        secret=webhooks.validate_secret(body["secret"], generate=False)
        if "secret" in body
        else None,
        active=webhooks.validate_active(body["active"]) if "active" in body else None,
    )
    shape = {
        "id": endpoint.id,
        "url": endpoint.url,
        "events": endpoint.events,
        "active": endpoint.active,
        "updated_at": iso_millis(endpoint.updated_at),
    }
    return playground_ok({"webhook": shape}, "Webhook updated successfully")


async def delete(request: Request) -> Response:
    principal = await require_principal(request, "webhooks:write")
    await webhooks.delete_endpoint(
        services(request).engine, principal.user.id, request.path_params["webhook_id"]
    )
    return playground_ok(message="Webhook deleted successfully")


routes = [
    Route("/api/v1/webhooks", create, methods=["POST"]),
    Route("/api/v1/webhooks", list_all, methods=["GET"]),
    Route("/api/v1/webhooks/{webhook_id}", detail, methods=["GET"]),
    Route("/api/v1/webhooks/{webhook_id}", update, methods=["PUT"]),
    Route("/api/v1/webhooks/{webhook_id}", delete, methods=["DELETE"]),
]
