"""The upstream transport (the relay's `post`, and httpx's interface), against small raw
HTTP servers on loopback."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx
import pytest
from yarl import URL

from app.core.upstream_transport import AiohttpTransport, client_timeout

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

OK_BODY = b'{"ok":true}'
LIMIT = 1 << 20


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """One request's head and body; None when the client closed the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length)


def ok_response(body: bytes = OK_BODY) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


class Server:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        finally:
            writer.close()


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[tuple[Server, str]]:
    server = Server(handler)
    listener = await asyncio.start_server(server._serve, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        listener.close()


@asynccontextmanager
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=AiohttpTransport(httpx.Limits(max_connections=10)),
        timeout=httpx.Timeout(5.0),
        trust_env=False,  # any proxy is the transport's own doing, not httpx's
    ) as http:
        yield http


@asynccontextmanager
async def transport() -> AsyncIterator[AiohttpTransport]:
    upstream = AiohttpTransport(httpx.Limits(max_connections=10))
    try:
        yield upstream
    finally:
        await upstream.aclose()


TIMEOUTS = client_timeout(connect=5.0, read=5.0, pool=5.0)
JSON = {"Content-Type": "application/json"}


async def test_requests_reuse_one_connection_and_carry_headers_and_body() -> None:
    server: Server

    async def answer_each(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await read_request(reader)) is not None:
            server.requests.append(request)
            writer.write(ok_response())
            await writer.drain()

    async with serving(answer_each) as (server, url), client() as http:
        for i in range(3):
            response = await http.post(
                f"{url}/v1/chat", json={"n": i}, headers={"Authorization": "Bearer sk-x"}
            )
            assert response.status_code == 200
            assert response.json() == {"ok": True}
            assert response.headers["content-type"] == "application/json"

    assert server.connections == 1
    head, body = server.requests[2]
    assert head.startswith(b"POST /v1/chat HTTP/1.1\r\n")
    headers = dict(
        (name.strip().lower(), value.strip())
        for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
    )
    assert headers[b"authorization"] == b"Bearer sk-x"
    assert body == b'{"n":2}'


async def test_a_streamed_body_arrives_as_it_is_written() -> None:
    second_part = asyncio.Event()

    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(b"6\r\ndata:1\r\n")
        await writer.drain()
        await second_part.wait()
        writer.write(b"6\r\ndata:2\r\n0\r\n\r\n")
        await writer.drain()

    async with (
        serving(chunked) as (_, url),
        client() as http,
        http.stream("POST", f"{url}/s", content=b"{}") as response,
    ):
        parts = response.aiter_bytes()
        assert await anext(parts) == b"data:1"  # before the rest was written
        second_part.set()
        assert b"".join([part async for part in parts]) == b"data:2"


def endless_then_ok() -> Handler:
    """On the first connection a chunked answer that never ends; on the next, a whole one."""
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        if connections == 1:
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            await writer.drain()
            await reader.read()  # until the client gives up on this connection
            return
        writer.write(ok_response())
        await writer.drain()

    return handler


async def test_a_half_read_stream_does_not_hand_its_connection_to_the_next_request() -> None:
    async with serving(endless_then_ok()) as (server, url), client() as http:
        async with http.stream("POST", f"{url}/s", content=b"{}") as response:
            assert await anext(response.aiter_bytes()) == b"first"
        response = await http.post(f"{url}/next", content=b"{}")
        assert response.json() == {"ok": True}
    assert server.connections == 2


async def test_refused_connection_is_connect_error() -> None:
    async with serving(lambda r, w: asyncio.sleep(0)) as (_, url):
        pass  # closed: nothing listens on that port any more
    async with client() as http:
        with pytest.raises(httpx.ConnectError):
            await http.post(f"{url}/x", content=b"{}")


async def test_connection_dropped_before_an_answer_is_remote_protocol_error() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with serving(hang_up) as (_, url), client() as http:
        with pytest.raises(httpx.RemoteProtocolError) as caught:
            await http.post(f"{url}/x", content=b"{}")
    assert caught.value.__cause__ is not None  # aiohttp's own error stays attached


@pytest.mark.parametrize(
    ("answer", "then_hang_up", "error"),
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this",
            True,
            httpx.RemoteProtocolError,
            id="body-cut-short",
        ),
        pytest.param(b"this is not HTTP\r\n\r\n", False, httpx.RemoteProtocolError, id="not-http"),
        pytest.param(b"", False, httpx.ReadTimeout, id="silence-past-the-read-timeout"),
    ],
)
async def test_a_broken_answer_is_the_matching_httpx_error(
    answer: bytes, then_hang_up: bool, error: type[httpx.HTTPError]
) -> None:
    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()
        if not then_hang_up:
            await reader.read()  # until the client gives up

    async with serving(broken) as (_, url), client() as http:
        with pytest.raises(error):
            await http.post(f"{url}/x", content=b"{}", timeout=httpx.Timeout(5.0, read=0.2))


async def test_a_proxy_from_the_environment_carries_the_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await read_request(reader)) is not None:
            server.requests.append(request)
            writer.write(ok_response())
            await writer.drain()

    async with serving(proxy) as (server, proxy_url):
        monkeypatch.setenv("HTTP_PROXY", proxy_url)
        monkeypatch.setenv("NO_PROXY", "bypassed.invalid")
        async with client() as http:
            response = await http.post("http://upstream.invalid/v1/chat", content=b"{}")
            assert response.json() == {"ok": True}
            with pytest.raises(httpx.ConnectError):  # not through the proxy: no such host
                await http.post("http://bypassed.invalid/v1/chat", content=b"{}")
    [(head, _)] = server.requests
    assert head.startswith(b"POST http://upstream.invalid/v1/chat HTTP/1.1\r\n")


async def test_a_compressed_answer_is_decoded_once_either_way() -> None:
    body = gzip.compress(OK_BODY)

    async def gzipped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        await writer.drain()

    async with serving(gzipped) as (_, url), client() as http, transport() as upstream:
        response = await http.post(f"{url}/x", content=b"{}")
        assert response.json() == {"ok": True}
        answer = await upstream.post(URL(f"{url}/x"), b"{}", JSON, TIMEOUTS)
        assert await answer.read(LIMIT) == OK_BODY


# --- the relay's `post` ------------------------------------------------------------


async def test_post_sends_its_bytes_and_headers_and_reuses_the_connection() -> None:
    async def answer_each(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await read_request(reader)) is not None:
            server.requests.append(request)
            writer.write(ok_response())
            await writer.drain()

    async with serving(answer_each) as (server, url), transport() as upstream:
        for i in range(3):
            response = await upstream.post(
                URL(f"{url}/v1/chat"),
                b'{"n":%d}' % i,
                {**JSON, "Authorization": "Bearer sk-x"},
                TIMEOUTS,
            )
            assert response.status_code == 200
            assert response.headers["Content-Type"] == "application/json"
            assert await response.read(LIMIT) == OK_BODY

    assert server.connections == 1
    head, body = server.requests[2]
    assert head.startswith(b"POST /v1/chat HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Bearer sk-x\r\n" in head
    assert body == b'{"n":2}'


async def test_post_hands_back_an_error_status_with_its_body() -> None:
    async def too_many(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        body = b'{"error":{"message":"slow down"}}'
        writer.write(
            b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 7\r\ncontent-length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        await writer.drain()

    async with serving(too_many) as (_, url), transport() as upstream:
        response = await upstream.post(URL(f"{url}/x"), b"{}", JSON, TIMEOUTS)
        assert response.status_code == 429
        assert response.headers.get("Retry-After") == "7"
        assert await response.read(LIMIT) == b'{"error":{"message":"slow down"}}'


async def test_a_half_read_post_does_not_hand_its_connection_to_the_next() -> None:
    async with serving(endless_then_ok()) as (server, url), transport() as upstream:
        response = await upstream.post(URL(f"{url}/s"), b"{}", JSON, TIMEOUTS)
        assert await anext(response.aiter_bytes()) == b"first"
        await response.aclose()
        response = await upstream.post(URL(f"{url}/next"), b"{}", JSON, TIMEOUTS)
        assert await response.read(LIMIT) == OK_BODY
    assert server.connections == 2


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        pytest.param(b"", httpx.RemoteProtocolError, id="hung-up-before-an-answer"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this",
            httpx.RemoteProtocolError,
            id="body-cut-short",
        ),
    ],
)
async def test_a_broken_post_raises_the_matching_httpx_error(
    answer: bytes, error: type[httpx.HTTPError]
) -> None:
    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()

    async with serving(broken) as (_, url), transport() as upstream:
        with pytest.raises(error):
            response = await upstream.post(URL(f"{url}/x"), b"{}", JSON, TIMEOUTS)
            await response.read(LIMIT)


async def test_a_silent_post_is_a_read_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()  # until the client gives up

    async with serving(silent) as (_, url), transport() as upstream:
        with pytest.raises(httpx.ReadTimeout):
            await upstream.post(
                URL(f"{url}/x"), b"{}", JSON, client_timeout(connect=5.0, read=0.2, pool=5.0)
            )


async def test_cookies_an_upstream_sets_are_never_sent_back() -> None:
    """One session serves every user's calls: a cookie set by an upstream for one user's
    request must not ride along with the next user's."""

    async def set_cookie_then_answer(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while (request := await read_request(reader)) is not None:
            server.requests.append(request)
            writer.write(
                b"HTTP/1.1 200 OK\r\nset-cookie: session=user-a; Path=/\r\n"
                b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                % (len(OK_BODY), OK_BODY)
            )
            await writer.drain()

    async with serving(set_cookie_then_answer) as (server, url), transport() as upstream:
        # A host name: cookies set by a bare IP address are not kept anyway.
        named = url.replace("127.0.0.1", "localhost")
        for _ in range(2):
            response = await upstream.post(URL(f"{named}/v1/chat"), b"{}", JSON, TIMEOUTS)
            assert await response.read(LIMIT) == OK_BODY
    assert len(server.requests) == 2
    assert b"\r\ncookie:" not in server.requests[1][0].lower()


async def test_read_stops_at_its_limit_counting_decoded_bytes() -> None:
    """A gzip body a thousandth of its decoded size is refused by what it decodes to."""
    decoded = b"a" * 2_000_000
    body = gzip.compress(decoded)
    assert len(body) < 10_000

    async def gzipped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            await writer.drain()

    async with serving(gzipped) as (_, url), transport() as upstream:
        answer = await upstream.post(URL(f"{url}/x"), b"{}", JSON, TIMEOUTS)
        assert await answer.read(len(decoded) - 1) is None
        await answer.aclose()
        answer = await upstream.post(URL(f"{url}/x"), b"{}", JSON, TIMEOUTS)
        assert await answer.read(len(decoded)) == decoded
        await answer.aclose()
