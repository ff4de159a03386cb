"""Bad input gets a clear 4xx in the right envelope, never a 500; request ids everywhere."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from app.core.config import ServerConfig
from app.core.routing import QUOTED_MODEL_LENGTH
from app.core.tables import usage_logs
from tests.conftest import FAKE_MODEL, Backend, Livegate, StartLivegate
from tests.fake_upstream import FakeUpstream

HI = [{"role": "user", "content": "hi"}]


def auth(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["code"] is None or isinstance(error["code"], str)
    return error  # type: ignore[no-any-return]


def assert_sokuji_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["error"], str) and body["error"]
    assert set(body) <= {"error", "details", "retryAfter"}
    assert isinstance(body.get("details", {}), dict)
    return body  # type: ignore[no-any-return]


async def post_chat(
    livegate: Livegate, key: str, body: Any = None, *, raw: bytes | None = None, **headers: str
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        if raw is not None:
            return await http.post(
                "/v1/chat/completions",
                content=raw,
                headers=auth(key, **{"content-type": "application/json", **headers}),
            )
        return await http.post("/v1/chat/completions", json=body, headers=auth(key, **headers))


async def usage_rows(livegate: Livegate, user_id: str) -> list[sa.Row]:
    async with livegate.services.engine.connect() as conn:
        result = await conn.execute(sa.select(usage_logs).where(usage_logs.c.user_id == user_id))
        return list(result)


# --- The chat body ------------------------------------------------------------------


async def test_malformed_json_is_400(livegate: Livegate):
    account = await livegate.account()
    error = assert_openai_error(
        await post_chat(livegate, account.api_key, raw=b'{"model": "x",'), 400
    )
    assert error["type"] == "invalid_request_error"
    assert "JSON" in error["message"]
    assert await usage_rows(livegate, account.user.id) == []


async def test_empty_body_is_400(livegate: Livegate):
    account = await livegate.account()
    assert_openai_error(await post_chat(livegate, account.api_key, raw=b""), 400)


@pytest.mark.parametrize("body", [[1, 2], "text", 42, None, True])
async def test_body_not_an_object_is_400(livegate: Livegate, body: Any):
    account = await livegate.account()
    error = assert_openai_error(
        await post_chat(livegate, account.api_key, raw=json.dumps(body).encode()), 400
    )
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("model", ["<missing>", None, "", 7, ["fake-model"]])
async def test_missing_or_bad_model_is_400_with_param(livegate: Livegate, model: Any):
    account = await livegate.account()
    body: dict[str, Any] = {"messages": HI}
    if model != "<missing>":
        body["model"] = model
    error = assert_openai_error(await post_chat(livegate, account.api_key, body), 400)
    assert error["param"] == "model"
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ("hi", "messages"),
        ({"role": "user"}, "messages"),
        ([], "messages"),
        (None, "messages"),
        (["hi"], "messages[0]"),
        ([{"content": "no role"}], "messages[0]"),
        ([{"role": "user", "content": "ok"}, {"role": 5}], "messages[1]"),
    ],
)
async def test_messages_of_the_wrong_type_are_400(livegate: Livegate, messages: Any, param: str):
    account = await livegate.account()
    body = {"model": FAKE_MODEL, "messages": messages}
    error = assert_openai_error(await post_chat(livegate, account.api_key, body), 400)
    assert error["param"] == param


@pytest.mark.parametrize("stream", ["yes", 1, "true", None])
async def test_non_boolean_stream_is_400(livegate: Livegate, stream: Any):
    account = await livegate.account()
    body = {"model": FAKE_MODEL, "messages": HI, "stream": stream}
    error = assert_openai_error(await post_chat(livegate, account.api_key, body), 400)
    assert error["param"] == "stream"


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens", "n"])
@pytest.mark.parametrize("value", [0, -3, "5", 1.5, True])
async def test_non_positive_integer_limits_are_400(livegate: Livegate, name: str, value: Any):
    account = await livegate.account()
    body = {"model": FAKE_MODEL, "messages": HI, name: value}
    error = assert_openai_error(await post_chat(livegate, account.api_key, body), 400)
    assert error["param"] == name


async def test_stream_options_not_an_object_is_400(livegate: Livegate):
    account = await livegate.account()
    body = {"model": FAKE_MODEL, "messages": HI, "stream": True, "stream_options": "usage"}
    error = assert_openai_error(await post_chat(livegate, account.api_key, body), 400)
    assert error["param"] == "stream_options"


@pytest.mark.parametrize("stop", [5, True, {"END": 1}, [1], ["END", None]])
async def test_stop_that_is_no_string_or_strings_is_400(
    livegate: Livegate, fake_upstream: FakeUpstream, stop: Any
):
    """Refused here for every provider: Anthropic's translation reads `stop` itself."""
    account = await livegate.account()
    sent = len(fake_upstream.requests)
    body = {"model": FAKE_MODEL, "messages": HI, "stop": stop}
    error = assert_openai_error(await post_chat(livegate, account.api_key, body), 400)
    assert error["param"] == "stop"
    assert len(fake_upstream.requests) == sent
    assert await usage_rows(livegate, account.user.id) == []


@pytest.mark.parametrize("stop", ["END", ["END", "\n\n"], [], None])
async def test_stop_string_or_strings_is_relayed(
    livegate: Livegate, fake_upstream: FakeUpstream, stop: Any
):
    account = await livegate.account()
    body = {"model": FAKE_MODEL, "messages": HI, "stop": stop}
    response = await post_chat(livegate, account.api_key, body)
    assert response.status_code == 200, response.text
    assert fake_upstream.requests[-1]["stop"] == stop


async def test_valid_limits_are_accepted(livegate: Livegate):
    # Control for the refusals above.
    account = await livegate.account()
    body = {"model": FAKE_MODEL, "messages": HI, "max_tokens": 1, "n": 1, "stream": False}
    response = await post_chat(livegate, account.api_key, body)
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion"


@pytest.mark.parametrize("stream", [False, True])
async def test_unknown_model_is_404_model_not_found(livegate: Livegate, stream: bool):
    account = await livegate.account()
    body = {"model": "no-such-model", "messages": HI, "stream": stream}
    error = assert_openai_error(await post_chat(livegate, account.api_key, body), 404)
    assert error["code"] == "model_not_found"
    assert error["type"] == "invalid_request_error"
    assert "no-such-model" in error["message"]
    assert await usage_rows(livegate, account.user.id) == []


async def test_a_long_unknown_model_is_quoted_cut(livegate: Livegate):
    account = await livegate.account()
    body = {"model": "m" * 100_000, "messages": HI}
    error = assert_openai_error(await post_chat(livegate, account.api_key, body), 404)
    assert error["code"] == "model_not_found"
    assert f"`{'m' * QUOTED_MODEL_LENGTH}…`" in error["message"]
    assert len(error["message"]) < QUOTED_MODEL_LENGTH + 100


async def test_error_before_auth_check_does_not_leak(livegate: Livegate):
    # Without a credential the body is not even looked at: 401, not 400.
    async with httpx.AsyncClient(base_url=livegate.base_url) as http:
        response = await http.post("/v1/chat/completions", content=b"{bad json")
    error = assert_openai_error(response, 401)
    assert error["type"] == "authentication_error"


# --- Body size ------------------------------------------------------------------------


@pytest.fixture
async def small_body_livegate(start_livegate: StartLivegate, backend: Backend) -> Livegate:
    return await start_livegate(
        server=ServerConfig(max_body_bytes=2048, redis_prefix=backend.redis_prefix)
    )


def big_body(size: int) -> bytes:
    return json.dumps(
        {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "x" * size}]}
    ).encode()


async def test_body_over_limit_with_content_length_is_413(small_body_livegate: Livegate):
    livegate = small_body_livegate
    account = await livegate.account()
    raw = big_body(4000)
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        request = http.build_request(
            "POST",
            "/v1/chat/completions",
            content=raw,
            headers=auth(account.api_key, **{"content-type": "application/json"}),
        )
        assert request.headers["content-length"] == str(len(raw))
        response = await http.send(request)
    error = assert_openai_error(response, 413)
    assert error["code"] == "payload_too_large"
    assert "X-Request-Id" in response.headers
    assert await usage_rows(livegate, account.user.id) == []


async def test_chunked_body_over_limit_is_413(small_body_livegate: Livegate):
    livegate = small_body_livegate
    account = await livegate.account()
    raw = big_body(4000)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(raw), 500):
            yield raw[start : start + 500]

    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        request = http.build_request(
            "POST",
            "/v1/chat/completions",
            content=chunks(),
            headers=auth(account.api_key, **{"content-type": "application/json"}),
        )
        assert "content-length" not in request.headers
        assert request.headers["transfer-encoding"] == "chunked"
        response = await http.send(request)
    error = assert_openai_error(response, 413)
    assert error["code"] == "payload_too_large"
    assert await usage_rows(livegate, account.user.id) == []


async def test_chunked_body_under_limit_is_accepted(small_body_livegate: Livegate):
    livegate = small_body_livegate
    account = await livegate.account()
    raw = big_body(1000)
    assert len(raw) < 2048

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(raw), 100):
            yield raw[start : start + 100]

    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        response = await http.post(
            "/v1/chat/completions",
            content=chunks(),
            headers=auth(account.api_key, **{"content-type": "application/json"}),
        )
    assert response.status_code == 200, response.text


async def test_server_still_serves_after_oversized_bodies(small_body_livegate: Livegate):
    livegate = small_body_livegate
    account = await livegate.account()
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        for _ in range(3):
            response = await http.post(
                "/v1/chat/completions",
                content=big_body(20_000),
                headers=auth(account.api_key, **{"content-type": "application/json"}),
            )
            assert response.status_code == 413
        ok = await http.post(
            "/v1/chat/completions",
            json={"model": FAKE_MODEL, "messages": HI},
            headers=auth(account.api_key),
        )
    assert ok.status_code == 200, ok.text


# --- Headers ------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("X-Device-Id", "d" * 300),
        ("X-Device-Id", "d" * 129),
        ("X-Device-Id", "has space"),
        ("X-Platform", "p" * 129),
        ("X-Platform", "p" * 65),  # its column holds 64: PostgreSQL would refuse the row
        ("X-Platform", "tab\there"),
    ],
    ids=[
        "device-too-long",
        "device-129",
        "device-space",
        "platform-too-long",
        "platform-65",
        "platform-tab",
    ],
)
async def test_invalid_client_headers_are_400(
    livegate: Livegate, stream: bool, header: str, value: str
):
    account = await livegate.account()
    body = {"model": FAKE_MODEL, "messages": HI, "stream": stream}
    error = assert_openai_error(
        await post_chat(livegate, account.api_key, body, **{header: value}), 400
    )
    assert header in error["message"] or header.lower() in error["message"]
    assert await usage_rows(livegate, account.user.id) == []


async def test_valid_client_headers_are_recorded(livegate: Livegate):
    account = await livegate.account()
    body = {"model": FAKE_MODEL, "messages": HI}
    response = await post_chat(
        livegate,
        account.api_key,
        body,
        **{"X-Device-Id": "device_123", "X-Platform": "chrome-extension"},
    )
    assert response.status_code == 200, response.text
    [row] = await usage_rows(livegate, account.user.id)
    assert (row.device_id, row.platform) == ("device_123", "chrome-extension")


async def test_client_headers_of_the_longest_length_are_recorded(livegate: Livegate):
    account = await livegate.account()
    body = {"model": FAKE_MODEL, "messages": HI}
    device, platform = "d" * 128, "p" * 64
    response = await post_chat(
        livegate, account.api_key, body, **{"X-Device-Id": device, "X-Platform": platform}
    )
    assert response.status_code == 200, response.text
    [row] = await usage_rows(livegate, account.user.id)
    assert (row.device_id, row.platform) == (device, platform)


# --- Routing ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/nope", "/api/user/nope", "/nope", "/ws/nope"])
async def test_unknown_path_on_sokuji_surface_is_404(livegate: Livegate, path: str):
    async with httpx.AsyncClient(base_url=livegate.base_url) as http:
        response = await http.get(path)
    body = assert_sokuji_error(response, 404)
    assert body["details"]["code"] == "not_found"
    assert "X-Request-Id" in response.headers


@pytest.mark.parametrize("path", ["/v1/nope", "/v1/chat/completion", "/v1"])
async def test_unknown_path_on_openai_surface_is_404(livegate: Livegate, path: str):
    async with httpx.AsyncClient(base_url=livegate.base_url) as http:
        response = await http.post(path, json={})
    error = assert_openai_error(response, 404)
    assert error["code"] == "not_found"
    assert "X-Request-Id" in response.headers


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("POST", "/api/user/profile", "GET"),
        ("DELETE", "/api/user/api-key", "GET"),
        ("PUT", "/api/usage/quota", "GET"),
    ],
)
async def test_wrong_method_on_sokuji_surface_is_405(
    livegate: Livegate, method: str, path: str, allowed: str
):
    account = await livegate.account()
    async with httpx.AsyncClient(base_url=livegate.base_url) as http:
        response = await http.request(method, path, headers=auth(account.token))
    body = assert_sokuji_error(response, 405)
    assert body["details"]["code"] == "method_not_allowed"
    assert allowed in response.headers["allow"]
    assert "X-Request-Id" in response.headers


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/v1/chat/completions", "POST"),
        ("PUT", "/v1/chat/completions", "POST"),
        ("POST", "/v1/models", "GET"),
    ],
)
async def test_wrong_method_on_openai_surface_is_405(
    livegate: Livegate, method: str, path: str, allowed: str
):
    account = await livegate.account()
    async with httpx.AsyncClient(base_url=livegate.base_url) as http:
        response = await http.request(method, path, headers=auth(account.api_key))
    error = assert_openai_error(response, 405)
    assert error["code"] == "method_not_allowed"
    assert allowed in response.headers["allow"]


# --- Request ids ----------------------------------------------------------------------


async def test_every_response_carries_a_request_id(livegate: Livegate):
    account = await livegate.account()
    calls: list[tuple[str, str, dict[str, str], Any]] = [
        ("GET", "/v1/models", auth(account.api_key), None),
        ("GET", "/v1/models", {}, None),
        ("GET", "/api/usage/quota", auth(account.token), None),
        ("GET", "/api/usage/quota", auth("bad"), None),
        ("GET", "/api/nope", {}, None),
        ("DELETE", "/v1/models", {}, None),
        ("POST", "/v1/chat/completions", auth(account.api_key), {"model": FAKE_MODEL}),
        (
            "POST",
            "/v1/chat/completions",
            auth(account.api_key),
            {"model": FAKE_MODEL, "messages": HI},
        ),
        ("POST", "/v1/chat/completions", auth(account.api_key), {"model": "x", "messages": HI}),
    ]
    seen: set[str] = set()
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        for method, path, headers, body in calls:
            response = await http.request(method, path, headers=headers, json=body)
            request_id = response.headers.get("x-request-id")
            assert request_id, (method, path, response.status_code)
            seen.add(request_id)
    # Generated ids are unique per request.
    assert len(seen) == len(calls)


@pytest.mark.parametrize(
    "client_id", ["client-req-123", "a1b2c3d4e5f6", "trace:span.01_x", "r" * 128]
)
async def test_sane_client_request_id_is_echoed(livegate: Livegate, client_id: str):
    account = await livegate.account()
    async with httpx.AsyncClient(base_url=livegate.base_url) as http:
        ok = await http.get(
            "/v1/models", headers=auth(account.api_key, **{"X-Request-Id": client_id})
        )
        err = await http.get("/api/nope", headers={"X-Request-Id": client_id})
    assert ok.headers["x-request-id"] == client_id
    assert err.headers["x-request-id"] == client_id


@pytest.mark.parametrize(
    "client_id", ["r" * 129, "has space", "semi;colon", 'quote"d', "<script>", "é"]
)
async def test_insane_client_request_id_is_replaced(livegate: Livegate, client_id: str):
    account = await livegate.account()
    async with httpx.AsyncClient(base_url=livegate.base_url) as http:
        response = await http.get(
            "/v1/models",
            headers=[
                ("Authorization", f"Bearer {account.api_key}"),
                ("X-Request-Id", client_id.encode("latin-1")),
            ],
        )
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    assert request_id and request_id != client_id
    assert len(request_id) <= 128 and " " not in request_id


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
@pytest.mark.parametrize("stream", [False, True])
async def test_usage_row_carries_the_client_request_id(livegate: Livegate, stream: bool):
    account = await livegate.account()
    client_id = f"sokuji-{uuid.uuid4().hex}"
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        response = await http.post(
            "/v1/chat/completions",
            json={"model": FAKE_MODEL, "messages": HI, "stream": stream},
            headers=auth(account.api_key, **{"X-Request-Id": client_id}),
        )
        assert response.status_code == 200, response.text
        assert response.headers["x-request-id"] == client_id
    rows: list[sa.Row] = []
    for _ in range(300):
        rows = await usage_rows(livegate, account.user.id)
        if rows and rows[0].status == "completed":
            break
        await asyncio.sleep(0.02)
    [row] = rows
    assert row.request_id == client_id
    assert row.status == "completed"


async def test_generated_request_id_is_the_usage_row_id(livegate: Livegate):
    account = await livegate.account()
    response = await post_chat(livegate, account.api_key, {"model": FAKE_MODEL, "messages": HI})
    assert response.status_code == 200
    [row] = await usage_rows(livegate, account.user.id)
    assert row.request_id == response.headers["x-request-id"]


# --- Never a 500 --------------------------------------------------------------------

_VALID = {"model": FAKE_MODEL, "messages": HI}


def _with(**changes: Any) -> bytes:
    return json.dumps({**_VALID, **changes}).encode()


BAD_BODIES = [
    pytest.param(b"", id="empty"),
    pytest.param(b" ", id="whitespace"),
    pytest.param(b"null", id="null"),
    pytest.param(b"0", id="zero"),
    pytest.param(b'"model"', id="string"),
    pytest.param(b"[]", id="array"),
    pytest.param(b"{}", id="empty-object"),
    pytest.param(b"{", id="truncated"),
    pytest.param(b'{"model": "fake-model"', id="truncated-object"),
    pytest.param(b"{'model': 'x'}", id="single-quotes"),
    pytest.param(b'{"model": "fake-model",}', id="trailing-comma"),
    pytest.param(b"\xff\xfe\xfd", id="binary"),
    pytest.param(b'{"model": "\xc3\x28"}', id="invalid-utf8"),
    pytest.param(b'{"model": null, "messages": null}', id="nulls"),
    pytest.param(_with(model={"id": "x"}), id="model-object"),
    pytest.param(_with(model="x" * 5000), id="model-huge-unknown"),
    pytest.param(_with(messages=[None]), id="message-null"),
    pytest.param(_with(messages=[[]]), id="message-array"),
    pytest.param(_with(messages=[{"role": None}]), id="role-null"),
    pytest.param(_with(messages={"0": {"role": "user"}}), id="messages-object"),
    pytest.param(_with(stream="false"), id="stream-string"),
    pytest.param(_with(stream=[True]), id="stream-array"),
    pytest.param(_with(stream=True, stream_options=[]), id="stream-options-array"),
    pytest.param(_with(stream=True, stream_options=1), id="stream-options-int"),
    pytest.param(_with(max_tokens=None, n=0), id="n-zero"),
    pytest.param(_with(max_tokens=-(10**30)), id="max-tokens-huge-negative"),
    pytest.param(_with(max_tokens={"a": 1}), id="max-tokens-object"),
    pytest.param(_with(max_completion_tokens=False), id="max-completion-tokens-bool"),
    pytest.param(
        b'{"model": "fake-model", "messages": [{"role": "user"}], "max_tokens": '
        + b"9" * 5000
        + b"}",
        id="int-too-many-digits",
    ),
    pytest.param(
        b'{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], '
        b'"temperature": NaN}',
        id="nan",
    ),
    pytest.param(
        b'{"model": "fake-model", "stream": true, "messages": [{"role": "user", '
        b'"content": "hi"}], "temperature": Infinity}',
        id="infinity-stream",
    ),
    pytest.param(
        b'{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "top_p": 1e400}',
        id="float-overflow",
    ),
    pytest.param(
        b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
        id="surrogate-model",
    ),
    pytest.param(
        b'{"model": "fake-model", "messages": [{"role": "user", "content": "\\udfff"}]}',
        id="surrogate-content",
    ),
    pytest.param(
        b"[" * 100_000,
        id="deeply-nested-array",
    ),
    pytest.param(
        b'{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "x": '
        + b'{"a": ' * 50_000
        + b"1"
        + b"}" * 50_001,
        id="deeply-nested-object",
    ),
    pytest.param(
        b'{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "metadata": '
        + b"[" * 930
        + b"]" * 930
        + b"}",
        id="nested-past-what-encodes",
    ),
]


@pytest.mark.parametrize("raw", BAD_BODIES)
async def test_bad_bodies_get_a_4xx_never_a_500(livegate: Livegate, raw: bytes):
    account = await livegate.account()
    response = await post_chat(livegate, account.api_key, raw=raw)
    assert 400 <= response.status_code < 500, response.text
    assert response.headers.get("x-request-id")
    assert_openai_error(response, response.status_code)
    # A refused request leaves no usage row, and the server keeps serving.
    assert await usage_rows(livegate, account.user.id) == []
    ok = await post_chat(livegate, account.api_key, _VALID)
    assert ok.status_code == 200, ok.text


# --- Unexpected failures ------------------------------------------------------------


async def break_quota_table(livegate: Livegate) -> None:
    """A real storage failure: the table the quota is read from disappears."""
    async with livegate.services.engine.begin() as conn:
        await conn.execute(sa.text("ALTER TABLE quota_counters RENAME TO quota_counters_gone"))


async def test_internal_failure_is_500_in_envelope_without_internals(livegate: Livegate):
    account = await livegate.account()
    await break_quota_table(livegate)
    async with httpx.AsyncClient(base_url=livegate.base_url) as http:
        response = await http.get("/api/usage/quota", headers=auth(account.token))
    body = assert_sokuji_error(response, 500)
    assert body["details"]["code"] == "internal_error"
    assert "quota_counters" not in response.text
    assert "Traceback" not in response.text


async def test_internal_failure_response_carries_the_request_id(livegate: Livegate):
    account = await livegate.account()
    await break_quota_table(livegate)
    async with httpx.AsyncClient(base_url=livegate.base_url) as http:
        response = await http.get(
            "/api/usage/quota", headers=auth(account.token, **{"X-Request-Id": "trace-500"})
        )
    assert response.status_code == 500
    assert response.headers.get("x-request-id") == "trace-500"


# --- Clients that leave -------------------------------------------------------------


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


@pytest.mark.parametrize("path", ["/api/conversations", "/v1/chat/completions"])
async def test_a_client_that_leaves_mid_body_is_no_error(
    livegate: Livegate, caplog: pytest.LogCaptureFixture, path: str
):
    account = await livegate.account()
    requests_in_flight = livegate.server.server.server_state.tasks
    caplog.set_level(logging.INFO)
    _, writer = await asyncio.open_connection("127.0.0.1", livegate.server.port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: test\r\n"
        f"Authorization: Bearer {account.api_key}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n".encode()
        + b'{"a": '
    )
    await writer.drain()
    # The route must be waiting for the rest of the body when the client goes.
    await _until(lambda: bool(requests_in_flight))
    writer.close()
    await writer.wait_closed()
    await _until(lambda: not requests_in_flight)

    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert errors == []
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        response = await http.get("/api/conversations", headers=auth(account.api_key))
    assert response.status_code == 200, response.text


# --- NUL characters -----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_nul_characters_are_400_in_the_surfaces_envelope(start_livegate: StartLivegate):
    """PostgreSQL refuses NUL in text: caught as the client's error on every backend."""
    livegate = await start_livegate()
    account = await livegate.account()
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        in_path = await http.get("/api/v1/webhooks/wh-%00x", headers=auth(account.token))
        in_query = await http.get(
            "/api/conversations", params={"limit": "5\x00"}, headers=auth(account.token)
        )
        in_body = await http.post(
            "/api/conversations",
            json={"id": "c1", "title": "a\x00b"},
            headers=auth(account.token),
        )
        in_key = await http.post(
            "/api/conversations",
            json={"id": "c2", "title": "t", "x\x00": 1},
            headers=auth(account.token),
        )
        # A literal backslash-u text is no NUL and is kept as given.
        literal = await http.post(
            "/api/conversations",
            json={"id": "c3", "title": "\\u0000"},
            headers=auth(account.token),
        )
    assert in_path.status_code == 400, in_path.text
    assert in_path.json()["error"]["code"] == "VALIDATION_ERROR"  # the Playground's
    for response in (in_query, in_body, in_key):
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "BAD_REQUEST"  # Navi's
    assert literal.status_code in (200, 201), literal.text


# --- requests the HTTP parser refuses ----------------------------------------------------


async def _raw_exchange(livegate: Livegate, request: bytes) -> tuple[bytes, bytes]:
    """The head and body answered to `request`, sent as it is; the server then closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", livegate.server.port)
    try:
        writer.write(request)
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


@pytest.mark.parametrize(
    ("request_bytes", "envelope"),
    [
        (b"GET /v1/models HTTP/1.1\r\nHost: t\r\nContent-Length: 1x\r\n\r\n", "openai"),
        (b"GET /api/v1/usage HTTP/1.1\r\nHost: t\r\nX-A: a\x01b\r\n\r\n", "playground"),
        (b"GET /api/user/profile\xff HTTP/1.1\r\nHost: t\r\n\r\n", "sokuji"),
        (b"BREW /api/user/profile HTTP/1.1\r\nHost: t\r\n\r\n", "sokuji"),
        (b"GET /oauth-redirect HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n", "page"),
    ],
    ids=[
        "bad-content-length",
        "control-character-in-header",
        "raw-byte-in-path",
        "unknown-method",
        "page",
    ],
)
async def test_a_request_the_parser_refuses_is_a_400_in_its_surfaces_envelope(
    livegate: Livegate, request_bytes: bytes, envelope: str
):
    head, body = await _raw_exchange(livegate, request_bytes)
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 400 Bad Request"
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    assert headers[b"x-request-id"]
    assert headers[b"connection"] == b"close"
    assert int(headers[b"content-length"]) == len(body)
    if envelope == "page":
        assert body == b"Authentication failed"
        return
    error = json.loads(body)["error"]
    if envelope == "openai":
        assert error["type"] == "invalid_request_error"
        assert error["message"] == "Invalid HTTP request received."
    elif envelope == "playground":
        assert error["code"] == "VALIDATION_ERROR"
    else:
        assert error == "Invalid HTTP request received."
