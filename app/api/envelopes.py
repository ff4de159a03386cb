"""Each surface's error envelope, chosen by path, so one core error fits every client."""

from __future__ import annotations

import enum
from typing import Any

from starlette.responses import JSONResponse

from app.core.errors import ApiError


class Surface(enum.Enum):
    OPENAI = "openai"  # /v1/*: {"error": {"message", "type", "param", "code"}}
    SOKUJI = "sokuji"  # /api/*, /ws/*: {"error": "...", "details": {...}}


def surface_for(path: str) -> Surface:
    return Surface.OPENAI if path == "/v1" or path.startswith("/v1/") else Surface.SOKUJI


def error_body(surface: Surface, exc: ApiError) -> dict[str, Any]:
    if surface is Surface.OPENAI:
        param = (exc.details or {}).get("param")
        return {
            "error": {
                "message": exc.message,
                "type": exc.openai_type,
                "param": param,
                "code": exc.code,
            }
        }
    body: dict[str, Any] = {"error": exc.message}
    if exc.status_code == 429 and "Retry-After" in exc.headers:
        body["retryAfter"] = int(exc.headers["Retry-After"])
    body["details"] = {"code": exc.code, **(exc.details or {})}
    return body


def error_response(path: str, exc: ApiError) -> JSONResponse:
    return JSONResponse(
        error_body(surface_for(path), exc), status_code=exc.status_code, headers=exc.headers
    )
