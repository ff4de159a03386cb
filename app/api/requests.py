"""Reading what a request carries: its JSON body, its credential, its device."""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.requests import HTTPConnection, Request

from app.core.errors import BadRequest, PayloadTooLarge, Unauthorized
from app.core.relay import RequestContext
from app.core.services import Services
from app.core.users import Principal, authenticate

_HEADER_VALUE = re.compile(r"^[\x21-\x7e]{1,128}$")


def services(conn: HTTPConnection) -> Services:
    return conn.app.state.services  # type: ignore[no-any-return]


async def read_json(request: Request) -> Any:
    """The body as JSON, refused with a 4xx if it is too large, not JSON, or not UTF-8."""
    limit = services(request).settings.server.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body exceeds {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
    if not body:
        raise BadRequest("request body is empty; a JSON object is expected")
    try:
        return json.loads(body)
    except UnicodeDecodeError as exc:
        raise BadRequest("request body is not valid UTF-8") from exc
    except ValueError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc


def bearer_credential(conn: HTTPConnection, *, allow_query: bool = False) -> str | None:
    header = conn.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    if allow_query:
        return conn.query_params.get("token") or None
    return None


async def require_principal(conn: HTTPConnection, *, allow_query: bool = False) -> Principal:
    credential = bearer_credential(conn, allow_query=allow_query)
    if credential is None:
        raise Unauthorized("missing bearer token", code="missing_token")
    svc = services(conn)
    return await authenticate(svc.engine, svc.secrets, credential)


def _optional_header(request: Request, name: str) -> str | None:
    value = request.headers.get(name)
    if value is None or value == "":
        return None
    if not _HEADER_VALUE.match(value):
        raise BadRequest(f"{name} must be 1-128 visible ASCII characters")
    return value


def request_context(request: Request) -> RequestContext:
    return RequestContext(
        request_id=request.state.request_id,
        device_id=_optional_header(request, "x-device-id"),
        platform=_optional_header(request, "x-platform"),
    )
