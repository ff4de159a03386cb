"""Password logins as they interleave in one process: the wrong-password limit."""

from __future__ import annotations

import asyncio

import pytest

from app.core import accounts
from app.core.config import ActionLimit
from app.core.errors import RateLimited, Unauthorized
from tests.conftest import StartLivegate

# The in-process limiter: attempts are decided in the order they begin.
pytestmark = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)

PASSWORD = "SecurePass123!"


async def test_guesses_begun_together_get_no_more_tries_than_one_after_another(
    start_livegate: StartLivegate,
):
    """Three wrong passwords begun before any has been checked, then the right one:
    the right one is refused, as it would be had the three been tried first."""
    livegate = await start_livegate(
        actions={"login_fail": ActionLimit(limit=3, window_seconds=900, scope="email_ip")}
    )
    svc = livegate.services
    session = await accounts.register(
        svc.engine,
        svc.sessions,
        username="burst",
        email="burst@example.test",
        password=PASSWORD,
        tier="free",
    )

    async def login(password: str) -> object:
        return await accounts.login(
            svc.engine,
            svc.sessions,
            svc.policy,
            email=session.user.email or "",
            password=password,
            client_ip="203.0.113.7",
        )

    guesses = [login(f"WrongPass{i}23!") for i in range(3)] + [login(PASSWORD)]
    outcomes = await asyncio.gather(*guesses, return_exceptions=True)
    assert [type(outcome) for outcome in outcomes] == [Unauthorized] * 3 + [RateLimited]
