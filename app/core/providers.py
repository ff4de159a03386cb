"""Upstream LLM providers behind one interface, and the model → provider registry.

A provider answers an OpenAI-format chat completion request either whole
(`complete`) or as a stream of `StreamChunk`s (`open_stream`). Streamed chunks keep
the upstream's own bytes, so relaying never re-encodes what it forwards; each is
parsed once, only for what metering needs.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import msgspec
import orjson
from yarl import URL

from app.core.config import ProviderConfig
from app.core.errors import (
    ApiError,
    BadRequest,
    RateLimited,
    UpstreamError,
    UpstreamTimeout,
)
from app.core.metering import Usage
from app.core.security import new_id
from app.core.upstream_transport import AiohttpTransport, UpstreamResponse, client_timeout

ECHO_MODEL = "echo"
DONE = b"[DONE]"


# A msgspec struct, not a dataclass: one is built per relayed token, in 0.18 µs here
# against 0.47 µs for a slotted dataclass (1.2 µs frozen). Nothing it holds can
# reference it back, so the garbage collector need not track it.
class StreamChunk(msgspec.Struct, frozen=True, gc=False):
    """One upstream SSE event: its raw `data` and what metering reads from it."""

    data: bytes
    tokens: int  # generated tokens it carries: 1 for a delta with content, else 0
    text: str  # the content delta of its first choice
    usage: Usage | None
    finish_reason: str | None
    usage_only: bool  # the trailing `include_usage` chunk, with no choices

    @property
    def meta(self) -> dict[str, Any]:
        """The event's id, created and model, for chunks we add ourselves (a quota cut,
        a usage chunk). Parsed again when asked: once per stream, not once per token.

        Parsed as `parse_chunk` did (skipping the other fields), so an event it took
        cannot fail here; one of these of the wrong type is left out.
        """
        try:
            event = _META.decode(self.data)
        except (msgspec.DecodeError, RecursionError):
            return {}
        meta: dict[str, Any] = {}
        if isinstance(event.id, str):
            meta["id"] = event.id
        if isinstance(event.created, int) and not isinstance(event.created, bool):
            meta["created"] = event.created
        if isinstance(event.model, str):
            meta["model"] = event.model
        return meta


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole (non-streamed) completion: the upstream's body and its usage."""

    body: bytes
    usage: Usage | None
    completion_text: str


class UpstreamStream(Protocol):
    def __aiter__(self) -> AsyncIterator[list[StreamChunk]]:
        """The upstream's chunks in batches: each, what one network read brought.

        An unpaced upstream packs many events in a read; handling them together lets
        the relay send and count them with one write instead of one per token.
        """
        ...

    async def aclose(self) -> None: ...


class Provider(Protocol):
    name: str
    models: list[str]

    async def complete(self, body: dict[str, Any]) -> Completion: ...

    async def open_stream(self, body: dict[str, Any]) -> UpstreamStream: ...


# Past this, a number is no token count of one request (and would overflow the
# database's integers once summed): an upstream's claim beyond it is not believed.
MAX_TOKEN_COUNT = 2**31 - 1


def token_count(usage: object, name: str) -> int | None:
    """`usage[name]` if it is a token count: a whole number from 0 to `MAX_TOKEN_COUNT`.

    What an upstream reports is billed as it is, so a negative, fractional or huge
    count (or a boolean) is taken as no count at all, never as a credit.
    """
    value = usage.get(name) if isinstance(usage, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKEN_COUNT:
        return value
    return None


def parse_usage(value: object) -> Usage | None:
    """An OpenAI `usage` object, or None where either count is missing or no count."""
    prompt = token_count(value, "prompt_tokens")
    completion = token_count(value, "completion_tokens")
    if prompt is None or completion is None:
        return None
    return Usage(prompt_tokens=prompt, completion_tokens=completion)


class _Delta(msgspec.Struct):
    content: Any = None
    tool_calls: Any = None
    refusal: Any = None
    reasoning_content: Any = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    finish_reason: str | None = None


class _ChunkEvent(msgspec.Struct):
    """What metering reads of a `chat.completion.chunk`; every other field is skipped
    without being built (an event is decoded once per token)."""

    choices: list[_Choice] | None = None
    usage: Any = msgspec.UNSET
    error: Any = msgspec.UNSET


_CHUNK_EVENT = msgspec.json.Decoder(_ChunkEvent)


class _Meta(msgspec.Struct):
    """What `StreamChunk.meta` reads of an event."""

    id: Any = None
    created: Any = None
    model: Any = None


_META = msgspec.json.Decoder(_Meta)


def parse_chunk(data: bytes) -> StreamChunk:
    """Read the metering facts out of one `chat.completion.chunk`.

    An event that is not JSON, or whose `choices`, `delta` or `finish_reason` has the
    wrong shape, is malformed: an upstream error, as an `error` event is.
    """
    try:
        event = _CHUNK_EVENT.decode(data)
    except (msgspec.DecodeError, RecursionError) as exc:  # DecodeError: and ValidationError
        # RecursionError: msgspec's answer to nesting too deep, even in a skipped field.
        raise UpstreamError("provider sent a malformed stream event") from exc
    if event.error is not msgspec.UNSET:
        error = event.error
        message = error.get("message") if isinstance(error, dict) else str(error)
        raise UpstreamError(f"provider error mid-stream: {message}")
    tokens, finish_reason, text = 0, None, ""
    choices = event.choices
    if choices:
        for choice in choices:
            delta = choice.delta
            if delta is not None:
                content = delta.content
                if content:
                    tokens += 1
                    if not text and isinstance(content, str):
                        text = content
                elif delta.tool_calls or delta.refusal or delta.reasoning_content:
                    tokens += 1
            finish_reason = choice.finish_reason or finish_reason
    usage = event.usage
    return StreamChunk(
        data,
        tokens,
        text,
        parse_usage(usage) if usage else None,
        finish_reason,
        not choices and usage is not msgspec.UNSET,
    )


async def iter_sse_batches(
    chunks: AsyncGenerator[bytes, None], max_event_bytes: int
) -> AsyncGenerator[list[bytes], None]:
    """The `data` payloads of an SSE byte stream (multi-line data joined by newlines),
    as a list per network read that completed any. Closes `chunks` when it ends or is
    closed.

    An event longer than `max_event_bytes` (with CRLFs read as LFs) raises
    `UpstreamError`, at the latest once twice that much of it is in.

    Close it (`contextlib.aclosing`) rather than leave it mid-stream: an async
    generator dropped unfinished is closed later by a task of the event loop's, one
    per generator and stream.
    """
    # The reads since the last event's end. Kept apart until one ends an event: joining
    # each read onto the rest would copy a long event over and over.
    pending: list[bytes] = []
    pending_bytes = 0
    tail = b""  # the last two bytes pending: an event's end can span reads
    async with aclosing(chunks):
        async for chunk in chunks:
            if pending and not (_ends_event(chunk) or _ends_event(tail + chunk[:2])):
                pending.append(chunk)
                pending_bytes += len(chunk)
                tail = (tail + chunk[-2:])[-2:]
                # Raw bytes: CRLFs may make them up to twice what the event is.
                if pending_bytes > 2 * max_event_bytes:
                    raise UpstreamError(f"provider sent an event over {max_event_bytes} bytes")
                continue
            # One split per read: an unpaced upstream packs hundreds of events in one.
            buffer = b"".join([*pending, chunk]) if pending else chunk
            if b"\r" in buffer:
                buffer = buffer.replace(b"\r\n", b"\n")
            events = buffer.split(b"\n\n")
            partial = events.pop()
            if partial:
                pending, pending_bytes, tail = [partial], len(partial), partial[-2:]
            else:
                pending = []
            if len(buffer) > max_event_bytes and (
                len(partial) > max_event_bytes
                or any(len(event) > max_event_bytes for event in events)
            ):
                raise UpstreamError(f"provider sent an event over {max_event_bytes} bytes")
            batch: list[bytes] = []
            for event in events:
                if event.startswith(b"data: ") and b"\n" not in event:
                    batch.append(event[6:])  # the usual event: a single data line
                elif (data := _event_data(event.split(b"\n"))) is not None:
                    batch.append(data)
            if batch:
                yield batch
    # At the end, an event whose blank line never came still counts its ended lines.
    partial = b"".join(pending).replace(b"\r\n", b"\n")
    if len(partial) > max_event_bytes:
        raise UpstreamError(f"provider sent an event over {max_event_bytes} bytes")
    if (data := _event_data(partial.split(b"\n")[:-1])) is not None:
        yield [data]


def _ends_event(data: bytes) -> bool:
    """Whether `data` holds an event's end: a blank line, once CRLFs read as LFs."""
    return b"\n\n" in data or b"\n\r\n" in data


def _event_data(lines: list[bytes]) -> bytes | None:
    """The data of one event's lines; None for an event without data (a comment)."""
    data = [line[5:] for line in lines if line.startswith(b"data:")]
    if not data:
        return None
    return b"\n".join(value[1:] if value.startswith(b" ") else value for value in data)


# An error answer is read this far, for its message; past it, the status alone tells.
MAX_ERROR_BODY_BYTES = 65_536

# Past this many digits, a Retry-After is no wait worth passing on.
RETRY_AFTER_DIGITS = 6


def retry_after_seconds(value: str | None) -> int | None:
    """The seconds of a Retry-After in its delay form, else None (a date, or nonsense).

    ASCII digits only: `str.isdigit` also takes "¹", which `float` refuses, and a
    header passed on to the client must be plain ASCII.
    """
    if value and len(value) <= RETRY_AFTER_DIGITS and value.isascii() and value.isdigit():
        return int(value)
    return None


def upstream_error(provider: str, response: UpstreamResponse, body: bytes) -> ApiError:
    message = f"provider {provider} answered {response.status_code}"
    try:
        error = json.loads(body).get("error")
        detail = error.get("message") if isinstance(error, dict) else error
        if isinstance(detail, str) and detail:
            message = f"{message}: {detail}"
    except (ValueError, AttributeError, RecursionError):  # not JSON, no object, too deep
        pass
    status = response.status_code
    if status == 429:
        headers = {}
        if (seconds := retry_after_seconds(response.headers.get("retry-after"))) is not None:
            headers["Retry-After"] = str(seconds)
        return RateLimited(message, code="upstream_rate_limited", headers=headers)
    if status in (400, 404, 409, 413, 422):
        # The request itself was refused: the client can fix it, so it sees the status.
        return BadRequest(message, code="upstream_rejected_request", status_code=status)
    if status in (401, 403):
        return UpstreamError(f"provider {provider} refused the configured credentials")
    return UpstreamError(message)


def transport_error(provider: str, exc: httpx.HTTPError) -> ApiError:
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"provider {provider} timed out")
    return UpstreamError(f"provider {provider} is unreachable: {type(exc).__name__}")


class _OpenAIStream:
    def __init__(self, provider: str, response: UpstreamResponse, max_event_bytes: int) -> None:
        self._provider = provider
        self._response = response
        self._max_event_bytes = max_event_bytes

    async def __aiter__(self) -> AsyncIterator[list[StreamChunk]]:
        try:
            async with aclosing(
                iter_sse_batches(self._response.aiter_bytes(), self._max_event_bytes)
            ) as batches:
                async for batch in batches:
                    chunks: list[StreamChunk] = []
                    for data in batch:
                        if data == DONE:
                            break
                        chunks.append(parse_chunk(data))
                    if chunks:
                        yield chunks
                    if len(chunks) < len(batch):
                        return  # [DONE]
        except httpx.HTTPError as exc:
            raise transport_error(self._provider, exc) from exc

    async def aclose(self) -> None:
        await self._response.aclose()


class HttpProvider:
    """What every HTTP upstream shares: one pooled transport, timeouts, error mapping.

    Requests go straight to the transport's `post`, not through an `httpx.AsyncClient`
    or httpx's request and response models: a relay wants none of a client's cookies,
    redirects or auth flows, and each layer skipped saved a good part of the
    client-side CPU of an upstream call (see upstream_transport).
    """

    def __init__(self, config: ProviderConfig, upstream: AiohttpTransport, url: str) -> None:
        self.name = config.name
        self.models = list(config.models)
        self._upstream = upstream
        self._url = URL(url)
        self._headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Accept-Encoding": "gzip, deflate",
        }
        self._timeout = client_timeout(
            connect=config.connect_timeout, read=config.read_timeout, pool=10.0
        )
        self.max_response_bytes = config.max_response_bytes

    async def _send(self, body: dict[str, Any]) -> UpstreamResponse:
        """POST `body`; the open response if it is a 200, else the mapped `ApiError`."""
        try:
            response = await self._upstream.post(
                self._url, _encode(body), self._headers, self._timeout
            )
        except httpx.HTTPError as exc:
            raise transport_error(self.name, exc) from exc
        if response.status_code != 200:
            try:
                error_body = await response.read(MAX_ERROR_BODY_BYTES) or b""
            except httpx.HTTPError:
                error_body = b""
            finally:
                await response.aclose()
            raise upstream_error(self.name, response, error_body)
        return response

    async def _post_json(self, body: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
        """POST `body` and read the whole JSON answer: (raw bytes, parsed object)."""
        response = await self._send(body)
        try:
            raw = await response.read(self.max_response_bytes)
        except httpx.HTTPError as exc:
            raise transport_error(self.name, exc) from exc
        finally:
            await response.aclose()
        if raw is None:
            raise UpstreamError(
                f"provider {self.name} sent a response over {self.max_response_bytes} bytes"
            )
        try:
            parsed = orjson.loads(raw)
        except ValueError as exc:
            raise UpstreamError(f"provider {self.name} sent a malformed response") from exc
        if not isinstance(parsed, dict):
            raise UpstreamError(f"provider {self.name} sent a malformed response")
        return raw, parsed


def _encode(body: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(body)
    except TypeError:
        # What orjson refuses and the request parser lets through: integers past 64
        # bits, nesting past 254 levels.
        return json.dumps(body, separators=(",", ":")).encode()


class OpenAIProvider(HttpProvider):
    """Any OpenAI-compatible upstream: OpenAI, vLLM, Ollama, OpenRouter, Gemini's endpoint."""

    def __init__(self, config: ProviderConfig, upstream: AiohttpTransport) -> None:
        super().__init__(config, upstream, config.base_url.rstrip("/") + "/chat/completions")
        if config.api_key is not None:
            self._headers["Authorization"] = f"Bearer {config.api_key.get_secret_value()}"

    async def complete(self, body: dict[str, Any]) -> Completion:
        raw, parsed = await self._post_json(body)
        text = _answer_text(parsed.get("choices"))
        if text is None:
            raise UpstreamError(f"provider {self.name} sent a malformed response")
        return Completion(body=raw, usage=parse_usage(parsed.get("usage")), completion_text=text)

    async def open_stream(self, body: dict[str, Any]) -> UpstreamStream:
        return _OpenAIStream(self.name, await self._send(body), self.max_response_bytes)


def _answer_text(choices: object) -> str | None:
    """The text of a whole answer's `choices`; None unless they are a list of objects
    each with a `message` object (the relay and its routes read them so)."""
    if not isinstance(choices, list):
        return None
    texts = []
    for choice in choices:
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            return None
        texts.append(content_text(message.get("content")))
    return "".join(texts)


class EchoProvider:
    """The offline model: streams the last user message back, word by word."""

    name = "builtin"

    def __init__(self, token_delay: float = 0.05) -> None:
        self.models = [ECHO_MODEL]
        self._token_delay = token_delay

    @staticmethod
    def _reply(body: dict[str, Any]) -> tuple[list[str], int]:
        messages = body.get("messages") or []
        last = next(
            (m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), {}
        )
        words = (content_text(last.get("content")).split() or ["(silence)"])[:4096]
        tokens = ["Echo:"] + [f" {w}" for w in words]
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(limit, int) and limit > 0:
            tokens = tokens[:limit]
        return tokens, estimate_prompt_tokens(messages)

    async def complete(self, body: dict[str, Any]) -> Completion:
        tokens, prompt = self._reply(body)
        text = "".join(tokens)
        usage = Usage(prompt_tokens=prompt, completion_tokens=len(tokens))
        payload = {
            "id": f"chatcmpl-{new_id()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": ECHO_MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.total_tokens,
            },
        }
        return Completion(body=json.dumps(payload).encode(), usage=usage, completion_text=text)

    async def open_stream(self, body: dict[str, Any]) -> UpstreamStream:
        return _EchoStream(*self._reply(body), delay=self._token_delay)


class _EchoStream:
    def __init__(self, tokens: list[str], prompt_tokens: int, delay: float) -> None:
        self._tokens = tokens
        self._prompt_tokens = prompt_tokens
        self._delay = delay
        self._meta = {
            "id": f"chatcmpl-{new_id()}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": ECHO_MODEL,
        }

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None) -> StreamChunk:
        event = {
            **self._meta,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        return parse_chunk(json.dumps(event, separators=(",", ":")).encode())

    async def __aiter__(self) -> AsyncIterator[list[StreamChunk]]:
        yield [self._chunk({"role": "assistant", "content": ""}, None)]
        for token in self._tokens:
            await asyncio.sleep(self._delay)
            yield [self._chunk({"content": token}, None)]
        usage = {
            "prompt_tokens": self._prompt_tokens,
            "completion_tokens": len(self._tokens),
            "total_tokens": self._prompt_tokens + len(self._tokens),
        }
        yield [
            self._chunk({}, "stop"),
            parse_chunk(json.dumps({**self._meta, "choices": [], "usage": usage}).encode()),
        ]

    async def aclose(self) -> None:
        pass


def estimate_prompt_tokens(messages: object) -> int:
    """A provider-neutral estimate (~4 characters a token, plus per-message framing).

    Used until the upstream reports the real count, and instead of it when it never
    does; billed counts on completion always come from the upstream when it sends them.
    """
    if not isinstance(messages, list):
        return 0
    chars, count = 0, 0
    for message in messages:
        if isinstance(message, dict):
            count += 1
            chars += len(content_text(message.get("content")))
    return (chars + 3) // 4 + 4 * count


def estimate_tokens(text: str) -> int:
    return (len(text) + 3) // 4


def content_text(content: object) -> str:
    """The text of a message's `content`: a string, or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""
