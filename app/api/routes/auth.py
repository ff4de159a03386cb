"""Accounts and sessions: the Playground's `/api/auth/*`, Navi's refresh, Clerk's webhook."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from app.api.requests import (
    client_ip,
    read_body,
    read_json_object,
    require_principal,
    services,
)
from app.api.responses import iso_millis, playground_ok
from app.core import accounts, clerk
from app.core.auth import Principal
from app.core.errors import ApiError, BadRequest
from app.core.keys import ApiKey, list_keys
from app.core.users import User


def user_shape(user: User) -> dict[str, Any]:
    return {
        "id": user.id,
        "username": user.username,
        "email": user.email,
        "tier": user.tier,
        "created_at": iso_millis(user.created_at),
    }


def masked_key_shape(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "name": key.name,
        "key": key.mask,
        "permissions": key.permissions,
        "created_at": iso_millis(key.created_at),
        "expires_at": iso_millis(key.expires_at) if key.expires_at else None,
        "last_used": iso_millis(key.last_used_at) if key.last_used_at else None,
    }


def _session_data(session: accounts.AccountSession) -> dict[str, Any]:
    return {
        "user": user_shape(session.user),
        "token": session.tokens.access_token,
        # Beyond the spec: lets a client renew the session through /api/auth/refresh.
        "refresh_token": session.tokens.refresh_token,
        "expires_in": session.tokens.expires_in,
    }


async def register(request: Request) -> Response:
    body = await read_json_object(request)
    svc = services(request)
    session = await accounts.register(
        svc.engine,
        svc.sessions,
        username=accounts.validate_username(body.get("username")),
        email=accounts.validate_email(body.get("email")),
        password=accounts.validate_password(body.get("password")),
        tier=svc.settings.server.default_tier,
    )
    return playground_ok(_session_data(session), "User registered successfully", 201)


async def login(request: Request) -> Response:
    body = await read_json_object(request)
    email, password = body.get("email"), body.get("password")
    if not isinstance(email, str) or not isinstance(password, str) or not email or not password:
        raise BadRequest("email and password are required", details={"field": "email"})
    svc = services(request)
    session = await accounts.login(
        svc.engine,
        svc.sessions,
        svc.policy,
        email=email,
        password=password,
        client_ip=client_ip(request),
    )
    return playground_ok(_session_data(session), "Login successful")


async def me(request: Request) -> Response:
    principal = await require_principal(request, "usage:read")
    svc = services(request)
    user = principal.user
    usage = await svc.policy.ai_request_usage(user.id, user.tier)
    keys, _ = await list_keys(svc.engine, user.id)
    return playground_ok(
        {
            **user_shape(user),
            "quota": {w: {"used": u.used, "limit": u.limit} for w, u in usage.items()},
            "api_keys": [masked_key_shape(k) for k in keys],
            "updated_at": iso_millis(user.updated_at),
        }
    )


async def update_profile(request: Request) -> Response:
    principal = await require_principal(request, session_only=True)
    body = await read_json_object(request)
    username = body.get("username")
    email = body.get("email")
    if username is None and email is None:
        raise BadRequest("nothing to update: give `username` and/or `email`")
    user = await accounts.update_profile(
        services(request).engine,
        principal.user.id,
        username=None if username is None else accounts.validate_username(username),
        email=None if email is None else accounts.validate_email(email),
    )
    data = {**user_shape(user), "updated_at": iso_millis(user.updated_at)}
    data.pop("created_at")
    return playground_ok(data, "Profile updated successfully")


async def change_password(request: Request) -> Response:
    principal = await require_principal(request, session_only=True)
    body = await read_json_object(request)
    old = body.get("oldPassword")
    if not isinstance(old, str) or not old:
        raise BadRequest("oldPassword is required", details={"field": "oldPassword"})
    new = accounts.validate_password(body.get("newPassword"), "newPassword")
    svc = services(request)
    await accounts.change_password(
        svc.engine, svc.policy, principal.user, old=old, new=new, client_ip=client_ip(request)
    )
    return playground_ok(message="Password changed successfully")


async def logout(request: Request) -> Response:
    principal: Principal = await require_principal(request, session_only=True)
    if principal.token_id is not None and principal.token_expires_at is not None:
        await services(request).sessions.logout(
            principal.user.id, principal.token_id, principal.token_expires_at, principal.session_id
        )
    return playground_ok(message="Logout successful")


async def refresh(request: Request) -> Response:
    body = await read_json_object(request)
    token = body.get("refreshToken")
    if not isinstance(token, str) or not token:
        raise BadRequest("refreshToken is required")
    tokens = await services(request).sessions.refresh(token)
    return JSONResponse(
        {"success": True, "accessToken": tokens.access_token, "refreshToken": tokens.refresh_token}
    )


class LoginNotConfigured(ApiError):
    status_code = 503
    code = "oauth_not_configured"


async def oauth_login(request: Request) -> Response:
    """Navi's `GET /api/auth/login`: off to the provider's login page."""
    flow = services(request).oauth
    if flow is None:
        raise LoginNotConfigured("OAuth login is not configured on this server")
    url = await flow.start(
        request.query_params.get("redirect"), str(request.url_for("oauth_callback"))
    )
    return RedirectResponse(url, status_code=302, headers={"Cache-Control": "no-store"})


async def oauth_callback(request: Request) -> Response:
    """Back from the provider: on to the app with our tokens, or to its error URL."""
    flow = services(request).oauth
    if flow is None:
        raise LoginNotConfigured("OAuth login is not configured on this server")
    url = await flow.finish(request.query_params)
    return RedirectResponse(url, status_code=302, headers={"Cache-Control": "no-store"})


async def clerk_webhook(request: Request) -> Response:
    body = await read_body(request)
    outcome = await clerk.handle_webhook(services(request), body, dict(request.headers))
    return JSONResponse({"received": True, "outcome": outcome.value})


routes = [
    Route("/api/auth/register", register, methods=["POST"]),
    Route("/api/auth/login", login, methods=["POST"]),
    Route("/api/auth/login", oauth_login, methods=["GET"]),
    Route("/api/auth/callback", oauth_callback, methods=["GET"], name="oauth_callback"),
    Route("/api/auth/me", me, methods=["GET"]),
    Route("/api/auth/profile", update_profile, methods=["PUT"]),
    Route("/api/auth/password", change_password, methods=["PUT"]),
    Route("/api/auth/logout", logout, methods=["POST"]),
    Route("/api/auth/refresh", refresh, methods=["POST"]),
    Route("/api/auth/webhook/clerk", clerk_webhook, methods=["POST"]),
]
