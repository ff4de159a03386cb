"""uvicorn's HTTP protocol, sending each response's head together with its body.

uvicorn writes a response's status line and headers to the socket as soon as the app
sends `http.response.start`, and the body in a second write when `http.response.body`
follows, although an app sends both in the same turn of the event loop. Two writes
are two system calls and two segments, and the client wakes up twice for a response
whose head alone it cannot use. `HttpProtocol` holds the head back until the next
write, which then carries head and body together, or until the end of the loop's
current turn when no body follows in it (a stream whose first event is slow still
gets its head at once).

A relayed stream is a head, a few chunks and the chunked body's end: sending the
head with the first chunk saves 7 % of the CPU of a 64-token stream (A/B, benchmark's
fake upstream, 50 concurrent streams; 8 % more streams per second).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from websockets.http11 import MAX_LINE_LENGTH, MAX_NUM_HEADERS

from app.api.envelopes import error_response
from app.core.errors import BadRequest
from app.core.security import new_id

# The start of every head uvicorn's httptools protocol writes (and of a WebSocket
# handshake's answer): a body starting with it is held too, which costs nothing but
# the wait until the end of the loop's turn.
_HEAD_START = b"HTTP/1.1 "
_HEAD_START_LENGTH = len(_HEAD_START)


class HeadWithBodyTransport:
    """A socket transport whose written response heads wait for the next write.

    Every other call goes to the wrapped transport unchanged; those that write or end
    the connection first send a head still held, so bytes keep their order.
    """

    __slots__ = ("_head", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._head: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._transport.write(head + data)
        elif data[:_HEAD_START_LENGTH] == _HEAD_START:
            self._head = bytes(data)
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        """Write the head held, if any."""
        head = self._head
        if head is not None:
            self._head = None
            if not self._transport.is_closing():
                self._transport.write(head)

    def writelines(self, lines: Any) -> None:
        self.flush()
        self._transport.writelines(lines)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._head = None
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a `HeadWithBodyTransport`; pass it as `http`.

    A request it cannot parse (a bad `Content-Length`, a control character in a
    header, an unknown method) gets its 400 in the envelope of the path's surface,
    where uvicorn answers in plain text and without a request id.

    It also answers 400 to a WebSocket upgrade that the WebSocket protocol would refuse
    for its size (a line past `websockets`' limit, say a long `?token=`): uvicorn's
    default implementation then sends no answer at all and leaves the connection open.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        wrapped = HeadWithBodyTransport(transport, self.loop)
        super().connection_made(wrapped)  # type: ignore[arg-type]

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse or hand on, in the envelope of
        the surface its path names (as far as it was read), with an `X-Request-Id` as
        every answer of ours has; the connection is closed after it."""
        # What uvicorn has read of the request: the method once the head was whole.
        method = getattr(self, "scope", {}).get("method", "")
        path = getattr(self, "url", b"").partition(b"?")[0].decode("latin-1")
        response = error_response(method, path, BadRequest(msg))
        head = [STATUS_LINE[400]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        for name, value in response.raw_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"x-request-id: ", new_id().encode(), b"\r\nconnection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + response.body)
        self.transport.close()

    def handle_websocket_upgrade(self) -> None:
        headers = list(self.scope["headers"])
        # The lines as uvicorn hands them over, each with its CRLF.
        request_line = len(self.scope["method"]) + len(self.url) + len(" HTTP/1.1\r\n") + 1
        if (
            request_line > MAX_LINE_LENGTH
            or len(headers) > MAX_NUM_HEADERS
            or any(len(name) + len(value) + 4 > MAX_LINE_LENGTH for name, value in headers)
        ):
            self.send_400_response("WebSocket upgrade request too large")
            return
        super().handle_websocket_upgrade()
