"""The OAuth 2 authorization-code flow with PKCE behind Navi's login.

`start` remembers a random `state` with its PKCE verifier and the app URL to return
to (only allow-listed ones), and sends the browser to the provider. `finish` takes
the state back once (a replay finds nothing), exchanges the code with the verifier,
reads the user from the provider's userinfo, and returns the app URL carrying our own
session tokens, or the error URL. States live in SQL, so any instance can finish a
login another one started.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from app.core.auth import MAX_SUBJECT, Authenticator
from app.core.config import OAuthConfig
from app.core.errors import ApiError, BadRequest
from app.core.sessions import Sessions
from app.core.strict_json import parse_json
from app.core.tables import oauth_states
from app.core.upstream_transport import send_bounded

logger = logging.getLogger("livegate.oauth")
STATE_LIFETIME = timedelta(minutes=10)


class OAuthFlow:
    def __init__(
        self,
        config: OAuthConfig,
        engine: AsyncEngine,
        http: httpx.AsyncClient,
        sessions: Sessions,
        authenticator: Authenticator,
    ) -> None:
        self._config = config
        self._engine = engine
        self._http = http
        self._sessions = sessions
        self._authenticator = authenticator

    async def start(self, app_redirect: str | None, request_callback_url: str) -> str:
        """The provider's authorization URL for a new login."""
        # Imported on first use: only servers with `[oauth]` configured log in this way.
        from authlib.common.security import generate_token
        from authlib.oauth2.rfc6749.parameters import prepare_grant_uri
        from authlib.oauth2.rfc7636 import create_s256_code_challenge

        target = app_redirect or self._config.app_redirects[0]
        if target not in self._config.app_redirects:
            raise BadRequest("redirect is not an allowed app URL", details={"field": "redirect"})
        verifier, state = generate_token(64), generate_token(32)
        callback_url = self._config.callback_url or request_callback_url
        url = prepare_grant_uri(
            self._config.authorize_url,
            client_id=self._config.client_id,
            response_type="code",
            redirect_uri=callback_url,
            scope=self._config.scope,
            state=state,
            code_challenge=create_s256_code_challenge(verifier),
            code_challenge_method="S256",
        )
        now = datetime.now(UTC)
        async with self._engine.begin() as conn:
            await conn.execute(
                oauth_states.delete().where(oauth_states.c.created_at < now - STATE_LIFETIME)
            )
            await conn.execute(
                oauth_states.insert().values(
                    state=state,
                    code_verifier=verifier,
                    app_redirect=target,
                    callback_url=callback_url,
                    created_at=now,
                )
            )
        return str(url)

    async def finish(self, params: Mapping[str, str]) -> str:
        """Where to send the browser back: the app with tokens, or the error URL."""
        state = params.get("state", "")
        async with self._engine.begin() as conn:
            row = (
                await conn.execute(
                    oauth_states.delete()
                    .where(oauth_states.c.state == state)
                    .returning(
                        oauth_states.c.code_verifier,
                        oauth_states.c.app_redirect,
                        oauth_states.c.callback_url,
                        oauth_states.c.created_at,
                    )
                )
            ).first()
        if not state or row is None or row.created_at < datetime.now(UTC) - STATE_LIFETIME:
            return self._error("invalid_state", "the login expired or was not started here")
        if params.get("error"):
            return self._error("auth_failed", params.get("error_description") or params["error"])
        code = params.get("code")
        if not code:
            return self._error("auth_failed", "the provider sent no authorization code")
        try:
            access_token = await self._exchange(code, row.code_verifier, row.callback_url)
            request = self._http.build_request(
                "GET",
                self._config.userinfo_url,
                headers={"Authorization": f"Bearer {access_token}"},
                timeout=15,
            )
            response, body = await send_bounded(self._http, request)
            response.raise_for_status()
            # Strictly: a NUL or a lone surrogate in a name cannot be stored.
            profile = parse_json(body)
        except (httpx.HTTPError, ValueError, BadRequest) as exc:
            logger.warning("oauth code exchange failed: %s", exc)
            return self._error("auth_failed", "the provider refused the authorization code")
        subject = _subject(profile)
        if subject is None:
            return self._error("auth_failed", "the provider did not identify the user")
        try:
            user = await self._authenticator.user_for_identity(
                self._config.name, subject, email=profile.get("email"), profile=profile
            )
            tokens = await self._sessions.issue(user.id)
        except ApiError as exc:  # the email is another account's; the user was deleted
            return self._error("auth_failed", exc.message)
        query = urlencode(
            {
                "access_token": tokens.access_token,
                "refresh_token": tokens.refresh_token,
                "user_id": user.id,
            }
        )
        return f"{row.app_redirect}?{query}"

    async def _exchange(self, code: str, verifier: str, callback_url: str) -> str:
        """The access token for `code` (client_secret_basic, with the PKCE verifier)."""
        secret = self._config.client_secret
        request = self._http.build_request(
            "POST",
            self._config.token_url,
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": callback_url,
                "code_verifier": verifier,
                "client_id": self._config.client_id,
            },
            headers={"Accept": "application/json"},
            timeout=15,
        )
        auth = (
            httpx.BasicAuth(self._config.client_id, secret.get_secret_value()) if secret else None
        )
        response, body = await send_bounded(self._http, request, auth=auth)
        response.raise_for_status()
        answer = parse_json(body)
        token = answer.get("access_token") if isinstance(answer, dict) else None
        if not isinstance(token, str) or not token:
            raise ValueError("token response has no access_token")
        return token

    def _error(self, error: str, description: str) -> str:
        query = urlencode({"error": error, "description": description})
        return f"{self._config.error_redirect}?{query}"


def _subject(profile: object) -> str | None:
    """Who the userinfo says the user is: OIDC's `sub`, or an `id` as OAuth 2 providers
    name it (a number at GitHub); None if it is neither or too long to store."""
    if not isinstance(profile, dict):
        return None
    subject = profile.get("sub") or profile.get("id")
    if isinstance(subject, int) and not isinstance(subject, bool):
        subject = str(subject)
    if not isinstance(subject, str) or not 0 < len(subject) <= MAX_SUBJECT:
        return None
    return subject
