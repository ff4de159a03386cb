"""Sokuji's `/api/usage/quota`: the token quota, computed from the metered counter."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.api.requests import require_principal, services


async def quota(request: Request) -> JSONResponse:
    user = (await require_principal(request, "usage:read")).user
    snapshot = await services(request).token_quota(user)
    return JSONResponse(snapshot.as_dict())


routes = [Route("/api/usage/quota", quota, methods=["GET"])]
