"""AnkiLingoFlash's routes (its `/api/chat` passthrough lives in `chat`).

The spec has no authentication. Here the caller must prove it is the `userId` it
names, unless `[anki] open_mode = true` restores the spec's open behaviour.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from app.api.envelopes import OAUTH_PAGE_FAILURE
from app.api.requests import read_json_object, resolve_principal, services
from app.core import anki
from app.core.anki import AnkiCaller, AnkiUser, ProfileChanges
from app.core.errors import BadRequest


def _user_shape(user: AnkiUser) -> dict[str, Any]:
    return {
        "userId": user.user_id,
        "userName": user.user_name,
        "userEmail": user.user_email,
        "flashcardCount": user.flashcard_count,
        "freeGenerationLimit": user.generation_limit,
        "regenerationLimit": user.regeneration_limit,
    }


async def _acting_for(request: Request, user_id: object, permission: str) -> AnkiCaller:
    """The caller, proven to be `user_id`; an API key must hold `permission`: reading
    the user's record and allowance is `usage:read`, changing them `ai:write`."""
    svc = services(request)
    checked = anki.validate_user_id(user_id)
    principal = await resolve_principal(request)
    return await svc.anki.authorize(
        principal, checked, svc.settings.server.default_tier, permission
    )


async def models(request: Request) -> Response:
    names = [m.name for m in services(request).router.catalogue()]
    return JSONResponse({"result": names, "error": None})


async def limits(request: Request) -> Response:
    generation, regeneration = await services(request).anki.limits(
        services(request).settings.server.default_tier
    )
    return JSONResponse({"freeGenerationLimit": generation, "regenerationLimit": regeneration})


async def get_user_data(request: Request) -> Response:
    caller = await _acting_for(request, request.path_params["user_id"], "usage:read")
    return JSONResponse(_user_shape(await services(request).anki.user(caller)))


async def save_user_data(request: Request) -> Response:
    caller = await _acting_for(request, request.path_params["user_id"], "ai:write")
    body = await read_json_object(request)
    if body.get("userId", caller.user_id) != caller.user_id:
        raise BadRequest("Invalid user ID")
    # Only the fields sent change, so a client may save its name alone without
    # erasing the address; null clears a field, as a new record starts with both null.
    changes: ProfileChanges = {}
    if "userName" in body:
        changes["user_name"] = anki.validate_user_name(body["userName"])
    if "userEmail" in body:
        changes["user_email"] = anki.validate_user_email(body["userEmail"])
    saved = await services(request).anki.save_user(caller, changes)
    return JSONResponse(_user_shape(saved))


async def generate_flashcard(request: Request) -> Response:
    body = await read_json_object(request)
    caller = await _acting_for(request, body.get("userId"), "usage:read")
    own_credits = body.get("isOwnCredits", False)
    if not isinstance(own_credits, bool):
        return JSONResponse({"error": "isOwnCredits must be a boolean"}, status_code=400)
    if await services(request).anki.can_generate(caller, own_credits):
        return JSONResponse({"canGenerate": True})
    return JSONResponse({"canGenerate": False, "reason": "LIMIT_REACHED"})


async def increment_flashcard_count(request: Request) -> Response:
    body = await read_json_object(request)
    caller = await _acting_for(request, body.get("userId"), "ai:write")
    counted = await services(request).anki.count_generation(caller)
    if counted is None:
        return JSONResponse({"canGenerate": False, "reason": "LIMIT_REACHED"}, status_code=429)
    return JSONResponse(
        {"success": True, "newCount": counted.used, "remainingCards": counted.remaining}
    )


async def check_connectivity(request: Request) -> Response:
    return JSONResponse({"status": "online"})


# The token normally arrives in the URL fragment, which never reaches the server: the
# page reads it in the browser. A token given as a query parameter, and the opener
# origins, are written into the page as JSON literals with <, > and & escaped, so they
# cannot end the script.
_OAUTH_PAGE = """<!doctype html>
<html>
    <body>
        <script>
            const params = new URLSearchParams(window.location.hash.slice(1));
            const token = __SERVER_TOKEN__ || params.get("access_token");
            if (!token) {
                document.body.textContent = "Authentication failed";
            } else if (window.opener) {
                // The browser hands the message over only where the opener's origin
                // is the one named: the token goes to no page it was not meant for.
                for (const origin of __OPENER_ORIGINS__) {
                    window.opener.postMessage({token: token}, origin);
                }
                window.close();
            } else if (typeof browser !== "undefined" && browser.runtime) {
                // For Firefox, we need to use browser.runtime.sendMessage
                browser.runtime.sendMessage({action: "auth_success", token: token});
                window.close();
            } else {
                document.body.textContent = "Authentication failed";
            }
        </script>
    </body>
</html>
"""


def _script_literal(value: object) -> str:
    return (
        json.dumps(value)
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


async def oauth_redirect(request: Request) -> Response:
    if request.query_params.get("error"):
        return Response(OAUTH_PAGE_FAILURE, status_code=400, media_type="text/plain")
    token = request.query_params.get("access_token")
    if token is not None and (not token or len(token) > 4096):
        return Response(OAUTH_PAGE_FAILURE, status_code=400, media_type="text/plain")
    origins = services(request).settings.anki.opener_origins or ["*"]
    page = _OAUTH_PAGE.replace(
        "__SERVER_TOKEN__", _script_literal(token) if token else "null"
    ).replace("__OPENER_ORIGINS__", _script_literal(origins))
    return HTMLResponse(
        page,
        headers={
            "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
        },
    )


routes = [
    Route("/api/models", models, methods=["GET"]),
    Route("/api/limits", limits, methods=["GET"]),
    Route("/api/user-data/{user_id}", get_user_data, methods=["GET"]),
    Route("/api/user-data/{user_id}", save_user_data, methods=["POST"]),
    Route("/api/generate-flashcard", generate_flashcard, methods=["POST"]),
    Route("/api/increment-flashcard-count", increment_flashcard_count, methods=["POST"]),
    Route("/api/check-connectivity", check_connectivity, methods=["GET"]),
    Route("/oauth-redirect", oauth_redirect, methods=["GET"]),
]
