"""Navi's Stripe subscription: `/api/subscription`, checkout, portal, Stripe's webhook."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app.api.requests import read_body, require_principal, services
from app.core import billing
from app.core.quota import iso_z


async def get_subscription(request: Request) -> Response:
    principal = await require_principal(request)
    view = await billing.subscription_for(services(request).engine, principal.user)
    return JSONResponse(
        {
            "success": True,
            "subscription": {
                "tier": view.tier,
                "status": view.status,
                "periodEnd": iso_z(view.period_end) if view.period_end else None,
            },
        }
    )


async def checkout(request: Request) -> Response:
    # A user session only: an API key must not open billing pages for its owner.
    principal = await require_principal(request, session_only=True)
    url = await billing.require(services(request).billing).checkout(principal.user)
    return JSONResponse({"success": True, "url": url})


async def portal(request: Request) -> Response:
    principal = await require_principal(request, session_only=True)
    url = await billing.require(services(request).billing).portal(principal.user)
    return JSONResponse({"success": True, "url": url})


async def webhook(request: Request) -> Response:
    handler = billing.require(services(request).billing)
    body = await read_body(request)
    outcome = await handler.handle_webhook(body, request.headers.get("stripe-signature"))
    return JSONResponse({"success": True, "received": True, "outcome": outcome.value})


routes = [
    Route("/api/subscription", get_subscription, methods=["GET"]),
    Route("/api/subscription/checkout", checkout, methods=["POST"]),
    Route("/api/subscription/portal", portal, methods=["POST"]),
    Route("/api/subscription/webhook", webhook, methods=["POST"]),
]
