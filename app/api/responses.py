"""Success shapes shared by routes of one surface."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from starlette.responses import JSONResponse


def iso_millis(at: datetime) -> str:
    """`2025-11-11T22:00:00.000Z`, the Playground's timestamps."""
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def playground_ok(
    data: dict[str, Any] | None = None, message: str | None = None, status_code: int = 200
) -> JSONResponse:
    body: dict[str, Any] = {"success": True}
    if data is not None:
        body["data"] = data
    if message is not None:
        body["message"] = message
    body["timestamp"] = iso_millis(datetime.now(UTC))
    return JSONResponse(body, status_code=status_code)
