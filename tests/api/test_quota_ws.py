"""`WS /ws/quota`: the quota snapshot on connect, live pushes while tokens flow, auth, pings.

Real servers on loopback (Livegate and the fake upstream), real SQLite or
PostgreSQL+Redis, and the `websockets` client; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import httpx
import openai
import pytest
import sqlalchemy as sa
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from app.core.accounts import set_tier
from app.core.auth_cache import CHANNEL as AUTH_CHANNEL
from app.core.bus import RESYNC
from app.core.config import ServerConfig
from app.core.live import LIMITS_CHANNEL, quota_channel
from app.core.quota import add_tokens, month_period
from app.core.security import Secrets
from app.core.tables import usage_logs, users
from tests.conftest import FAKE_MODEL, Account, Backend, Livegate, StartLivegate, tiny_tier
from tests.core.test_external_jwt import (
    JwksServer,
    SigningKey,
    generated_keys,
    issuer_config,
    jwks,
    sign,
)
from tests.core.test_external_jwt import claims as external_claims

__all__ = ["generated_keys", "jwks"]  # the fixtures, shared with the issuer's tests
from tests.fake_upstream import FakeUpstream

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)

UNLIMITED = 2**53 - 1
WAIT = 10  # seconds: the bound on every wait for something the server should do
QUOTA_KEYS = {"type", "total", "used", "remaining", "resetDate", "unlimited", "seq"}
CHECKPOINT_TOKENS = 5  # make_settings' metering.checkpoint_tokens


def quota_url(livegate: Livegate, **params: str) -> str:
    return f"{livegate.ws_url}/ws/quota?{urlencode({'deviceId': 'd1', **params})}"


@asynccontextmanager
async def quota_socket(
    livegate: Livegate,
    *,
    token: str | None = None,
    query_token: str | None = None,
    headers: dict[str, str] | None = None,
    device: str = "d1",
) -> AsyncIterator[ClientConnection]:
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    params = {"deviceId": device}
    if query_token is not None:
        params["token"] = query_token
    async with connect(
        quota_url(livegate, **params), additional_headers=all_headers, open_timeout=WAIT
    ) as ws:
        yield ws


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(WAIT):
        message = await ws.recv()
    assert isinstance(message, str), f"expected a text frame, got {message!r}"
    decoded = json.loads(message)
    assert isinstance(decoded, dict)
    return decoded


async def recv_until(
    ws: ClientConnection, done: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    """Every message up to and including the first one `done` accepts (bounded)."""
    received: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(WAIT):
            while True:
                received.append(await recv_json(ws))
                if done(received[-1]):
                    return received
    except TimeoutError:
        raise AssertionError(f"no awaited message within {WAIT}s; got {received}") from None


def is_quota(message: dict[str, Any]) -> bool:
    return message.get("type") == "quota"


def is_pong(message: dict[str, Any]) -> bool:
    return message == {"type": "pong"}


async def get_quota(livegate: Livegate, token: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=livegate.base_url) as http:
        response = await http.get("/api/usage/quota", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body, dict)
    return body


async def usage_rows(livegate: Livegate, user_id: str) -> list[sa.Row[Any]]:
    async with livegate.services.engine.connect() as conn:
        result = await conn.execute(
            sa.select(usage_logs)
            .where(usage_logs.c.user_id == user_id)
            .order_by(usage_logs.c.started_at)
        )
        return list(result)


async def wait_for_row(
    livegate: Livegate, user_id: str, accept: Callable[[sa.Row[Any]], bool]
) -> sa.Row[Any]:
    rows: list[sa.Row[Any]] = []
    for _ in range(500):
        rows = await usage_rows(livegate, user_id)
        if rows and accept(rows[-1]):
            return rows[-1]
        await asyncio.sleep(0.02)
    raise AssertionError(f"usage row never reached the awaited state: {rows}")


def client(livegate: Livegate, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{livegate.base_url}/v1", api_key=key, max_retries=0)


async def chat_once(livegate: Livegate, account: Account) -> None:
    async with client(livegate, account.api_key) as sdk:
        await sdk.chat.completions.create(
            model=FAKE_MODEL, messages=[{"role": "user", "content": "hi"}]
        )


def assert_quota_message(message: dict[str, Any], quota: dict[str, Any], unlimited: bool) -> None:
    assert set(message) == QUOTA_KEYS, message
    assert message["type"] == "quota"
    assert {k: message[k] for k in ("total", "used", "remaining", "resetDate")} == quota
    assert message["unlimited"] is unlimited
    assert isinstance(message["seq"], int) and not isinstance(message["seq"], bool)


# --- the snapshot on connect -------------------------------------------------------


@pytest.mark.parametrize("how", ["header-jwt", "query-jwt", "query-api-key", "header-api-key"])
async def test_first_message_is_the_current_quota(
    livegate: Livegate, fake_upstream: FakeUpstream, how: str
):
    fake_upstream.script.tokens = 7
    account = await livegate.account()
    await chat_once(livegate, account)
    quota = await get_quota(livegate, account.token)
    assert quota["used"] > 0
    credential = account.api_key if how.endswith("api-key") else account.token
    if how.startswith("header"):
        socket = quota_socket(livegate, token=credential)
    else:
        socket = quota_socket(livegate, query_token=credential)
    async with socket as ws:
        first = await recv_json(ws)
    assert_quota_message(first, quota, unlimited=False)
    assert quota["total"] == 1_000_000  # the built-in free tier
    assert quota["remaining"] == quota["total"] - quota["used"]
    # The counter was written at least once (request start and its finalization).
    assert first["seq"] >= 1


async def test_fresh_user_snapshot_is_untouched_quota(livegate: Livegate):
    account = await livegate.account()
    async with quota_socket(livegate, token=account.token) as ws:
        first = await recv_json(ws)
    assert_quota_message(first, await get_quota(livegate, account.token), unlimited=False)
    assert (first["used"], first["remaining"], first["seq"]) == (0, 1_000_000, 0)


async def test_unlimited_tier_snapshot_says_unlimited(livegate: Livegate):
    account = await livegate.account(tier="enterprise")
    async with quota_socket(livegate, token=account.token) as ws:
        first = await recv_json(ws)
    assert_quota_message(first, await get_quota(livegate, account.token), unlimited=True)
    assert first["total"] == first["remaining"] == UNLIMITED


# --- authentication ----------------------------------------------------------------


def _expired_jwt(livegate: Livegate, account: Account) -> str:
    issued = datetime.now(UTC) - timedelta(hours=25)
    return livegate.services.secrets.issue_token(account.user.id, now=issued)


def _foreign_jwt(livegate: Livegate, account: Account) -> str:
    return Secrets("another-server-secret-" + "y" * 40).issue_token(account.user.id)


BAD_AUTH: dict[str, Callable[[Livegate, Account], dict[str, Any]]] = {
    "missing": lambda lg, acc: {},
    "garbage-header": lambda lg, acc: {"token": "not-a-jwt"},
    "garbage-query": lambda lg, acc: {"query_token": "not-a-jwt"},
    "empty-query": lambda lg, acc: {"query_token": ""},
    "basic-scheme": lambda lg, acc: {"headers": {"Authorization": f"Basic {acc.token}"}},
    "expired-jwt-header": lambda lg, acc: {"token": _expired_jwt(lg, acc)},
    "expired-jwt-query": lambda lg, acc: {"query_token": _expired_jwt(lg, acc)},
    "jwt-of-another-secret": lambda lg, acc: {"token": _foreign_jwt(lg, acc)},
    "unknown-api-key": lambda lg, acc: {"query_token": "sk-lg-" + "A" * 43},
}


@pytest.mark.parametrize("case", sorted(BAD_AUTH))
async def test_bad_auth_is_accepted_then_closed_4401(livegate: Livegate, case: str):
    account = await livegate.account()
    # The handshake succeeds (a browser only sees close codes of accepted sockets)...
    async with quota_socket(livegate, **BAD_AUTH[case](livegate, account)) as ws:
        # ...and the first thing that arrives is the close, not a quota message.
        with pytest.raises(ConnectionClosed) as caught:
            async with asyncio.timeout(WAIT):
                await ws.recv()
    assert caught.value.rcvd is not None
    assert caught.value.rcvd.code == 4401


# --- live pushes while a stream is metered ------------------------------------------


async def test_stream_pushes_rising_quota_to_every_device_of_the_user_only(
    livegate: Livegate, fake_upstream: FakeUpstream
):
    fake_upstream.script.tokens = 30
    fake_upstream.script.hold_after = 10
    alice = await livegate.account()
    bob = await livegate.account()
    async with (
        quota_socket(livegate, token=alice.token, device="phone") as phone,
        quota_socket(livegate, query_token=alice.token, device="laptop") as laptop,
        quota_socket(livegate, token=bob.token, device="bob") as bob_ws,
    ):
        seen: dict[str, list[dict[str, Any]]] = {"phone": [], "laptop": []}
        for name, ws in (("phone", phone), ("laptop", laptop)):
            seen[name] = [await recv_json(ws)]
            assert seen[name][0]["used"] == 0
        bob_first = await recv_json(bob_ws)
        assert is_quota(bob_first) and bob_first["used"] == 0

        async def chat() -> str:
            async with client(livegate, alice.api_key) as sdk:
                stream = await sdk.chat.completions.create(
                    model=FAKE_MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
                )
                return "".join(
                    [c.choices[0].delta.content or "" async for c in stream if c.choices]
                )

        chat_task = asyncio.create_task(chat())
        try:
            # The upstream holds after 10 tokens: the checkpoint of those 10 is written
            # and pushed while the stream is still open.
            mid_row = await wait_for_row(
                livegate, alice.user.id, lambda r: r.completion_tokens == 10
            )
            assert mid_row.status == "streaming"
            for name, ws in (("phone", phone), ("laptop", laptop)):
                seen[name] += await recv_until(
                    ws, lambda m: is_quota(m) and m["used"] == mid_row.total_tokens
                )
            assert not chat_task.done()
        finally:
            fake_upstream.release.set()
        async with asyncio.timeout(WAIT):
            text = await chat_task
        assert text == "".join(fake_upstream.token(i) for i in range(30))

        row = await wait_for_row(livegate, alice.user.id, lambda r: r.status == "completed")
        final = await get_quota(livegate, alice.token)
        assert final["used"] == row.total_tokens == 11 + 30
        for name, ws in (("phone", phone), ("laptop", laptop)):
            seen[name] += await recv_until(ws, lambda m: is_quota(m) and m["used"] == final["used"])
            messages = seen[name]
            assert all(is_quota(m) for m in messages), messages
            # Snapshot, the held checkpoint and the final value at least.
            assert len(messages) >= 3, messages
            used = [m["used"] for m in messages]
            seqs = [m["seq"] for m in messages]
            assert used == sorted(set(used)), f"{name}: used must strictly increase: {used}"
            assert seqs == sorted(set(seqs)), f"{name}: seq must strictly increase: {seqs}"
            assert_quota_message(messages[-1], final, unlimited=False)

        # Bob's socket got nothing of Alice's: his next message answers his own ping.
        await bob_ws.send("ping")
        assert await recv_json(bob_ws) == {"type": "pong"}


async def test_device_connecting_mid_stream_gets_current_value_then_pushes(
    livegate: Livegate, fake_upstream: FakeUpstream
):
    fake_upstream.script.tokens = 20
    fake_upstream.script.hold_after = 7
    account = await livegate.account()
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=WAIT) as http:

        async def chat() -> None:
            async with http.stream(
                "POST",
                "/v1/chat/completions",
                headers={"Authorization": f"Bearer {account.api_key}"},
                json={
                    "model": FAKE_MODEL,
                    "stream": True,
                    "messages": [{"role": "user", "content": "hi"}],
                },
            ) as response:
                assert response.status_code == 200
                async for _ in response.aiter_lines():
                    pass

        chat_task = asyncio.create_task(chat())
        try:
            # The checkpoint due at token 5 is written (with whatever was delivered when it
            # ran, at most 7); nothing else is written while the upstream holds.
            mid = await wait_for_row(livegate, account.user.id, lambda r: r.completion_tokens >= 5)
            assert mid.status == "streaming" and mid.completion_tokens <= 7
            async with quota_socket(livegate, token=account.token) as ws:
                first = await recv_json(ws)
                assert first["used"] == mid.total_tokens
                assert first["seq"] >= 2
                fake_upstream.release.set()
                async with asyncio.timeout(WAIT):
                    await chat_task
                row = await wait_for_row(
                    livegate, account.user.id, lambda r: r.status == "completed"
                )
                later = await recv_until(ws, lambda m: m["used"] == row.total_tokens)
            assert all(m["seq"] > first["seq"] for m in later)
            assert row.total_tokens == 11 + 20
        finally:
            fake_upstream.release.set()
            if not chat_task.done():
                chat_task.cancel()


async def test_device_leaving_does_not_stop_pushes_to_the_others(
    livegate: Livegate, fake_upstream: FakeUpstream
):
    fake_upstream.script.tokens = 6
    account = await livegate.account()
    async with quota_socket(livegate, token=account.token, device="stays") as stays:
        assert is_quota(await recv_json(stays))
        for device in ("leaves-1", "leaves-2"):
            async with quota_socket(livegate, token=account.token, device=device) as leaves:
                assert is_quota(await recv_json(leaves))
        for round_ in range(2):
            await chat_once(livegate, account)
            quota = await get_quota(livegate, account.token)
            assert quota["used"] == (round_ + 1) * (11 + 6)
            await recv_until(stays, lambda m, q=quota: is_quota(m) and m["used"] == q["used"])
        # A device that connects again gets the current value at once.
        async with quota_socket(livegate, token=account.token, device="leaves-1") as again:
            assert_quota_message(await recv_json(again), quota, unlimited=False)


# --- pings and junk --------------------------------------------------------------


async def stream_text(livegate: Livegate, account: Account) -> tuple[str, str | None]:
    """A streamed answer's text and finish reason."""
    async with client(livegate, account.api_key) as sdk:
        stream = await sdk.chat.completions.create(
            model=FAKE_MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = [c async for c in stream if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    return text, chunks[-1].choices[0].finish_reason


@pytest.mark.parametrize(
    ("before", "after"), [("tiny", "enterprise"), ("enterprise", "tiny")], ids=["up", "down"]
)
async def test_a_tier_change_mid_stream_holds_for_the_rest_of_the_stream(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream, before: str, after: str
):
    limit = 40  # the tiny tier's; enterprise has none
    livegate = await start_livegate(tiers=tiny_tier(limit))
    fake_upstream.script.tokens = 60
    fake_upstream.script.hold_after = 20  # with the prompt's estimate: within either tier
    account = await livegate.account(tier=before)
    svc = livegate.services
    async with quota_socket(livegate, token=account.token) as ws:
        assert (await recv_json(ws))["unlimited"] is (before == "enterprise")
        chat_task = asyncio.create_task(stream_text(livegate, account))
        try:
            mid = await wait_for_row(livegate, account.user.id, lambda r: r.completion_tokens == 20)
            await recv_until(ws, lambda m: is_quota(m) and m["used"] == mid.total_tokens)
            await set_tier(
                svc.engine,
                svc.publisher,
                account.user.id,
                after,
                svc.settings.tier(after).monthly_tokens,
            )
            moved = await recv_until(
                ws, lambda m: is_quota(m) and m["unlimited"] is (after == "enterprise")
            )
        finally:
            fake_upstream.release.set()
        async with asyncio.timeout(WAIT):
            text, finish_reason = await chat_task
        row = await wait_for_row(livegate, account.user.id, lambda r: r.status == "completed")
        final = await get_quota(livegate, account.token)
        later = await recv_until(ws, lambda m: is_quota(m) and m["used"] == final["used"])

    delivered = row.completion_tokens
    assert text == "".join(fake_upstream.token(i) for i in range(delivered))
    if after == "enterprise":
        # Past the old limit: the stream runs to its end.
        assert (finish_reason, row.finish_reason, delivered) == ("stop", "stop", 60)
    else:
        # Cut within a checkpoint of the new limit.
        assert (finish_reason, row.finish_reason) == ("length", "quota_exhausted")
        assert limit <= row.total_tokens <= limit + CHECKPOINT_TOKENS
    # Every push after the move carries the new limit, the last one included.
    expected = (
        {"total": UNLIMITED, "unlimited": True}
        if after == "enterprise"
        else {"total": limit, "unlimited": False}
    )
    for message in [moved[-1], *later]:
        assert {k: message[k] for k in expected} == expected, message
    assert_quota_message(later[-1], final, unlimited=after == "enterprise")
    assert later[-1]["seq"] > moved[-1]["seq"]


async def test_a_tier_change_lost_with_the_bus_reaches_the_stream_when_it_is_back(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream
):
    livegate = await start_livegate(tiers=tiny_tier(40))
    fake_upstream.script.tokens = 60
    fake_upstream.script.hold_after = 20
    account = await livegate.account(tier="tiny")
    svc = livegate.services
    async with quota_socket(livegate, token=account.token) as ws:
        assert (await recv_json(ws))["unlimited"] is False
        chat_task = asyncio.create_task(stream_text(livegate, account))
        try:
            await wait_for_row(livegate, account.user.id, lambda r: r.completion_tokens == 20)
            # Moved up while the bus was away: written as `set_tier` writes it (the
            # counter's `seq` moved on), its announcement lost.
            async with svc.engine.begin() as conn:
                await conn.execute(
                    users.update().where(users.c.id == account.user.id).values(tier="enterprise")
                )
                await add_tokens(conn, account.user.id, month_period(datetime.now(UTC)), 0)
            # The bus back, every subscription hears RESYNC: the socket reads the
            # quota again, the metering the limits of the requests in flight, the
            # auth cache empties.
            for channel in (LIMITS_CHANNEL, quota_channel(account.user.id), AUTH_CHANNEL):
                svc.bus._fan_out(channel, RESYNC)
            await recv_until(ws, lambda m: is_quota(m) and m["unlimited"] is True)
        finally:
            fake_upstream.release.set()
        async with asyncio.timeout(WAIT):
            text, finish_reason = await chat_task
        row = await wait_for_row(livegate, account.user.id, lambda r: r.status == "completed")
        final = await get_quota(livegate, account.token)
        later = await recv_until(ws, lambda m: is_quota(m) and m["used"] == final["used"])
    # Past the old limit of 40: the stream ran to its end, and its checkpoints pushed
    # the new limit, not the one it started with.
    assert (finish_reason, row.completion_tokens) == ("stop", 60)
    assert text == "".join(fake_upstream.token(i) for i in range(60))
    assert all(m["unlimited"] for m in later if is_quota(m)), later


@pytest.mark.parametrize("ping", ["ping", '{"type":"ping"}', '{"type": "ping", "id": 7}'])
async def test_client_ping_gets_pong(livegate: Livegate, ping: str):
    account = await livegate.account()
    async with quota_socket(livegate, token=account.token) as ws:
        assert is_quota(await recv_json(ws))
        for _ in range(3):
            await ws.send(ping)
            assert await recv_json(ws) == {"type": "pong"}


async def test_server_pings_a_quiet_socket(
    start_livegate: StartLivegate, backend: Backend, fake_upstream: FakeUpstream
):
    livegate = await start_livegate(
        server=ServerConfig(redis_prefix=backend.redis_prefix, ws_ping_seconds=0.2)
    )
    account = await livegate.account()
    async with quota_socket(livegate, token=account.token) as ws:
        assert is_quota(await recv_json(ws))
        # Quiet: the server keeps pinging, and nothing else arrives.
        for _ in range(3):
            assert await recv_json(ws) == {"type": "ping"}
        # The socket still serves pongs and pushes after its pings.
        await ws.send("ping")
        await recv_until(ws, is_pong)
        fake_upstream.script.tokens = 3
        await chat_once(livegate, account)
        quota = await get_quota(livegate, account.token)
        pushed = await recv_until(ws, lambda m: is_quota(m) and m["used"] == quota["used"])
        assert {m["type"] for m in pushed} <= {"quota", "ping"}


async def test_a_bus_resync_pushes_a_fresh_snapshot_from_the_database(livegate: Livegate):
    account = await livegate.account()
    async with quota_socket(livegate, token=account.token) as ws:
        first = await recv_json(ws)
        # A change the bus never carried (as if published while Redis was away) ...
        async with livegate.services.engine.begin() as conn:
            await add_tokens(conn, account.user.id, month_period(datetime.now(UTC)), 123)
        # ... reaches the device once the bus tells its subscribers to resync.
        livegate.services.bus._fan_out(quota_channel(account.user.id), RESYNC)
        pushed = await recv_until(ws, is_quota)
    assert pushed[-1]["used"] == first["used"] + 123
    assert pushed[-1]["seq"] > first["seq"]


async def closed_code(ws: ClientConnection) -> int | None:
    """The close code the server sent, waiting for it (pings and pushes skipped)."""
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(WAIT):
            while True:
                await ws.recv()
    return closed.value.rcvd.code if closed.value.rcvd is not None else None


@pytest.mark.parametrize("ending", ["logout", "password-change", "key-revoked"])
async def test_a_socket_closes_once_its_credential_stops_holding(
    start_livegate: StartLivegate, backend: Backend, ending: str
):
    livegate = await start_livegate(
        server=ServerConfig(redis_prefix=backend.redis_prefix, ws_ping_seconds=0.2)
    )
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=WAIT) as http:
        name = uuid.uuid4().hex[:12]
        identity = {"username": name, "email": f"{name}@example.test", "password": "SecurePass123!"}
        registered = await http.post("/api/auth/register", json=identity)
        assert registered.status_code == 201, registered.text
        credential = registered.json()["data"]["token"]
        session = {"Authorization": f"Bearer {credential}"}
        if ending == "key-revoked":
            created = await http.post(
                "/api/v1/api-keys",
                json={"name": "ws", "permissions": ["usage:read"]},
                headers=session,
            )
            assert created.status_code == 201, created.text
            key = created.json()["data"]["api_key"]
            credential = key["key"]
        async with quota_socket(livegate, token=credential) as ws:
            assert is_quota(await recv_json(ws))
            # Checked again at every ping interval, and still good.
            for _ in range(3):
                assert await recv_json(ws) == {"type": "ping"}
            if ending == "key-revoked":
                # The checks do not count as uses of the key: only the connect does.
                await livegate.services.key_usage.flush()
                detail = await http.get(f"/api/v1/api-keys/{key['id']}", headers=session)
                assert detail.json()["data"]["api_key"]["usage_count"] == 1
            if ending == "logout":
                ended = await http.post("/api/auth/logout", headers=session)
            elif ending == "password-change":
                body = {"oldPassword": "SecurePass123!", "newPassword": "NewSecurePass456!"}
                ended = await http.put("/api/auth/password", json=body, headers=session)
            else:
                ended = await http.delete(f"/api/v1/api-keys/{key['id']}", headers=session)
            assert ended.status_code == 200, ended.text
            assert await closed_code(ws) == 4401


async def test_a_resync_reads_the_users_tier_again(livegate: Livegate):
    account = await livegate.account(tier="free")
    async with quota_socket(livegate, token=account.token) as ws:
        first = await recv_json(ws)
        assert first["unlimited"] is False
        # A tier change whose push was lost with the bus ...
        async with livegate.services.engine.begin() as conn:
            await conn.execute(
                users.update().where(users.c.id == account.user.id).values(tier="enterprise")
            )
            await add_tokens(conn, account.user.id, month_period(datetime.now(UTC)), 5)
        livegate.services.bus._fan_out(quota_channel(account.user.id), RESYNC)
        pushed = await recv_until(ws, is_quota)
    # ... shows in the snapshot sent on resync.
    assert pushed[-1]["unlimited"] is True
    assert pushed[-1]["used"] == first["used"] + 5


async def test_a_resync_lets_a_deleted_user_go(livegate: Livegate):
    account = await livegate.account()
    async with quota_socket(livegate, token=account.token) as ws:
        assert is_quota(await recv_json(ws))
        async with livegate.services.engine.begin() as conn:
            await conn.execute(
                users.update()
                .where(users.c.id == account.user.id)
                .values(deleted_at=datetime.now(UTC))
            )
        livegate.services.bus._fan_out(quota_channel(account.user.id), RESYNC)
        assert await closed_code(ws) == 4401


JUNK: list[str | bytes] = [
    b"\x00\xff\xfe binary frame",
    b"ping",
    "hello",
    "",
    "   ",
    "{not json",
    "{",
    '{"type": ["ping"]}',
    '{"type": 5}',
    '{"type":"pong"}',
    "[1, 2, 3]",
    "null",
    '"ping"',
    "x" * 65536,
]


async def test_binary_and_garbage_frames_do_not_kill_the_socket(
    livegate: Livegate, fake_upstream: FakeUpstream
):
    fake_upstream.script.tokens = 4
    account = await livegate.account()
    async with quota_socket(livegate, token=account.token) as ws:
        assert is_quota(await recv_json(ws))
        for junk in JUNK:
            await ws.send(junk)
            # Still open and still answering after each piece of junk.
            await ws.send("ping")
            await recv_until(ws, is_pong)
        # The push loop survived as well.
        await chat_once(livegate, account)
        quota = await get_quota(livegate, account.token)
        await recv_until(ws, lambda m: is_quota(m) and m["used"] == quota["used"])
        assert ws.close_code is None


async def test_deeply_nested_json_text_does_not_kill_the_socket(livegate: Livegate):
    account = await livegate.account()
    async with quota_socket(livegate, token=account.token) as ws:
        assert is_quota(await recv_json(ws))
        await ws.send('{"a":' * 100_000)  # 500 kB of text, well under the frame limit
        await ws.send("ping")
        await recv_until(ws, is_pong)


async def test_a_client_gone_while_its_credential_is_refused_leaves_no_error(
    start_livegate: StartLivegate,
    jwks: JwksServer,
    generated_keys: dict[str, SigningKey],
    caplog: pytest.LogCaptureFixture,
):
    """The issuer's keys are fetched while the client leaves: the refusal's close finds
    no one to tell, and the socket ends without an error."""
    jwks.gate = asyncio.Event()
    livegate = await start_livegate(auth=issuer_config(jwks))
    forged = sign(generated_keys["attacker-rsa"], external_claims())
    # uvicorn's own loggers do not propagate to the root's handlers.
    server_log = logging.getLogger("uvicorn.error")
    server_log.addHandler(caplog.handler)
    caplog.set_level(logging.ERROR)
    async with quota_socket(livegate, token=forged) as ws:
        async with asyncio.timeout(WAIT):
            while not jwks.fetches:  # noqa: ASYNC110 (a counter: nothing to wait on)
                await asyncio.sleep(0.01)
        ws.transport.abort()  # gone, without a closing handshake
    jwks.gate.set()  # now refused, its client gone
    # The route's task, which outlives the connection it served.
    tasks = livegate.server.server.server_state.tasks
    async with asyncio.timeout(WAIT):
        while tasks:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    server_log.removeHandler(caplog.handler)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
