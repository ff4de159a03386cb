"""AnkiLingoFlash's surface: the OpenAI passthrough on `POST /api/chat`, models, limits,
per-user data and the flashcard counter (secure by default, open mode on request),
CORS exactly as its spec documents, 405s, and the OAuth redirect page.

Real servers on loopback (Livegate and the fake upstream), real SQLite or
PostgreSQL+Redis; the official OpenAI SDK and httpx as clients.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import openai
import pytest
import sqlalchemy as sa
from openai.types.chat import ChatCompletion

from app.core.config import AnkiConfig, ModelRoute, ServerConfig
from app.core.tables import external_identities, quota_counters, usage_logs
from tests.conftest import FAKE_MODEL, Account, Backend, Livegate, StartLivegate
from tests.fake_upstream import FakeUpstream

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)

WAIT = 10  # seconds: the bound on every wait for something the server should do
GENERATIONS_METRIC = "counter:flashcard_generations"
OPEN_PREFLIGHT = {
    "access-control-allow-origin": "*",
    "access-control-allow-methods": "GET, POST, OPTIONS",
    "access-control-allow-headers": "Content-Type, Authorization",
    "access-control-max-age": "86400",
}
EXTENSION_ORIGIN = "chrome-extension://abcdefghijklmnop"
FLASHCARD_PROMPT = [{"role": "user", "content": "Create a flashcard for the word: Bonjour"}]
USER_SHAPE = {
    "userId",
    "userName",
    "userEmail",
    "flashcardCount",
    "freeGenerationLimit",
    "regenerationLimit",
}


# --- helpers ---------------------------------------------------------------------


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def call(
    livegate: Livegate,
    method: str,
    path: str,
    token: str | None = None,
    *,
    json: Any = None,
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=WAIT) as http:
        return await http.request(
            method,
            path,
            json=json,
            content=content,
            headers={**bearer(token), **(headers or {})},
        )


def anki_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"], str) and body["error"]
    return body["error"]  # type: ignore[no-any-return]


async def usage_rows(livegate: Livegate, **where: str) -> list[sa.Row[Any]]:
    query = sa.select(usage_logs).order_by(usage_logs.c.started_at)
    for column, value in where.items():
        query = query.where(usage_logs.c[column] == value)
    async with livegate.services.engine.connect() as conn:
        return list(await conn.execute(query))


async def wait_final_row(livegate: Livegate, **where: str) -> sa.Row[Any]:
    rows: list[sa.Row[Any]] = []
    for _ in range(500):
        rows = await usage_rows(livegate, **where)
        if len(rows) == 1 and rows[0].status != "streaming":
            return rows[0]
        await asyncio.sleep(0.02)
    raise AssertionError(f"no single final usage row: {rows}")


async def set_generations(livegate: Livegate, counted_as: str, used: int) -> None:
    """Secured, generations are counted for the Livegate user (open mode: `anki:<id>`)."""
    async with livegate.services.engine.begin() as conn:
        await conn.execute(
            quota_counters.insert().values(
                user_id=counted_as,
                metric=GENERATIONS_METRIC,
                period="all",
                used=used,
                seq=1,
            )
        )


async def link_identity(livegate: Livegate, account: Account, subject: str) -> None:
    async with livegate.services.engine.begin() as conn:
        await conn.execute(
            external_identities.insert().values(
                provider="google",
                subject=subject,
                user_id=account.user.id,
                created_at=datetime.now(UTC),
            )
        )


def completion_text(fake: FakeUpstream) -> str:
    return "".join(fake.token(i) for i in range(fake.script.tokens))


def rewrite_to_api_chat(request: httpx.Request) -> None:
    """Send the SDK's `/chat/completions` to AnkiLingoFlash's one path, `/api/chat`."""
    assert request.url.path == "/api/chat/completions"
    request.url = request.url.copy_with(path="/api/chat")


async def _rewrite_hook(request: httpx.Request) -> None:
    rewrite_to_api_chat(request)


# --- the OpenAI passthrough -----------------------------------------------------


async def test_passthrough_returns_the_upstream_completion_as_is(
    livegate: Livegate, fake_upstream: FakeUpstream
):
    account = await livegate.account()
    fake_upstream.script.tokens = 5
    body = {
        "model": FAKE_MODEL,
        "messages": FLASHCARD_PROMPT,
        "response_format": {"type": "json_object"},
        "temperature": 0.3,
    }
    response = await call(livegate, "POST", "/api/chat", account.api_key, json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["access-control-allow-origin"] == "*"
    answer = response.json()
    completion = ChatCompletion.model_validate(answer)
    assert completion.object == "chat.completion"
    assert completion.model == FAKE_MODEL
    assert completion.choices[0].message.content == completion_text(fake_upstream)
    assert completion.choices[0].finish_reason == "stop"
    assert answer["usage"] == {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
    assert set(answer) == {"id", "object", "created", "model", "choices", "usage"}

    # The request reached the upstream as sent, response_format included.
    sent = fake_upstream.requests[-1]
    assert sent["response_format"] == {"type": "json_object"}
    assert sent["messages"] == FLASHCARD_PROMPT
    assert sent["temperature"] == 0.3
    assert sent["model"] == FAKE_MODEL

    row = await wait_final_row(livegate, user_id=account.user.id)
    assert (row.status, row.prompt_tokens, row.completion_tokens) == ("completed", 11, 5)


async def test_openai_sdk_against_the_passthrough(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream
):
    # The extension's own model name, served through an alias.
    alias = ModelRoute(name="gpt-4o-2024-08-06", targets=[f"fake:{FAKE_MODEL}"])
    livegate = await start_livegate(models=[alias])
    account = await livegate.account()
    fake_upstream.script.tokens = 4
    async with (
        httpx.AsyncClient(event_hooks={"request": [_rewrite_hook]}) as http,
        openai.AsyncOpenAI(
            base_url=f"{livegate.base_url}/api",
            api_key=account.api_key,
            max_retries=0,
            http_client=http,
        ) as sdk,
    ):
        completion = await sdk.chat.completions.create(
            model="gpt-4o-2024-08-06",
            messages=FLASHCARD_PROMPT,  # type: ignore[arg-type]
            response_format={"type": "json_object"},
        )
    assert completion.choices[0].message.content == completion_text(fake_upstream)
    assert completion.usage is not None and completion.usage.total_tokens == 15
    sent = fake_upstream.requests[-1]
    assert sent["model"] == FAKE_MODEL
    assert sent["response_format"] == {"type": "json_object"}
    row = await wait_final_row(livegate, user_id=account.user.id)
    assert row.model == "gpt-4o-2024-08-06"
    assert row.upstream_model == FAKE_MODEL


async def test_passthrough_is_secure_by_default(livegate: Livegate, fake_upstream: FakeUpstream):
    body = {"model": FAKE_MODEL, "messages": FLASHCARD_PROMPT}
    anki_error(await call(livegate, "POST", "/api/chat", json=body), 401)
    anki_error(await call(livegate, "POST", "/api/chat", "sk-lg-" + "0" * 40, json=body), 401)
    assert fake_upstream.requests == []

    account = await livegate.account()
    for credential in (account.api_key, account.token):
        response = await call(livegate, "POST", "/api/chat", credential, json=body)
        assert response.status_code == 200, response.text
    # X-API-Key is accepted too.
    response = await call(
        livegate, "POST", "/api/chat", json=body, headers={"X-API-Key": account.api_key}
    )
    assert response.status_code == 200, response.text
    assert len(fake_upstream.requests) == 3


async def test_passthrough_needs_the_ai_write_permission(
    livegate: Livegate, fake_upstream: FakeUpstream
):
    account = await livegate.account()
    created = await call(
        livegate,
        "POST",
        "/api/v1/api-keys",
        account.token,
        json={"name": "read only", "permissions": ["ai:read"]},
    )
    assert created.status_code == 201, created.text
    key = created.json()["data"]["api_key"]["key"]
    body = {"model": FAKE_MODEL, "messages": FLASHCARD_PROMPT}
    anki_error(await call(livegate, "POST", "/api/chat", key, json=body), 403)
    assert fake_upstream.requests == []


async def test_user_routes_need_the_api_keys_permission(livegate: Livegate):
    account = await livegate.account()

    async def key(permissions: list[str]) -> str:
        created = await call(
            livegate,
            "POST",
            "/api/v1/api-keys",
            account.token,
            json={"name": "k", "permissions": permissions},
        )
        assert created.status_code == 201, created.text
        return created.json()["data"]["api_key"]["key"]  # type: ignore[no-any-return]

    user_id = account.user.id
    calls: dict[str, tuple[str, str, Any]] = {
        "read": ("GET", f"/api/user-data/{user_id}", None),
        "can-generate": ("POST", "/api/generate-flashcard", {"userId": user_id}),
        "save": ("POST", f"/api/user-data/{user_id}", {"userName": "Renamed"}),
        "count": ("POST", "/api/increment-flashcard-count", {"userId": user_id}),
    }
    allowed = {
        "webhooks:read": set(),
        "usage:read": {"read", "can-generate"},
        "ai:write": {"save", "count"},
    }
    for permission, may in allowed.items():
        credential = await key([permission])
        for name, (method, path, body) in calls.items():
            response = await call(livegate, method, path, credential, json=body)
            if name in may:
                assert response.status_code == 200, (permission, name, response.text)
            else:
                anki_error(response, 403)
    # Nothing refused changed anything: one count, by the key allowed to count.
    read = await call(livegate, "GET", f"/api/user-data/{user_id}", account.token)
    assert read.json()["flashcardCount"] == 1


async def test_passthrough_errors_are_in_the_anki_envelope(
    livegate: Livegate, fake_upstream: FakeUpstream
):
    account = await livegate.account()
    for body in (
        {"model": FAKE_MODEL, "messages": []},
        {"messages": FLASHCARD_PROMPT},
        {"model": FAKE_MODEL, "messages": [{"content": "no role"}]},
    ):
        anki_error(await call(livegate, "POST", "/api/chat", account.api_key, json=body), 400)
    missing = {"model": "no-such-model", "messages": FLASHCARD_PROMPT}
    anki_error(await call(livegate, "POST", "/api/chat", account.api_key, json=missing), 404)
    assert fake_upstream.requests == []


@pytest.mark.parametrize("text", ["a\\u0000b", "a\\ud800b"], ids=["nul", "lone-surrogate"])
async def test_a_passthrough_body_the_strict_parse_refuses_is_refused_in_the_anki_envelope(
    livegate: Livegate, fake_upstream: FakeUpstream, text: str
):
    """Valid JSON of AnkiLingoFlash's shape, with text no database or upstream takes."""
    account = await livegate.account()
    for body in (
        f'{{"model": "{FAKE_MODEL}", "messages": [{{"role": "user", "content": "{text}"}}]}}',
        f'{{"model": "{text}", "messages": []}}',
    ):
        response = await call(
            livegate,
            "POST",
            "/api/chat",
            account.api_key,
            content=body.encode(),
            headers={"Content-Type": "application/json"},
        )
        message = anki_error(response, 400)
        assert "NUL" in message or "surrogate" in message
    # Navi's shape, or no shape at all, keeps Navi's envelope.
    navi = await call(
        livegate,
        "POST",
        "/api/chat",
        account.api_key,
        content=f'{{"message": "{text}"}}'.encode(),
        headers={"Content-Type": "application/json"},
    )
    assert navi.status_code == 400 and navi.json()["success"] is False
    assert fake_upstream.requests == []


async def test_open_mode_passthrough_is_metered_to_the_anonymous_user(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream
):
    livegate = await start_livegate(anki=AnkiConfig(open_mode=True))
    request_id = uuid.uuid4().hex
    fake_upstream.script.tokens = 3
    response = await call(
        livegate,
        "POST",
        "/api/chat",
        json={
            "model": FAKE_MODEL,
            "messages": FLASHCARD_PROMPT,
            "response_format": {"type": "json_object"},
        },
        headers={"X-Request-Id": request_id},
    )
    assert response.status_code == 200, response.text
    ChatCompletion.model_validate(response.json())
    assert fake_upstream.requests[-1]["response_format"] == {"type": "json_object"}
    row = await wait_final_row(livegate, request_id=request_id)
    assert row.user_id == "anonymous"
    assert (row.status, row.prompt_tokens, row.completion_tokens) == ("completed", 11, 3)

    # A caller who signs in is still metered as themselves.
    account = await livegate.account()
    response = await call(
        livegate,
        "POST",
        "/api/chat",
        account.api_key,
        json={"model": FAKE_MODEL, "messages": FLASHCARD_PROMPT},
    )
    assert response.status_code == 200
    await wait_final_row(livegate, user_id=account.user.id)


# --- models, limits, connectivity ------------------------------------------------


async def test_models_limits_and_connectivity(livegate: Livegate):
    models = await call(livegate, "GET", "/api/models")
    assert models.status_code == 200
    assert models.json() == {"result": [FAKE_MODEL], "error": None}
    limits = await call(livegate, "GET", "/api/limits")
    assert limits.status_code == 200
    assert limits.json() == {"freeGenerationLimit": 100, "regenerationLimit": 5}
    online = await call(livegate, "GET", "/api/check-connectivity")
    assert online.status_code == 200
    assert online.json() == {"status": "online"}
    for response in (models, limits, online):
        assert response.headers["content-type"].startswith("application/json")
        assert response.headers["access-control-allow-origin"] == "*"


# --- user data ------------------------------------------------------------------


async def test_user_data_for_the_callers_own_id(livegate: Livegate):
    account = await livegate.account()
    path = f"/api/user-data/{account.user.id}"
    fresh = await call(livegate, "GET", path, account.token)
    assert fresh.status_code == 200, fresh.text
    assert fresh.headers["access-control-allow-origin"] == "*"
    assert fresh.json() == {
        "userId": account.user.id,
        "userName": None,
        "userEmail": None,
        "flashcardCount": 0,
        "freeGenerationLimit": 100,
        "regenerationLimit": 5,
    }

    saved = await call(
        livegate,
        "POST",
        path,
        account.token,
        json={"userId": account.user.id, "userName": "John Doe", "userEmail": "john@example.com"},
    )
    assert saved.status_code == 200, saved.text
    expected = {
        "userId": account.user.id,
        "userName": "John Doe",
        "userEmail": "john@example.com",
        "flashcardCount": 0,
        "freeGenerationLimit": 100,
        "regenerationLimit": 5,
    }
    assert saved.json() == expected

    # Counting generations shows in the record.
    for _ in range(3):
        counted = await call(
            livegate,
            "POST",
            "/api/increment-flashcard-count",
            account.token,
            json={"userId": account.user.id},
        )
        assert counted.status_code == 200, counted.text
    again = await call(livegate, "GET", path, account.api_key)
    assert again.status_code == 200
    assert again.json() == {**expected, "flashcardCount": 3}

    # A later save updates the profile (userId may be left out of the body).
    renamed = await call(livegate, "POST", path, account.token, json={"userName": "Jane"})
    assert renamed.status_code == 200
    assert renamed.json()["userName"] == "Jane"
    assert renamed.json()["flashcardCount"] == 3


async def test_user_data_of_another_user_is_403_and_anonymous_401(livegate: Livegate):
    owner = await livegate.account()
    other = await livegate.account()
    path = f"/api/user-data/{owner.user.id}"
    anki_error(await call(livegate, "GET", path, other.token), 403)
    anki_error(await call(livegate, "POST", path, other.token, json={"userName": "Mallory"}), 403)
    anki_error(await call(livegate, "GET", path), 401)
    anki_error(await call(livegate, "POST", path, json={"userName": "Mallory"}), 401)
    anki_error(await call(livegate, "GET", path, "garbage"), 401)
    # Nothing was written by the refused calls.
    mine = await call(livegate, "GET", path, owner.token)
    assert mine.json()["userName"] is None


async def test_user_data_through_a_linked_external_identity(livegate: Livegate):
    account = await livegate.account()
    stranger = await livegate.account()
    subject = f"g-{uuid.uuid4().hex[:12]}"
    await link_identity(livegate, account, subject)
    path = f"/api/user-data/{subject}"

    saved = await call(
        livegate,
        "POST",
        path,
        account.token,
        json={"userId": subject, "userName": "G User", "userEmail": "g@example.com"},
    )
    assert saved.status_code == 200, saved.text
    got = await call(livegate, "GET", path, account.api_key)
    assert got.status_code == 200
    assert got.json() == {
        "userId": subject,
        "userName": "G User",
        "userEmail": "g@example.com",
        "flashcardCount": 0,
        "freeGenerationLimit": 100,
        "regenerationLimit": 5,
    }
    counted = await call(
        livegate, "POST", "/api/increment-flashcard-count", account.token, json={"userId": subject}
    )
    assert counted.json() == {"success": True, "newCount": 1, "remainingCards": 99}
    # The link is this account's only.
    anki_error(await call(livegate, "GET", path, stranger.token), 403)


async def test_one_person_has_one_allowance_under_all_their_ids(livegate: Livegate):
    account = await livegate.account()
    subject = f"g-{uuid.uuid4().hex[:12]}"
    await link_identity(livegate, account, subject)
    await set_generations(livegate, account.user.id, 99)
    last = await call(
        livegate, "POST", "/api/increment-flashcard-count", account.token, json={"userId": subject}
    )
    assert last.json() == {"success": True, "newCount": 100, "remainingCards": 0}
    # The same person under their Livegate id has nothing left either.
    again = await call(
        livegate,
        "POST",
        "/api/increment-flashcard-count",
        account.token,
        json={"userId": account.user.id},
    )
    assert again.status_code == 429
    for user_id in (subject, account.user.id):
        data = await call(livegate, "GET", f"/api/user-data/{user_id}", account.token)
        assert data.json()["flashcardCount"] == 100


@pytest.mark.parametrize(
    "user_id",
    ["bad id!", "x" * 300, "semi;colon", "quote'd", "x" * 255 + "%0A"],
    ids=["space-bang", "300-chars", "semicolon", "quote", "final-newline"],
)
async def test_invalid_user_id_is_400(livegate: Livegate, user_id: str):
    account = await livegate.account()
    for method, body in (("GET", None), ("POST", {"userName": "x"})):
        for token in (account.token, None):
            response = await call(livegate, method, f"/api/user-data/{user_id}", token, json=body)
            assert response.status_code == 400, response.text
            assert response.json() == {"error": "Invalid user ID"}
    for path in ("/api/generate-flashcard", "/api/increment-flashcard-count"):
        refused = ({"userId": "bad id!"}, {"userId": "x" * 300}, {}, {"userId": 12})
        for body in (*refused, {"userId": "abc\n"}):
            response = await call(livegate, "POST", path, account.token, json=body)
            assert response.status_code == 400, response.text
            assert response.json() == {"error": "Invalid user ID"}


async def test_user_data_body_must_name_the_same_user(livegate: Livegate):
    account = await livegate.account()
    path = f"/api/user-data/{account.user.id}"
    mismatch = await call(
        livegate, "POST", path, account.token, json={"userId": "someone-else", "userName": "x"}
    )
    assert mismatch.status_code == 400
    assert mismatch.json() == {"error": "Invalid user ID"}
    anki_error(await call(livegate, "POST", path, account.token, json={"userName": 12}), 400)


async def test_a_save_changes_only_the_fields_it_sends(livegate: Livegate):
    account = await livegate.account()
    path = f"/api/user-data/{account.user.id}"

    async def save(body: dict[str, Any]) -> dict[str, Any]:
        response = await call(livegate, "POST", path, account.token, json=body)
        assert response.status_code == 200, response.text
        got = await call(livegate, "GET", path, account.token)
        assert got.json() == response.json()
        return {name: got.json()[name] for name in ("userName", "userEmail")}

    john = {"userName": "John Doe", "userEmail": "john@example.com"}
    assert await save(john) == john
    assert await save({"userName": "Johnny"}) == {**john, "userName": "Johnny"}
    assert await save({"userId": account.user.id}) == {**john, "userName": "Johnny"}
    # null clears a field; an empty string is kept as sent.
    assert await save({"userEmail": None}) == {"userName": "Johnny", "userEmail": None}
    assert await save({"userName": ""}) == {"userName": "", "userEmail": None}
    assert await save({"userEmail": "j@example.com"}) == {
        "userName": "",
        "userEmail": "j@example.com",
    }


@pytest.mark.parametrize(
    "field, longest, value",
    [
        ("userName", 200, 12),
        ("userName", 200, True),
        ("userName", 200, ["John"]),
        ("userName", 200, {"first": "John"}),
        ("userName", 200, "x" * 201),
        ("userEmail", 320, 12),
        ("userEmail", 320, ["john@example.com"]),
        ("userEmail", 320, "j" * 309 + "@example.com"),
    ],
    ids=[
        "name-int",
        "name-bool",
        "name-array",
        "name-object",
        "name-201-chars",
        "email-int",
        "email-array",
        "email-321-chars",
    ],
)
async def test_a_profile_value_too_long_or_not_a_string_is_400(
    livegate: Livegate, field: str, longest: int, value: Any
):
    account = await livegate.account()
    path = f"/api/user-data/{account.user.id}"
    # The longest values are kept whole. Counted in characters, as the columns count:
    # each "é" is two bytes in UTF-8.
    saved = {"userName": "é" * 200, "userEmail": "é" * 308 + "@example.com"}
    first = await call(livegate, "POST", path, account.token, json=saved)
    assert first.status_code == 200, first.text
    assert {name: first.json()[name] for name in saved} == saved

    other = "userEmail" if field == "userName" else "userName"
    body = {other: "changed", field: value}
    error = anki_error(await call(livegate, "POST", path, account.token, json=body), 400)
    assert field in error and str(longest) in error
    # Nothing of a refused save is written, not even its valid field.
    got = await call(livegate, "GET", path, account.token)
    assert {name: got.json()[name] for name in saved} == saved


@pytest.mark.parametrize("longest", [False, True], ids=["numeric-id", "255-character-id"])
async def test_open_mode_user_data_needs_no_credentials(
    start_livegate: StartLivegate, longest: bool
):
    livegate = await start_livegate(anki=AnkiConfig(open_mode=True))
    user_id = f"1{uuid.uuid4().int % 10**15}"
    if longest:  # its counters' subject would not fit the column as it is
        user_id = user_id.ljust(255, "x")
    path = f"/api/user-data/{user_id}"
    saved = await call(
        livegate,
        "POST",
        path,
        json={"userId": user_id, "userName": "John Doe", "userEmail": "john@example.com"},
    )
    assert saved.status_code == 200, saved.text
    counted = await call(
        livegate, "POST", "/api/increment-flashcard-count", json={"userId": user_id}
    )
    assert counted.json() == {"success": True, "newCount": 1, "remainingCards": 99}
    can = await call(livegate, "POST", "/api/generate-flashcard", json={"userId": user_id})
    assert can.json() == {"canGenerate": True}
    got = await call(livegate, "GET", path)
    assert got.json() == {
        "userId": user_id,
        "userName": "John Doe",
        "userEmail": "john@example.com",
        "flashcardCount": 1,
        "freeGenerationLimit": 100,
        "regenerationLimit": 5,
    }
    # Invalid ids are still refused.
    bad = await call(livegate, "GET", "/api/user-data/bad%20id!")
    assert bad.status_code == 400 and bad.json() == {"error": "Invalid user ID"}


# --- the generation counter --------------------------------------------------------


async def test_generate_flashcard_until_the_limit(livegate: Livegate):
    account = await livegate.account()
    uid = account.user.id

    async def can_generate(**extra: Any) -> httpx.Response:
        return await call(
            livegate,
            "POST",
            "/api/generate-flashcard",
            account.token,
            json={"userId": uid, **extra},
        )

    first = await can_generate(isOwnCredits=False)
    assert first.status_code == 200
    assert first.json() == {"canGenerate": True}
    assert first.headers["access-control-allow-origin"] == "*"
    assert (await can_generate()).json() == {"canGenerate": True}

    await set_generations(livegate, uid, 99)
    assert (await can_generate()).json() == {"canGenerate": True}
    last = await call(
        livegate, "POST", "/api/increment-flashcard-count", account.token, json={"userId": uid}
    )
    assert last.json() == {"success": True, "newCount": 100, "remainingCards": 0}

    refused = await can_generate(isOwnCredits=False)
    assert refused.status_code == 200
    assert refused.json() == {"canGenerate": False, "reason": "LIMIT_REACHED"}
    # The user's own credits bypass the free limit.
    assert (await can_generate(isOwnCredits=True)).json() == {"canGenerate": True}
    assert (await can_generate(isOwnCredits="yes")).status_code == 400

    # Past the limit nothing more is counted.
    over = await call(
        livegate, "POST", "/api/increment-flashcard-count", account.token, json={"userId": uid}
    )
    assert over.status_code == 429
    assert over.json() == {"canGenerate": False, "reason": "LIMIT_REACHED"}
    data = await call(livegate, "GET", f"/api/user-data/{uid}", account.token)
    assert data.json()["flashcardCount"] == 100


async def test_increment_counts_up(livegate: Livegate):
    account = await livegate.account()
    for n in range(1, 6):
        response = await call(
            livegate,
            "POST",
            "/api/increment-flashcard-count",
            account.token,
            json={"userId": account.user.id},
        )
        assert response.status_code == 200, response.text
        assert response.json() == {"success": True, "newCount": n, "remainingCards": 100 - n}
        assert response.headers["access-control-allow-origin"] == "*"


async def test_generation_routes_are_secure_by_default(livegate: Livegate):
    owner = await livegate.account()
    other = await livegate.account()
    for path in ("/api/generate-flashcard", "/api/increment-flashcard-count"):
        anki_error(await call(livegate, "POST", path, json={"userId": owner.user.id}), 401)
        anki_error(
            await call(livegate, "POST", path, other.token, json={"userId": owner.user.id}), 403
        )
    data = await call(livegate, "GET", f"/api/user-data/{owner.user.id}", owner.token)
    assert data.json()["flashcardCount"] == 0


async def test_100_concurrent_increments_at_95_admit_exactly_5(livegate: Livegate):
    account = await livegate.account()
    uid = account.user.id
    await set_generations(livegate, uid, 95)
    async with httpx.AsyncClient(
        base_url=livegate.base_url,
        timeout=60,
        limits=httpx.Limits(max_connections=100),
    ) as http:
        responses = await asyncio.gather(
            *(
                http.post(
                    "/api/increment-flashcard-count",
                    json={"userId": uid},
                    headers=bearer(account.token),
                )
                for _ in range(100)
            )
        )
    admitted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert len(admitted) == 5, [r.text for r in responses[:10]]
    assert sorted(r.json()["newCount"] for r in admitted) == [96, 97, 98, 99, 100]
    assert sorted(r.json()["remainingCards"] for r in admitted) == [0, 1, 2, 3, 4]
    assert all(r.json()["success"] is True for r in admitted)
    assert all(r.status_code == 429 for r in refused)
    assert all(r.json() == {"canGenerate": False, "reason": "LIMIT_REACHED"} for r in refused)

    data = await call(livegate, "GET", f"/api/user-data/{uid}", account.token)
    assert data.json()["flashcardCount"] == 100
    async with livegate.services.engine.connect() as conn:
        used = (
            await conn.execute(
                sa.select(quota_counters.c.used).where(
                    quota_counters.c.user_id == uid,
                    quota_counters.c.metric == GENERATIONS_METRIC,
                )
            )
        ).scalar_one()
    assert used == 100


async def test_concurrent_increments_from_zero_lose_no_count(livegate: Livegate):
    account = await livegate.account()
    uid = account.user.id
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=60) as http:
        responses = await asyncio.gather(
            *(
                http.post(
                    "/api/increment-flashcard-count",
                    json={"userId": uid},
                    headers=bearer(account.token),
                )
                for _ in range(30)
            )
        )
    assert all(r.status_code == 200 for r in responses)
    assert sorted(r.json()["newCount"] for r in responses) == list(range(1, 31))
    data = await call(livegate, "GET", f"/api/user-data/{uid}", account.token)
    assert data.json()["flashcardCount"] == 30


# --- CORS ---------------------------------------------------------------------------


def access_control(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("access-control-")}


@pytest.mark.parametrize(
    "path",
    [
        "/api/chat",
        "/api/limits",
        "/api/user-data/x",
        "/api/models",
        "/api/generate-flashcard",
        "/api/increment-flashcard-count",
        "/api/check-connectivity",
    ],
)
async def test_preflight_is_exactly_as_documented(livegate: Livegate, path: str):
    response = await call(
        livegate,
        "OPTIONS",
        path,
        headers={
            "Origin": EXTENSION_ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization",
        },
    )
    assert response.status_code in (200, 204)
    assert access_control(response) == OPEN_PREFLIGHT


async def test_anki_responses_carry_the_open_origin(livegate: Livegate):
    account = await livegate.account()
    origin = {"Origin": EXTENSION_ORIGIN}
    responses = [
        await call(livegate, "GET", "/api/limits", headers=origin),
        await call(livegate, "GET", "/api/limits"),
        await call(livegate, "GET", f"/api/user-data/{account.user.id}", account.token),
        # Errors too, so the extension can read them.
        await call(livegate, "POST", "/api/chat", json={"messages": []}, headers=origin),
        await call(livegate, "GET", "/api/user-data/someone", headers=origin),
        await call(livegate, "GET", "/api/increment-flashcard-count", headers=origin),
    ]
    assert [r.status_code for r in responses] == [200, 200, 200, 401, 401, 405]
    for response in responses:
        assert response.headers["access-control-allow-origin"] == "*", response.request.url


async def test_other_routes_answer_only_configured_origins(
    start_livegate: StartLivegate, backend: Backend
):
    listed = "chrome-extension://livegate-listed"
    default = await start_livegate()
    configured = await start_livegate(
        server=ServerConfig(cors_origins=[listed], redis_prefix=backend.redis_prefix)
    )
    account = await default.account()

    async def quota(livegate: Livegate, origin: str) -> httpx.Response:
        return await call(
            livegate, "GET", "/api/usage/quota", account.token, headers={"Origin": origin}
        )

    for livegate in (default, configured):
        response = await quota(livegate, "https://random.example")
        assert response.status_code == 200, response.text
        assert "access-control-allow-origin" not in response.headers
    response = await quota(default, listed)
    assert "access-control-allow-origin" not in response.headers

    allowed = await quota(configured, listed)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == listed
    preflight = await call(
        configured,
        "OPTIONS",
        "/api/usage/quota",
        headers={"Origin": listed, "Access-Control-Request-Method": "GET"},
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == listed
    refused = await call(
        configured,
        "OPTIONS",
        "/api/usage/quota",
        headers={"Origin": "https://random.example", "Access-Control-Request-Method": "GET"},
    )
    assert refused.headers.get("access-control-allow-origin") is None
    # The Anki routes stay open to every origin whatever the list.
    anki = await call(configured, "GET", "/api/limits", headers={"Origin": "https://x.example"})
    assert anki.headers["access-control-allow-origin"] == "*"


# --- wrong methods ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/api/increment-flashcard-count", "POST"),
        ("GET", "/api/generate-flashcard", "POST"),
        ("DELETE", "/api/limits", "GET"),
        ("POST", "/api/models", "GET"),
        ("PUT", "/api/user-data/someone", "GET"),
        ("POST", "/api/check-connectivity", "GET"),
        ("GET", "/api/chat", "POST"),
        ("POST", "/oauth-redirect", "GET"),
    ],
)
async def test_wrong_method_is_405(livegate: Livegate, method: str, path: str, allowed: str):
    response = await call(livegate, method, path)
    assert response.status_code == 405, response.text
    assert allowed in response.headers["allow"]


# --- the OAuth redirect page -------------------------------------------------------------


async def test_oauth_redirect_serves_the_page(livegate: Livegate):
    response = await call(livegate, "GET", "/oauth-redirect")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "window.opener.postMessage({token: token}" in page
    assert "browser.runtime.sendMessage" in page
    assert "access_token" in page  # read from the fragment in the browser

    with_token = await call(livegate, "GET", "/oauth-redirect?access_token=ya29.a0Af-token_1")
    assert with_token.status_code == 200
    assert '"ya29.a0Af-token_1"' in with_token.text


async def test_oauth_redirect_hands_the_token_only_to_the_configured_origins(
    livegate: Livegate, start_livegate: StartLivegate
):
    """Unconfigured, any opener gets it, as in the spec; configured, the browser
    delivers it only to an opener of one of those origins."""
    default = await call(livegate, "GET", "/oauth-redirect")
    assert 'for (const origin of ["*"])' in default.text
    origins = ["chrome-extension://abcdefghijklmnop", "https://app.example:8443"]
    limited = await start_livegate(anki=AnkiConfig(opener_origins=origins))
    page = (await call(limited, "GET", "/oauth-redirect")).text
    assert f"for (const origin of {json.dumps(origins)})" in page
    assert '"*"' not in page


async def test_oauth_redirect_escapes_the_token(livegate: Livegate):
    attack = "</script><script>alert(1)</script>"
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=WAIT) as http:
        response = await http.get("/oauth-redirect", params={"access_token": attack})
        quote = await http.get("/oauth-redirect", params={"access_token": '";alert(1);//'})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "</script><script>alert(1)" not in response.text
    assert "<script>alert(1)" not in response.text
    assert response.text.count("</script>") == 1  # only the page's own
    assert "\\u003c/script\\u003e\\u003cscript\\u003ealert(1)" in response.text
    # A quote cannot end the string either.
    assert quote.status_code == 200
    assert '"\\";alert(1);//"' in quote.text


async def test_oauth_redirect_error_is_400(livegate: Livegate):
    response = await call(livegate, "GET", "/oauth-redirect?error=access_denied")
    assert response.status_code == 400
    assert response.text == "Authentication failed"
    empty = await call(livegate, "GET", "/oauth-redirect?access_token=")
    assert empty.status_code == 400
    assert empty.text == "Authentication failed"


@pytest.mark.parametrize(
    "url", ["/oauth-redirect?access_token=%00", "/oauth-redirect?access_token=a%00b"]
)
async def test_oauth_redirect_refused_before_the_route_is_plain_text_too(
    livegate: Livegate, url: str
):
    response = await call(livegate, "GET", url)
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == "Authentication failed"
    assert response.headers["x-request-id"]


async def test_oauth_redirect_wrong_method_is_plain_text(livegate: Livegate):
    response = await call(livegate, "POST", "/oauth-redirect")
    assert response.status_code == 405
    assert response.headers["content-type"].startswith("text/plain")
    assert "GET" in response.headers["allow"]
