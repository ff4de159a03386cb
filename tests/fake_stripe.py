"""A small Stripe API that tests start on loopback: customers, Checkout and portal sessions.

It reads form-encoded bodies as Stripe's API does (`line_items[0][price]=...`), checks
the secret key, honours `Idempotency-Key` (the same key answers the same object), and
records every call, and every object it made, so tests can assert what Livegate sent
and what it caused. `status` makes every call fail with Stripe's error shape instead.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fake_upstream import LoopbackServer


@dataclass
class StripeCall:
    path: str
    form: dict[str, str]  # the fields as sent, e.g. {"line_items[0][price]": "price_..."}
    headers: dict[str, str]


@dataclass
class FakeStripe:
    secret_key: str
    calls: list[StripeCall] = field(default_factory=list)
    made: list[dict[str, Any]] = field(default_factory=list)  # a replayed key makes none
    status: int = 200  # anything else: every call fails with this status
    port: int = 0
    _replies: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def calls_to(self, path: str) -> list[StripeCall]:
        return [c for c in self.calls if c.path == path]

    def made_of(self, kind: str) -> list[dict[str, Any]]:
        """The objects of one kind ("customer", "checkout.session", ...) made so far."""
        return [o for o in self.made if o["object"] == kind]

    async def customers(self, request: Request) -> Response:
        return await self._answer(
            request,
            lambda form: {
                "id": f"cus_{uuid.uuid4().hex[:14]}",
                "object": "customer",
                "email": form.get("email"),
                "metadata": _metadata(form),
            },
        )

    async def checkout_sessions(self, request: Request) -> Response:
        def session(form: dict[str, str]) -> dict[str, Any]:
            session_id = f"cs_test_{uuid.uuid4().hex}"
            return {
                "id": session_id,
                "object": "checkout.session",
                "mode": form.get("mode"),
                "customer": form.get("customer"),
                "client_reference_id": form.get("client_reference_id"),
                "metadata": _metadata(form),
                "status": "open",
                "url": f"https://checkout.stripe.test/c/pay/{session_id}",
            }

        return await self._answer(request, session)

    async def portal_sessions(self, request: Request) -> Response:
        def session(form: dict[str, str]) -> dict[str, Any]:
            session_id = f"bps_{uuid.uuid4().hex[:24]}"
            return {
                "id": session_id,
                "object": "billing_portal.session",
                "customer": form.get("customer"),
                "return_url": form.get("return_url"),
                "url": f"https://billing.stripe.test/p/session/{session_id}",
            }

        return await self._answer(request, session)

    async def _answer(
        self, request: Request, make: Callable[[dict[str, str]], dict[str, Any]]
    ) -> Response:
        body = (await request.body()).decode()
        form = dict(parse_qsl(body, keep_blank_values=True))
        self.calls.append(StripeCall(request.url.path, form, dict(request.headers)))
        if request.headers.get("authorization") != f"Bearer {self.secret_key}":
            return _error(401, "invalid_request_error", "Invalid API Key provided")
        if self.status != 200:
            response = _error(self.status, "api_error", f"scripted failure {self.status}")
            response.headers["Stripe-Should-Retry"] = "false"  # keep tests fast
            return response
        key = request.headers.get("idempotency-key")
        if key and key in self._replies:
            return JSONResponse(self._replies[key], headers={"Idempotent-Replayed": "true"})
        reply: dict[str, Any] = make(form)
        self.made.append(reply)
        if key:
            self._replies[key] = reply
        return JSONResponse(reply, headers={"Request-Id": f"req_{uuid.uuid4().hex[:14]}"})


def _metadata(form: dict[str, str]) -> dict[str, str]:
    return {k[len("metadata[") : -1]: v for k, v in form.items() if k.startswith("metadata[")}


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status)


async def start_fake_stripe(secret_key: str) -> tuple[FakeStripe, LoopbackServer]:
    fake = FakeStripe(secret_key)
    app = Starlette(
        routes=[
            Route("/v1/customers", fake.customers, methods=["POST"]),
            Route("/v1/checkout/sessions", fake.checkout_sessions, methods=["POST"]),
            Route("/v1/billing_portal/sessions", fake.portal_sessions, methods=["POST"]),
        ]
    )
    server = LoopbackServer(app)
    fake.port = server.port
    await server.start()
    return fake, server
