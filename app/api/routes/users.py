"""Sokuji's user routes: `/api/user/profile` and `/api/user/api-key`."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.api.requests import require_principal, services
from app.core.quota import iso_z
from app.core.users import get_or_create_relay_key

# Sokuji clients select their relay provider config by this name.
RELAY_PROVIDER = "kizunaai"


async def profile(request: Request) -> JSONResponse:
    user = (await require_principal(request, "usage:read")).user
    quota = await services(request).token_quota(user)
    return JSONResponse(
        {
            "user": {
                "id": user.id,
                "email": user.email,
                "firstName": user.first_name,
                "lastName": user.last_name,
                "imageUrl": user.image_url,
                "subscription": user.tier,
                "createdAt": iso_z(user.created_at),
                "updatedAt": iso_z(user.updated_at),
            },
            "quota": quota.as_dict(),
        }
    )


async def api_key(request: Request) -> JSONResponse:
    user = (await require_principal(request, session_only=True)).user
    svc = services(request)
    key = await get_or_create_relay_key(svc.engine, svc.secrets, user.id)
    return JSONResponse({"apiKey": key, "provider": RELAY_PROVIDER})


routes = [
    Route("/api/user/profile", profile, methods=["GET"]),
    Route("/api/user/api-key", api_key, methods=["GET"]),
]
