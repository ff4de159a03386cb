"""The ASGI application."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles

from app.api.envelopes import error_response
from app.api.middleware import CorsMiddleware, RateLimitMiddleware, RequestIdMiddleware
from app.api.routes import (
    admin,
    ai,
    anki,
    api_keys,
    auth,
    chat,
    navi,
    openai,
    quota_ws,
    subscription,
    usage,
    users,
    webhooks,
)
from app.core.config import Settings, load_settings
from app.core.errors import ApiError, MethodNotAllowed, NotFound
from app.core.services import open_services

# The demo page; present in a source checkout and in the container image.
STATIC_DIR = Path("static")


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(request.method, request.url.path, exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error: ApiError
    if exc.status_code == 404:
        error = NotFound(f"no route for {request.method} {request.url.path}")
    elif exc.status_code == 405:
        error = MethodNotAllowed(f"method {request.method} not allowed here")
    else:
        error = ApiError(str(exc.detail), status_code=exc.status_code)
    error.headers.update(exc.headers or {})
    return error_response(request.method, request.url.path, error)


# The collector of a server process of its own (see `create_app`). Python's default
# (700, 10, 10) collects so often under load that objects of requests in flight reach
# the oldest generation, whose collections then paused the event loop for 100-250 ms
# every few seconds (300 streams + 600 sockets: quota push p99 ~1 s -> ~0.3 s).
SERVER_GC_THRESHOLDS = (10_000, 20, 50)


def create_app(
    settings: Settings | None = None, *, tune_gc: bool = False, run_migrations: bool = True
) -> Starlette:
    """The application. With `tune_gc` (a server process of its own), what start-up
    allocated is moved out of the collector's sight once it is done (it lives as long
    as the process) and the collector runs less often (`SERVER_GC_THRESHOLDS`).
    Without `run_migrations`, the schema must already be up to date."""
    settings = settings or load_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with open_services(settings, run_migrations=run_migrations) as services:
            app.state.services = services
            if tune_gc:
                gc.collect()
                gc.freeze()
                gc.set_threshold(*SERVER_GC_THRESHOLDS)
            yield

    routes: list[BaseRoute] = [
        *openai.routes,
        *auth.routes,
        *api_keys.routes,
        *admin.routes,
        *users.routes,
        *usage.routes,
        *quota_ws.routes,
        *chat.routes,
        *navi.routes,
        *subscription.routes,
        *anki.routes,
        *ai.routes,
        *webhooks.routes,
    ]
    if STATIC_DIR.is_dir():
        routes.append(Mount("/demo", StaticFiles(directory=STATIC_DIR, html=True), name="demo"))
    return Starlette(
        routes=routes,
        middleware=[
            Middleware(RequestIdMiddleware),
            Middleware(CorsMiddleware, allow_origins=settings.server.cors_origins),
            Middleware(RateLimitMiddleware),
        ],
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
        },
        lifespan=lifespan,
    )
