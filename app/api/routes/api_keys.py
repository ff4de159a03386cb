"""The Playground's `/api/v1/api-keys`: scoped keys, shown once, listed masked."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.api.requests import read_json_object, require_principal, services
from app.api.responses import iso_millis, playground_ok
from app.api.routes.auth import masked_key_shape
from app.core import keys
from app.core.auth import Principal
from app.core.errors import BadRequest, Forbidden
from app.core.pagination import parse_page


def _grantable(principal: Principal, permissions: list[str]) -> list[str]:
    """A key may only hand on permissions it holds itself (a session holds them all)."""
    if principal.permissions is not None and not set(permissions) <= principal.permissions:
        missing = sorted(set(permissions) - principal.permissions)
        raise Forbidden(
            f"an API key cannot grant permissions it lacks: {', '.join(missing)}",
            code="missing_permission",
        )
    return permissions


def _detail_shape(key: keys.ApiKey) -> dict[str, Any]:
    return {**masked_key_shape(key), "usage_count": key.usage_count}


async def create(request: Request) -> Response:
    principal = await require_principal(request, "keys:write")
    body = await read_json_object(request)
    created = await keys.create_key(
        services(request).engine,
        principal.user.id,
        name=keys.validate_name(body.get("name")),
        permissions=_grantable(
            principal,
            keys.validate_permissions(body.get("permissions", list(keys.DEFAULT_PERMISSIONS))),
        ),
        expires_in_days=keys.validate_expiry_days(body.get("expires_in")),
        not_after=principal.key_expires_at,  # a key cannot outlive the key creating it
    )
    shape = {**masked_key_shape(created.key), "key": created.plaintext}
    return playground_ok({"api_key": shape}, "API key created successfully", 201)


async def list_all(request: Request) -> Response:
    principal = await require_principal(request, "keys:read")
    query = request.query_params
    page = parse_page(query.get("page"), query.get("limit"), query.get("sort"))
    found, total = await keys.list_keys(services(request).engine, principal.user.id, page)
    return playground_ok(
        {"api_keys": [masked_key_shape(k) for k in found], "pagination": page.describe(total)}
    )


async def detail(request: Request) -> Response:
    principal = await require_principal(request, "keys:read")
    key = await keys.get_key(
        services(request).engine, principal.user.id, request.path_params["key_id"]
    )
    return playground_ok({"api_key": _detail_shape(key)})


async def update(request: Request) -> Response:
    principal = await require_principal(request, "keys:write")
    body = await read_json_object(request)
    if "name" not in body and "permissions" not in body:
        raise BadRequest("nothing to update: give `name` and/or `permissions`")
    # Another user's key is "not found" before anything about the request is judged.
    await keys.get_key(services(request).engine, principal.user.id, request.path_params["key_id"])
    key = await keys.update_key(
        services(request).engine,
        principal.user.id,
        request.path_params["key_id"],
        name=keys.validate_name(body["name"]) if "name" in body else None,
        permissions=(
            _grantable(principal, keys.validate_permissions(body["permissions"]))
            if "permissions" in body
            else None
        ),
    )
    shape = {
        "id": key.id,
        "name": key.name,
        "permissions": key.permissions,
        "updated_at": iso_millis(key.updated_at or key.created_at),
    }
    return playground_ok({"api_key": shape}, "API key updated successfully")


async def delete(request: Request) -> Response:
    principal = await require_principal(request, "keys:write")
    await keys.revoke_key(
        services(request).engine, principal.user.id, request.path_params["key_id"]
    )
    return playground_ok(message="API key deleted successfully")


routes = [
    Route("/api/v1/api-keys", create, methods=["POST"]),
    Route("/api/v1/api-keys", list_all, methods=["GET"]),
    Route("/api/v1/api-keys/{key_id}", detail, methods=["GET"]),
    Route("/api/v1/api-keys/{key_id}", update, methods=["PUT"]),
    Route("/api/v1/api-keys/{key_id}", delete, methods=["DELETE"]),
]
