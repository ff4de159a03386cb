"""Each surface's error envelope, so one core error reaches every client in its shape.

The surface is chosen by method and path (longest prefix first); where two specs
share a path, the route that tells them apart by body passes its own surface.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from starlette.responses import JSONResponse, PlainTextResponse, Response

from app.api.responses import iso_millis
from app.core.errors import ApiError


class Surface(enum.StrEnum):
    OPENAI = "openai"  # {"error": {"message", "type", "param", "code"}}
    SOKUJI = "sokuji"  # {"error": "...", "details": {...}}
    PLAYGROUND = "playground"  # {"success": false, "error": {"message", "code", "details"}, ...}
    NAVI = "navi"  # {"success": false, "error": {"code", "message", ...}}
    ANKI = "anki"  # {"error": "..."}


_EXACT: dict[str, Surface] = {
    "/api/chat": Surface.NAVI,  # the Anki passthrough renders its own errors
    "/api/user": Surface.NAVI,
    "/api/models": Surface.ANKI,
    "/api/limits": Surface.ANKI,
    "/api/generate-flashcard": Surface.ANKI,
    "/api/increment-flashcard-count": Surface.ANKI,
    "/api/check-connectivity": Surface.ANKI,
    "/oauth-redirect": Surface.ANKI,  # its errors are plain text (see `error_response`)
}

# (method or None for any, path prefix, surface); the first match wins.
_ROUTES: tuple[tuple[str | None, str, Surface], ...] = (
    (None, "/v1/", Surface.OPENAI),
    (None, "/api/v1/", Surface.PLAYGROUND),
    (None, "/api/auth/refresh", Surface.NAVI),
    (None, "/api/auth/callback", Surface.NAVI),
    ("GET", "/api/auth/login", Surface.NAVI),
    (None, "/api/auth/webhook/", Surface.SOKUJI),
    (None, "/api/auth/", Surface.PLAYGROUND),
    (None, "/api/admin/", Surface.PLAYGROUND),
    (None, "/api/conversations", Surface.NAVI),
    (None, "/api/messages", Surface.NAVI),
    (None, "/api/health", Surface.NAVI),
    (None, "/api/subscription", Surface.NAVI),
    (None, "/api/user-data/", Surface.ANKI),
)


def surface_for(method: str, path: str) -> Surface:
    if path == "/v1":
        return Surface.OPENAI
    if path in _EXACT:
        return _EXACT[path]
    for route_method, prefix, surface in _ROUTES:
        if (route_method is None or route_method == method) and path.startswith(prefix):
            return surface
    return Surface.SOKUJI


_PLAYGROUND_CODES = {
    400: "VALIDATION_ERROR",
    401: "AUTHENTICATION_ERROR",
    402: "QUOTA_EXCEEDED",
    403: "AUTHORIZATION_ERROR",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    429: "RATE_LIMIT_EXCEEDED",
    502: "SERVICE_UNAVAILABLE",
    503: "SERVICE_UNAVAILABLE",
    504: "SERVICE_UNAVAILABLE",
}

_NAVI_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    402: "QUOTA_EXCEEDED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    429: "RATE_LIMITED",
    502: "UPSTREAM_ERROR",
    503: "SERVICE_UNAVAILABLE",
    504: "UPSTREAM_TIMEOUT",
}


def error_body(surface: Surface, exc: ApiError) -> dict[str, Any]:
    details = exc.details or {}
    if surface is Surface.OPENAI:
        return {
            "error": {
                "message": exc.message,
                "type": exc.openai_type,
                "param": details.get("param"),
                "code": exc.code,
            }
        }
    if surface is Surface.PLAYGROUND:
        return {
            "success": False,
            "error": {
                "message": exc.message,
                "code": _PLAYGROUND_CODES.get(exc.status_code, "SERVER_ERROR"),
                "details": {"reason": exc.code, **details},
            },
            "timestamp": iso_millis(datetime.now(UTC)),
        }
    if surface is Surface.NAVI:
        code = _NAVI_CODES.get(exc.status_code, "INTERNAL_ERROR")
        if exc.code == "daily_limit_reached":
            code = "DAILY_LIMIT_REACHED"
        return {
            "success": False,
            "error": {
                "code": code,
                "message": exc.message,
                **details,
            },
        }
    if surface is Surface.ANKI:
        return {"error": exc.message}
    body: dict[str, Any] = {"error": exc.message}
    if exc.status_code == 429 and "Retry-After" in exc.headers:
        body["retryAfter"] = int(exc.headers["Retry-After"])
    body["details"] = {"code": exc.code, **details}
    return body


# A page a browser opens, not an API: its spec's one error is this text.
OAUTH_PAGE = "/oauth-redirect"
OAUTH_PAGE_FAILURE = "Authentication failed"


def error_response(method: str, path: str, exc: ApiError) -> Response:
    if path == OAUTH_PAGE:
        text = OAUTH_PAGE_FAILURE if exc.status_code == 400 else exc.message
        return PlainTextResponse(text, status_code=exc.status_code, headers=exc.headers)
    return surface_error(surface_for(method, path), exc)


def surface_error(surface: Surface, exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(surface, exc), status_code=exc.status_code, headers=exc.headers)
