"""Reading what a request carries: its JSON body, its caller, its device."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from starlette.requests import HTTPConnection, Request

from app.core.auth import Principal
from app.core.errors import ApiError, BadRequest, PayloadTooLarge, Unauthorized
from app.core.relay import RequestContext
from app.core.services import Services
from app.core.strict_json import parse_json

_HEADER_VALUE = re.compile(r"^[\x21-\x7e]+\Z")
_NOT_RESOLVED = object()


def services(conn: HTTPConnection) -> Services:
    return conn.app.state.services  # type: ignore[no-any-return]


async def read_json(request: Request) -> Any:
    """The body as JSON, refused with a 4xx if it is too large, not JSON, or not UTF-8."""
    return json_of(await read_body(request))


def json_of(body: bytes) -> Any:
    """A request body read as JSON (see `read_json`)."""
    if not body:
        raise BadRequest("request body is empty; a JSON object is expected")
    return parse_json(body)


async def read_body(request: Request) -> bytes:
    """The raw body, refused with 413 past the configured size."""
    limit = services(request).settings.server.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body exceeds {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
    return bytes(body)


async def read_json_object(request: Request) -> dict[str, Any]:
    payload = await read_json(request)
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    return payload


def credential(conn: HTTPConnection, *, allow_query: bool = False) -> str | None:
    """A bearer token or API key: `Authorization: Bearer`, `X-API-Key`, or `?token=`."""
    header = conn.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    api_key = conn.headers.get("x-api-key")
    if api_key:
        return api_key.strip()
    if allow_query:
        return conn.query_params.get("token") or None
    return None


async def resolve_principal(conn: HTTPConnection, *, allow_query: bool = False) -> Principal | None:
    """The caller, or None if anonymous; raises `Unauthorized` for a bad credential.

    Resolved once per request: the rate limiter and the route share the answer.
    """
    state = conn.scope.setdefault("state", {})
    cached = state.get("principal", _NOT_RESOLVED)
    if isinstance(cached, ApiError):
        raise cached
    if cached is not _NOT_RESOLVED:
        return cached  # type: ignore[no-any-return]
    svc = services(conn)
    try:
        token = credential(conn, allow_query=allow_query)
        principal: Principal | None
        if token is not None:
            principal = await svc.authenticator.authenticate(token)
        elif dev_user := conn.headers.get("x-user-id"):
            principal = await svc.authenticator.development_user(dev_user)
        else:
            principal = None
    except ApiError as exc:
        state["principal"] = exc
        raise
    state["principal"] = principal
    return principal


async def require_principal(
    conn: HTTPConnection,
    permission: str | None = None,
    *,
    allow_query: bool = False,
    session_only: bool = False,
) -> Principal:
    principal = await resolve_principal(conn, allow_query=allow_query)
    if principal is None:
        raise Unauthorized("missing bearer token or API key", code="missing_token")
    if session_only and not principal.is_session:
        raise Unauthorized(
            "this route needs a user session token, not an API key", code="session_required"
        )
    if permission is not None:
        principal.require(permission)
    return principal


def client_ip(conn: HTTPConnection) -> str:
    """The client's address; `X-Forwarded-For` is believed only from trusted proxies."""
    peer = conn.client.host if conn.client else "unknown"
    trusted = services(conn).settings.server.trusted_proxy_networks
    nearest = _address(peer) if trusted else None
    if nearest is None or not _in_networks(nearest, trusted):
        return peer
    forwarded = conn.headers.get("x-forwarded-for", "")
    # Walk from the nearest hop back; the first untrusted address is the client. A hop
    # that is no address ends the walk at the last trusted one: nothing before it can
    # be believed, and it must not become a counter's subject.
    for hop in reversed([h.strip() for h in forwarded.split(",") if h.strip()]):
        address = _address(hop)
        if address is None:
            break
        if not _in_networks(address, trusted):
            return str(address)
        nearest = address
    return str(nearest)


def _address(hop: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address in a forwarded hop (a port, as some proxies add, is dropped), in
    one spelling per address: an IPv4-mapped IPv6 address is the IPv4 one, and a zone
    is dropped."""
    if hop.startswith("["):  # [2001:db8::1]:443
        hop = hop[1 : hop.find("]")] if "]" in hop else hop
    elif hop.count(":") == 1:  # 192.0.2.1:443
        hop = hop.partition(":")[0]
    try:
        address = ipaddress.ip_address(hop)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id is not None:
            return ipaddress.IPv6Address(int(address))
    return address


def _in_networks(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
) -> bool:
    return any(address in network for network in networks)


def _optional_header(request: Request, name: str, longest: int) -> str | None:
    """A header stored with the usage row: up to `longest` (its column's length)."""
    value = request.headers.get(name)
    if value is None or value == "":
        return None
    if len(value) > longest or not _HEADER_VALUE.match(value):
        raise BadRequest(f"{name} must be 1-{longest} visible ASCII characters")
    return value


def request_context(request: Request) -> RequestContext:
    return RequestContext(
        request_id=request.state.request_id,
        device_id=_optional_header(request, "x-device-id", 128),
        platform=_optional_header(request, "x-platform", 64),
    )
