"""A fast fake OpenAI-compatible upstream for the benchmarks.

Raw asyncio protocol + httptools on uvloop, no framework, so that the "direct"
target measures the load generator and the loopback rather than a web framework.

The behaviour is chosen by the model name, so every relay forwards it unchanged:
`t<N>-d<MS>[-p<P>]` answers N content tokens, MS milliseconds apart when streamed
(absolute schedule, so the fake's own jitter does not accumulate), and reports P
prompt tokens (default 11). Each token's content is `qz<i> `; the letters "qz" appear
nowhere else in a response, so a client counts delivered tokens by counting them.

Streams are chunked `text/event-stream`: a role chunk at once, the tokens, a finish
chunk, the `include_usage` chunk when asked for, then `data: [DONE]`.

    python bench/fake_upstream.py --port 9100
prints `READY <port>` once listening. `GET /stats` returns what was served.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
import uuid

import httptools

MODEL_RE = re.compile(r"^t(\d+)-d(\d+)(?:-p(\d+))?$")
DEFAULT_PROMPT_TOKENS = 11

STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


class Stats:
    def __init__(self) -> None:
        self.requests = 0
        self.streams = 0
        self.stream_tokens = 0
        self.nonstream_tokens = 0
        self.streams_cut = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


STATS = Stats()


def behaviour(model: str) -> tuple[int, float, int]:
    m = MODEL_RE.match(model)
    if not m:
        return 16, 0.0, DEFAULT_PROMPT_TOKENS
    prompt = int(m.group(3)) if m.group(3) else DEFAULT_PROMPT_TOKENS
    return int(m.group(1)), int(m.group(2)) / 1000.0, prompt


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _response(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        status.encode(),
        content_type,
        len(body),
        body,
    )


class Stream:
    """One streamed answer, written event by event on the connection's transport."""

    def __init__(
        self,
        transport: asyncio.Transport,
        model: str,
        tokens: int,
        delay: float,
        prompt: int,
        include_usage: bool,
    ) -> None:
        self.transport = transport
        self.tokens = tokens
        self.delay = delay
        self.prompt = prompt
        self.include_usage = include_usage
        meta = json.dumps(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
            },
            separators=(",", ":"),
        ).encode()[:-1]
        self.prefix = b"data: " + meta + b',"choices":[{"index":0,"delta":{"content":"qz'
        self.suffix = b' "},"finish_reason":null}]}\n\n'
        self.meta = meta
        self.i = 0
        self.loop = asyncio.get_running_loop()
        self.start = 0.0

    def begin(self) -> None:
        STATS.streams += 1
        self.transport.write(STREAM_HEAD)
        self.transport.write(
            _chunk(
                b"data: "
                + self.meta
                + b',"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
                b'"finish_reason":null}]}\n\n'
            )
        )
        if self.delay <= 0:
            for _ in range(self.tokens):
                if self.transport.is_closing():
                    STATS.streams_cut += 1
                    return
                self._token()
            self._end()
        else:
            self.start = self.loop.time()
            self.loop.call_at(self.start + self.delay, self._tick)

    def _token(self) -> None:
        self.transport.write(_chunk(self.prefix + str(self.i).encode() + self.suffix))
        self.i += 1
        STATS.stream_tokens += 1

    def _tick(self) -> None:
        if self.transport.is_closing():
            STATS.streams_cut += 1
            return
        self._token()
        if self.i >= self.tokens:
            self._end()
        else:
            self.loop.call_at(self.start + (self.i + 1) * self.delay, self._tick)

    def _end(self) -> None:
        out = [
            _chunk(
                b"data: " + self.meta + b',"choices":[{"index":0,"delta":{},'
                b'"finish_reason":"stop"}]}\n\n'
            )
        ]
        if self.include_usage:
            usage = b'"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}' % (
                self.prompt,
                self.tokens,
                self.prompt + self.tokens,
            )
            out.append(_chunk(b"data: " + self.meta + b',"choices":[],' + usage + b"}\n\n"))
        out.append(_chunk(b"data: [DONE]\n\n"))
        out.append(b"0\r\n\r\n")
        self.transport.write(b"".join(out))


class UpstreamProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        STATS.requests += 1
        method = self.parser.get_method()
        path = self.url.split(b"?", 1)[0]
        if path == b"/v1/chat/completions" and method == b"POST":
            self._chat(transport)
        elif path == b"/v1/models":
            transport.write(_response("200 OK", b'{"object":"list","data":[]}'))
        elif path == b"/stats":
            transport.write(_response("200 OK", json.dumps(STATS.as_dict()).encode()))
        elif path == b"/health":
            transport.write(_response("200 OK", b'{"ok":true}'))
        else:
            transport.write(_response("404 Not Found", b'{"error":{"message":"not found"}}'))

    def _chat(self, transport: asyncio.Transport) -> None:
        try:
            body = json.loads(b"".join(self.body))
            model = str(body["model"])
        except (ValueError, KeyError, TypeError):
            transport.write(_response("400 Bad Request", b'{"error":{"message":"bad body"}}'))
            return
        tokens, delay, prompt = behaviour(model)
        if body.get("stream"):
            options = body.get("stream_options") or {}
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            Stream(transport, model, tokens, delay, prompt, include_usage).begin()
            return
        STATS.nonstream_tokens += tokens
        text = "".join(f"qz{i} " for i in range(tokens))
        payload = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": tokens,
                "total_tokens": prompt + tokens,
            },
        }
        transport.write(_response("200 OK", json.dumps(payload, separators=(",", ":")).encode()))


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamProtocol, host, port, backlog=4096)
    bound = server.sockets[0].getsockname()[1]
    print(f"READY {bound}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if not args.host.startswith("127.") and args.host not in ("localhost", "::1"):
        sys.exit("the fake upstream only listens on loopback")
    try:
        import uvloop

        uvloop.run(serve(args.host, args.port))
    except ImportError:
        asyncio.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
