"""ASGI middleware: request ids, rate limits and CORS."""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Awaitable
from datetime import UTC, datetime

from starlette.datastructures import MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.envelopes import Surface, error_response, surface_for
from app.api.requests import client_ip, resolve_principal, services
from app.api.responses import iso_millis
from app.core.errors import ApiError, BadRequest, RateLimited
from app.core.ratelimit import Decision
from app.core.security import new_id

logger = logging.getLogger("livegate")

_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate: str = value.decode("latin-1")
            if _CLIENT_ID.match(candidate):
                return candidate
            break
    return new_id()


class RequestIdMiddleware:
    """Adopts a sane client `X-Request-Id` or makes one; echoes it on the response.

    Also the last line of defence: an unexpected exception becomes a 500 in the
    surface's envelope here, inside the request id, never a traceback. A client that
    left mid-body gets nothing: it is gone.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Only HTTP runs inside a frame of this middleware. The others get the app's
        # own coroutine: a WebSocket lives for hours, and every frame it keeps open
        # is memory per socket.
        if scope["type"] == "websocket":
            scope.setdefault("state", {})["request_id"] = _request_id(scope)
        if scope["type"] != "http":
            return self.app(scope, receive, send)
        return self._http(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message)["X-Request-Id"] = request_id
            await send(message)

        if "\x00" in scope["path"] or b"%00" in scope.get("query_string", b""):
            # No id, name or filter holds a NUL; PostgreSQL would refuse it as a 500.
            refusal = BadRequest("the URL contains a NUL character")
            await error_response(scope["method"], scope["path"], refusal)(
                scope, receive, send_with_id
            )
            return
        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            # The client left before its body was read: a client's choice, not a fault
            # of ours, and there is nobody to answer.
            logger.debug("client left mid-body on %s %s", scope["method"], scope["path"])
        except Exception:
            logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            error = ApiError("internal server error")
            response = error_response(scope["method"], scope["path"], error)
            await response(scope, receive, send_with_id)


# Paths never rate limited: signed webhooks, health checks, the demo page.
_UNLIMITED_PATHS = frozenset({"/api/subscription/webhook", "/api/health", "/demo"})
_UNLIMITED_PREFIXES = ("/api/auth/webhook/", "/demo/")


class RateLimitMiddleware:
    """The tier's request rate on every HTTP call: per user, or per client IP if anonymous.

    Every response carries `X-RateLimit-*` and the IETF `RateLimit` / `RateLimit-Policy`
    fields; `/api/v1` also `X-RateLimit-Endpoint` and `X-RateLimit-Identifier`, and its
    reset as an ISO time as the Playground spec shows (elsewhere epoch seconds).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        path = scope.get("path", "")
        if (
            scope["type"] != "http"
            or scope["method"] == "OPTIONS"
            or path in _UNLIMITED_PATHS
            or path.startswith(_UNLIMITED_PREFIXES)
        ):
            return self.app(scope, receive, send)  # no frame of ours (see RequestIdMiddleware)
        return self._limited(scope, receive, send)

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        request = Request(scope, receive)
        svc = services(request)
        try:
            principal = await resolve_principal(request)
        except ApiError:
            principal = None  # the route answers 401; the caller counts as anonymous
        if principal is not None:
            caller, identifier, tier = f"user:{principal.user.id}", "user", principal.user.tier
        else:
            caller = f"ip:{client_ip(request)}"
            identifier, tier = "ip", svc.settings.anonymous_tier
        surface = surface_for(scope["method"], path)
        decision = await svc.policy.check_rate(caller, tier, surface.value)
        if decision is None:
            await self.app(scope, receive, send)
            return
        headers = _rate_headers(decision, surface, path, identifier)
        if not decision.allowed:
            retry = str(decision.retry_after_seconds)
            error = RateLimited(
                "Too many requests",
                headers={**headers, "Retry-After": retry},
                details={"retryAfter": int(retry)},
            )
            await error_response(scope["method"], path, error)(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                response_headers = MutableHeaders(scope=message)
                for name, value in headers.items():
                    # A route's own limit headers (Navi's daily messages) say more.
                    if name not in response_headers:
                        response_headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _rate_headers(
    decision: Decision, surface: Surface, path: str, identifier: str
) -> dict[str, str]:
    reset_at = time.time() + decision.reset_after
    reset_seconds = max(0, math.ceil(decision.reset_after))
    headers = {
        "X-RateLimit-Limit": str(decision.limit),
        "X-RateLimit-Remaining": str(decision.remaining),
        "X-RateLimit-Reset": str(math.ceil(reset_at)),
        "RateLimit-Policy": f'"tier";q={decision.limit};w={math.ceil(decision.window)}',
        "RateLimit": f'"tier";r={decision.remaining};t={reset_seconds}',
    }
    if surface is Surface.PLAYGROUND:
        headers["X-RateLimit-Reset"] = iso_millis(datetime.fromtimestamp(reset_at, UTC))
        headers["X-RateLimit-Endpoint"] = path.removeprefix("/api/v1/").split("/", 1)[0] or "api"
        headers["X-RateLimit-Identifier"] = identifier
    return headers


# The AnkiLingoFlash routes, which its spec opens to every origin.
_OPEN_CORS_PATHS = frozenset(
    {
        "/api/chat",
        "/api/models",
        "/api/limits",
        "/api/generate-flashcard",
        "/api/increment-flashcard-count",
        "/api/check-connectivity",
    }
)
_OPEN_PREFLIGHT = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type, Authorization",
    "Access-Control-Max-Age": "86400",
}


def _open_cors(path: str) -> bool:
    return path in _OPEN_CORS_PATHS or path.startswith("/api/user-data/")


class CorsMiddleware:
    """CORS by surface: AnkiLingoFlash's routes answer every origin with exactly the
    headers its spec documents; every other route only the configured origins
    (Starlette's `CORSMiddleware`), none by default."""

    def __init__(self, app: ASGIApp, allow_origins: list[str]) -> None:
        self.app = app
        self.listed: ASGIApp = (
            CORSMiddleware(
                app,
                allow_origins=allow_origins,
                allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
                allow_headers=[
                    "Authorization",
                    "Content-Type",
                    "X-API-Key",
                    "X-Device-Id",
                    "X-Platform",
                    "X-Request-Id",
                ],
                expose_headers=[
                    "X-Request-Id",
                    "X-RateLimit-Limit",
                    "X-RateLimit-Remaining",
                    "X-RateLimit-Reset",
                    "Retry-After",
                ],
                allow_credentials=True,
                max_age=600,
            )
            if allow_origins
            else app
        )

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] != "http" or not _open_cors(scope["path"]):
            return self.listed(scope, receive, send)  # no frame of ours (see RequestIdMiddleware)
        return self._open(scope, receive, send)

    async def _open(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "OPTIONS":
            response = Response(status_code=204, headers=_OPEN_PREFLIGHT)
            await response(scope, receive, send)
            return

        async def send_open(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["Access-Control-Allow-Origin"] = "*"
            await send(message)

        await self.app(scope, receive, send_open)
