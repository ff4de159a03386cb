"""`HttpProtocol`: a response's head goes out with its body, and never waits for one."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from app.api.http_protocol import HeadWithBodyTransport, HttpProtocol
from tests.fake_upstream import LoopbackServer

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


class RecordingTransport(asyncio.Transport):
    """A transport that keeps what was done to it, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, Any]] = []
        self.closing = False

    def write(self, data: Any) -> None:
        self.calls.append(("write", bytes(data)))

    def writelines(self, list_of_data: Any) -> None:
        self.calls.append(("writelines", [bytes(d) for d in list_of_data]))

    def write_eof(self) -> None:
        self.calls.append(("write_eof", None))

    def close(self) -> None:
        self.closing = True
        self.calls.append(("close", None))

    def abort(self) -> None:
        self.closing = True
        self.calls.append(("abort", None))

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 7


@pytest.fixture
async def recorded() -> tuple[RecordingTransport, HeadWithBodyTransport]:
    inner = RecordingTransport()
    return inner, HeadWithBodyTransport(inner, asyncio.get_running_loop())


async def test_head_and_body_of_one_turn_are_one_write(recorded):
    inner, transport = recorded
    transport.write(HEAD)
    assert inner.calls == []
    transport.write(b"ok")
    transport.write(b"next")
    assert inner.calls == [("write", HEAD + b"ok"), ("write", b"next")]
    await asyncio.sleep(0)  # the turn's end finds nothing held
    assert len(inner.calls) == 2


async def test_a_head_with_no_body_in_its_turn_goes_out_at_the_turns_end(recorded):
    inner, transport = recorded
    transport.write(memoryview(HEAD))
    await asyncio.sleep(0)
    assert inner.calls == [("write", HEAD)]
    transport.write(b"ok")
    assert inner.calls == [("write", HEAD), ("write", b"ok")]


async def test_other_writes_pass_straight_through(recorded):
    inner, transport = recorded
    transport.write(b"event: x\n\n")
    transport.write(bytearray(b"data: HTTP/1.1 \n\n"))
    assert inner.calls == [("write", b"event: x\n\n"), ("write", b"data: HTTP/1.1 \n\n")]


@pytest.mark.parametrize(
    ("end", "expected"),
    [
        ("close", [("write", HEAD), ("close", None)]),
        ("write_eof", [("write", HEAD), ("write_eof", None)]),
        ("writelines", [("write", HEAD), ("writelines", [b"a", b"b"])]),
        ("abort", [("abort", None)]),  # an abort sends nothing, held or not
    ],
)
async def test_a_held_head_keeps_its_place(recorded, end: str, expected: list[Any]):
    inner, transport = recorded
    transport.write(HEAD)
    if end == "writelines":
        transport.writelines([b"a", b"b"])
    else:
        getattr(transport, end)()
    await asyncio.sleep(0)
    assert inner.calls == expected


async def test_a_head_held_past_a_close_is_not_written(recorded):
    inner, transport = recorded
    transport.write(HEAD)
    inner.closing = True  # the peer went away meanwhile
    await asyncio.sleep(0)
    assert inner.calls == []


async def test_everything_else_is_the_wrapped_transports(recorded):
    inner, transport = recorded
    assert transport.get_write_buffer_size() == 7
    assert transport.is_closing() is False
    inner.closing = True
    assert transport.is_closing() is True


# -- over a socket -----------------------------------------------------------------------


@pytest.fixture
async def server() -> AsyncIterator[tuple[LoopbackServer, asyncio.Event]]:
    """A server on `HttpProtocol` with a plain route and one whose body waits for
    the test to say it has the head."""
    head_seen = asyncio.Event()

    class SlowBody:  # an ASGI app: Starlette routes to an instance as is
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await head_seen.wait()
            await send({"type": "http.response.body", "body": b"late", "more_body": False})

    async def plain(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hello")

    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.close(4401)

    app = Starlette(
        routes=[
            Route("/plain", plain, methods=["GET", "HEAD"]),
            Route("/slow", SlowBody()),
            WebSocketRoute("/ws", socket),
        ]
    )
    loopback = LoopbackServer(app, http=HttpProtocol)
    await loopback.start()
    try:
        yield loopback, head_seen
    finally:
        head_seen.set()
        await loopback.stop()


async def _request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str, path: str
) -> tuple[bytes, bytes]:
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    body = b"" if method == "HEAD" else await asyncio.wait_for(reader.readexactly(length), 5)
    return head, body


async def test_responses_on_one_connection_arrive_whole(server):
    loopback, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", loopback.port)
    try:
        for method in ("GET", "HEAD", "GET"):
            head, body = await _request(reader, writer, method, "/plain")
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"content-length: 5\r\n" in head
            assert body == (b"" if method == "HEAD" else b"hello")
    finally:
        writer.close()


async def test_a_head_whose_body_is_late_is_not_kept_waiting(server):
    loopback, head_seen = server
    reader, writer = await asyncio.open_connection("127.0.0.1", loopback.port)
    try:
        writer.write(b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
        # The body waits for the head to reach us: a head held for its body never would.
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        head_seen.set()
        chunk = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
        assert b"late" in chunk
    finally:
        writer.close()


def _upgrade(path: str, extra: str = "") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: test\r\n{extra}Upgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        # The request line at the WebSocket parser's limit of 8,192 bytes, then past it.
        (_upgrade("/ws?token=" + "a" * (8192 - len("GET /ws?token= HTTP/1.1\r\n"))), b"101"),
        (_upgrade("/ws?token=" + "a" * 9000), b"400"),
        (_upgrade("/ws", "X-Big: " + "b" * 9000 + "\r\n"), b"400"),
        (_upgrade("/ws", "".join(f"X-{i}: 1\r\n" for i in range(130))), b"400"),
    ],
    ids=["line-at-the-limit", "line-too-long", "header-too-long", "too-many-headers"],
)
async def test_an_upgrade_too_large_for_websockets_is_answered_400(
    server, request_bytes: bytes, status: bytes
):
    """Not left unanswered, its connection open, as the WebSocket protocol would."""
    loopback, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", loopback.port)
    try:
        writer.write(request_bytes)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 " + status + b" ")
        if status == b"400":
            body = await asyncio.wait_for(reader.read(), 5)
            assert json.loads(body)["error"] == "WebSocket upgrade request too large"
            assert b"\r\nx-request-id: " in head
    finally:
        writer.close()
