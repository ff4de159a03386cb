"""A small OpenAI-compatible upstream that tests start on loopback.

Its behaviour is set per test through `FakeUpstream.script`: how many tokens, how
slowly, whether it reports usage, whether it fails (with a status, or by dropping
the connection mid-stream), or holds the stream open after some tokens until the
test releases it. It records every request body it received and how each stream
ended, so tests can assert what the relay sent and when it hung up.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

_USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}

# Whole answers whose `choices` are not a list of objects each with a `message` object.
MALFORMED_ANSWERS: dict[str, Any] = {
    "choices-text": {"id": "x", "choices": "abc", "usage": _USAGE},
    "choices-missing": {"id": "x", "usage": _USAGE},
    "choice-number": {"id": "x", "choices": [5], "usage": _USAGE},
    "message-text": {"id": "x", "choices": [{"index": 0, "message": "hello"}], "usage": _USAGE},
    "message-array": {"id": "x", "choices": [{"index": 0, "message": ["a"]}], "usage": _USAGE},
}


@dataclass
class Script:
    tokens: int = 8
    delay: float = 0.0  # seconds before each token
    prompt_tokens: int = 11
    report_usage: bool = True  # honour stream_options.include_usage / add usage
    status: int = 200  # anything else: answer with this status and an error body
    error_body: bytes | None = None  # that error body's bytes, instead of the usual one
    error_headers: dict[str, bytes] = field(default_factory=dict)  # sent as they are
    fail_after: int | None = None  # drop the connection after this many tokens
    # Stop after this many tokens until released (non-stream: hold the whole answer).
    hold_after: int | None = None
    hold_finish: bool = False  # stop before the finish event until `finish_release`
    hold_start: bool = False  # a stream sends nothing until `release`
    # The usage so far on every token's event too (vLLM's `continuous_usage_stats`).
    usage_every_token: bool = False
    content_prefix: str = "tok"
    meta_on_first_only: bool = False  # id, created and model on the first event only
    finish_event: bytes | None = None  # the finish event's data, instead of the usual one
    answer: Any = None  # sent (as JSON) instead of the usual whole answer


@dataclass
class StreamRecord:
    sent_tokens: int = 0
    finished: bool = False  # reached [DONE]
    closed_early: bool = False  # the relay hung up before the end


@dataclass
class FakeUpstream:
    script: Script = field(default_factory=Script)
    requests: list[dict[str, Any]] = field(default_factory=list)
    streams: list[StreamRecord] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    finish_release: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def token(self, i: int) -> str:
        return f"{self.script.content_prefix}{i} "

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        script = self.script
        if script.status != 200:
            error: Response = (
                Response(script.error_body, script.status, media_type="application/json")
                if script.error_body is not None
                else JSONResponse(
                    {"error": {"message": f"scripted failure {script.status}", "type": "test"}},
                    status_code=script.status,
                )
            )
            # Raw: a value need not be one Starlette would encode (latin-1).
            error.raw_headers += [(k.lower().encode(), v) for k, v in script.error_headers.items()]
            return error
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                self._stream(body.get("model", ""), include_usage), media_type="text/event-stream"
            )
        if script.hold_after is not None:
            record = StreamRecord()
            self.streams.append(record)
            while not self.release.is_set():
                if await request.is_disconnected():
                    record.closed_early = True
                    return Response(status_code=499)
                await asyncio.sleep(0.01)
        if script.answer is not None:
            return JSONResponse(script.answer)
        text = "".join(self.token(i) for i in range(script.tokens))
        payload: dict[str, Any] = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", ""),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
        }
        if script.report_usage:
            payload["usage"] = self._usage()
        return JSONResponse(payload)

    def _usage(self, completion: int | None = None) -> dict[str, int]:
        prompt = self.script.prompt_tokens
        completion = self.script.tokens if completion is None else completion
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    async def _stream(self, model: str, include_usage: bool):  # type: ignore[no-untyped-def]
        script = self.script
        record = StreamRecord()
        self.streams.append(record)
        meta = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }

        def event(payload: dict[str, Any]) -> bytes:
            return b"data: " + json.dumps({**meta, **payload}).encode() + b"\n\n"

        try:
            if script.hold_start:
                await self.release.wait()
            yield event(
                {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
            )
            if script.meta_on_first_only:
                meta = {"object": "chat.completion.chunk"}
            for i in range(script.tokens):
                if script.hold_after is not None and i == script.hold_after:
                    await self.release.wait()
                if script.fail_after is not None and i == script.fail_after:
                    raise ConnectionAbortedError("scripted mid-stream failure")
                if script.delay:
                    await asyncio.sleep(script.delay)
                delta = {"content": self.token(i)}
                payload: dict[str, Any] = {
                    "choices": [{"index": 0, "delta": delta, "finish_reason": None}]
                }
                if script.usage_every_token:
                    payload["usage"] = self._usage(completion=i + 1)
                yield event(payload)
                record.sent_tokens += 1
            if script.hold_finish:
                await self.finish_release.wait()
            if script.finish_event is not None:
                yield b"data: " + script.finish_event + b"\n\n"
            else:
                yield event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            if include_usage and script.report_usage:
                yield event({"choices": [], "usage": self._usage()})
            yield b"data: [DONE]\n\n"
            record.finished = True
        except (asyncio.CancelledError, GeneratorExit):
            record.closed_early = True
            raise

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": []})


class LoopbackServer:
    """An ASGI app served by uvicorn on a loopback port, inside the running loop."""

    def __init__(self, app: Any, http: Any = "auto") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            http=http,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=2,
            ws_per_message_deflate=False,
            proxy_headers=False,  # as `python -m app serve`: only Livegate reads X-Forwarded-For
        )
        self.server = uvicorn.Server(config)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        for _ in range(500):
            if self.server.started:
                return
            if self.task.done():
                self.task.result()
                raise RuntimeError("server exited during start-up")
            await asyncio.sleep(0.01)
        raise RuntimeError("server did not start")

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await self.task


async def start_fake_upstream() -> tuple[FakeUpstream, LoopbackServer]:
    fake = FakeUpstream()
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", fake.chat, methods=["POST"]),
            Route("/v1/models", fake.models),
        ]
    )
    server = LoopbackServer(app)
    fake.port = server.port
    await server.start()
    return fake, server


@dataclass
class FakeAnthropic:
    """A small Anthropic Messages API: `/v1/messages`, whole or streamed."""

    text_tokens: list[str] = field(default_factory=lambda: ["Bonjour", " le", " monde"])
    input_tokens: int = 17
    # The usage counts sent; a count left out is missing from every usage object.
    usage_counts: tuple[str, ...] = ("input_tokens", "output_tokens")
    # Sent instead of the answer (whole) or of the events (stream), each as JSON (an
    # event given as bytes is sent as it is).
    answer: Any = None
    events: list[Any] | None = None
    event_delay: float = 0.0  # seconds before each of those events but the first
    status: int = 200
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _usage(self, **counts: int) -> dict[str, int]:
        return {name: n for name, n in counts.items() if name in self.usage_counts}

    async def messages(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if self.status != 200:
            return JSONResponse(
                {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}},
                status_code=self.status,
            )
        if body.get("stream"):
            if self.events is not None:
                if self.event_delay:
                    return StreamingResponse(self._events(), media_type="text/event-stream")
                raw = b"".join(b"data: %s\n\n" % _event_data(e) for e in self.events)
                return Response(raw, media_type="text/event-stream")
            return StreamingResponse(self._stream(body), media_type="text/event-stream")
        if self.answer is not None:
            return JSONResponse(self.answer)
        return JSONResponse(
            {
                "id": "msg_01",
                "type": "message",
                "role": "assistant",
                "model": body["model"],
                "content": [{"type": "text", "text": "".join(self.text_tokens)}],
                "stop_reason": "end_turn",
                "usage": self._usage(
                    input_tokens=self.input_tokens, output_tokens=len(self.text_tokens)
                ),
            }
        )

    async def _events(self):  # type: ignore[no-untyped-def]
        """The scripted events, paced: each in a read of its own."""
        for i, event in enumerate(self.events or []):
            if i:
                await asyncio.sleep(self.event_delay)
            yield b"data: %s\n\n" % _event_data(event)

    async def _stream(self, body: dict[str, Any]):  # type: ignore[no-untyped-def]
        def event(kind: str, payload: dict[str, Any]) -> bytes:
            data = json.dumps({"type": kind, **payload})
            return f"event: {kind}\ndata: {data}\n\n".encode()

        yield event(
            "message_start",
            {
                "message": {
                    "id": "msg_01",
                    "type": "message",
                    "role": "assistant",
                    "model": body["model"],
                    "content": [],
                    "usage": self._usage(input_tokens=self.input_tokens, output_tokens=1),
                }
            },
        )
        yield event(
            "content_block_start",
            {"index": 0, "content_block": {"type": "text", "text": ""}},
        )
        yield event("ping", {})
        for token in self.text_tokens:
            yield event(
                "content_block_delta",
                {"index": 0, "delta": {"type": "text_delta", "text": token}},
            )
        yield event("content_block_stop", {"index": 0})
        yield event(
            "message_delta",
            {
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": self._usage(output_tokens=len(self.text_tokens)),
            },
        )
        yield event("message_stop", {})


async def start_fake_anthropic() -> tuple[FakeAnthropic, LoopbackServer]:
    fake = FakeAnthropic()
    server = LoopbackServer(
        Starlette(routes=[Route("/v1/messages", fake.messages, methods=["POST"])])
    )
    fake.port = server.port
    await server.start()
    return fake, server


def _event_data(event: Any) -> bytes:
    return event if isinstance(event, bytes) else json.dumps(event).encode()
