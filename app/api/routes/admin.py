"""Administration: moving users between tiers and roles."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.api.requests import read_json_object, require_principal, services
from app.api.responses import iso_millis, playground_ok
from app.core import accounts
from app.core.errors import BadRequest, Forbidden
from app.core.users import ROLES


async def update_user(request: Request) -> Response:
    """`PATCH /api/admin/users/{user_id}` with `tier` (admins) and/or `role` (super admins)."""
    principal = await require_principal(request, session_only=True)
    if principal.user.role not in ("admin", "super_admin"):
        raise Forbidden("administrators only")
    body = await read_json_object(request)
    tier, role = body.get("tier"), body.get("role")
    svc = services(request)
    if tier is None and role is None:
        raise BadRequest("nothing to update: give `tier` and/or `role`")
    if tier is not None and (not isinstance(tier, str) or tier not in svc.settings.tiers):
        raise BadRequest(
            f"unknown tier; configured: {', '.join(svc.settings.tiers)}", details={"field": "tier"}
        )
    if role is not None and role not in ROLES:
        raise BadRequest(f"role must be one of {', '.join(ROLES)}", details={"field": "role"})
    if role is not None and principal.user.role != "super_admin":
        raise Forbidden("only super administrators change roles")
    user = await accounts.update_user_admin(
        svc.engine,
        svc.publisher,
        request.path_params["user_id"],
        tier=tier,
        role=role,
        token_limit=svc.settings.tier(tier).monthly_tokens if tier else None,
    )
    return playground_ok(
        {
            "user": {
                "id": user.id,
                "email": user.email,
                "tier": user.tier,
                "role": user.role,
                "updated_at": iso_millis(user.updated_at),
            }
        },
        "User updated successfully",
    )


routes = [Route("/api/admin/users/{user_id}", update_user, methods=["PATCH"])]
