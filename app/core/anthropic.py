"""Anthropic's Messages API behind the OpenAI chat completion format, both ways.

Requests are translated once (system messages to `system`, `stop` to
`stop_sequences`, `max_tokens` required); answers and stream events are translated
back into `chat.completion` / `chat.completion.chunk` objects, so the relay and its
metering see one format whatever the provider.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import httpx

from app.core.config import ProviderConfig
from app.core.errors import BadRequest, UpstreamError
from app.core.metering import Usage
from app.core.providers import (
    Completion,
    HttpProvider,
    StreamChunk,
    UpstreamStream,
    content_text,
    iter_sse_batches,
    parse_chunk,
    token_count,
    transport_error,
)
from app.core.security import new_id
from app.core.upstream_transport import AiohttpTransport, UpstreamResponse

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def to_messages_request(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat completion request as an Anthropic Messages request."""
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for message in body.get("messages") or []:
        role = message.get("role")
        text = content_text(message.get("content"))
        if role in ("system", "developer"):
            system.append(text)
        elif role in ("user", "assistant"):
            if messages and messages[-1]["role"] == role:  # Anthropic wants turns to alternate
                messages[-1]["content"] += "\n\n" + text
            else:
                messages.append({"role": role, "content": text})
        else:
            raise BadRequest(
                f"role {role!r} is not supported by this model's provider",
                details={"param": "messages"},
            )
    if not messages or messages[0]["role"] != "user":
        messages.insert(0, {"role": "user", "content": "(continue)"})
    request: dict[str, Any] = {
        "model": body["model"],
        "messages": messages,
        "max_tokens": body.get("max_completion_tokens")
        or body.get("max_tokens")
        or DEFAULT_MAX_TOKENS,
    }
    if system:
        request["system"] = "\n\n".join(system)
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            request[name] = body[name]
    stop = body.get("stop")
    if stop:
        request["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("stream"):
        request["stream"] = True
    return request


def _usage(input_tokens: int | None, output_tokens: int | None) -> Usage | None:
    """Anthropic's counts as a `Usage`, or None (Livegate's own counts apply) where
    either is missing or no count, as for an OpenAI-compatible upstream."""
    if input_tokens is None or output_tokens is None:
        return None
    return Usage(input_tokens, output_tokens)


def _object(value: object) -> dict[str, Any]:
    """`value` if it is a JSON object, else an empty one: what an event holds is read
    field by field, and a field of the wrong shape counts as missing."""
    return value if isinstance(value, dict) else {}


def _openai_usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


class AnthropicProvider(HttpProvider):
    def __init__(self, config: ProviderConfig, upstream: AiohttpTransport) -> None:
        super().__init__(config, upstream, config.base_url.rstrip("/") + "/v1/messages")
        self._headers["anthropic-version"] = API_VERSION
        if config.api_key is not None:
            self._headers["x-api-key"] = config.api_key.get_secret_value()

    async def complete(self, body: dict[str, Any]) -> Completion:
        _, answer = await self._post_json(to_messages_request(body))
        blocks = answer.get("content")
        if not isinstance(blocks, list):
            raise UpstreamError(f"provider {self.name} sent a malformed response")
        text = "".join(
            b["text"]
            for b in blocks
            if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
        )
        usage = _usage(
            token_count(answer.get("usage"), "input_tokens"),
            token_count(answer.get("usage"), "output_tokens"),
        )
        payload = {
            "id": f"chatcmpl-{answer.get('id') or new_id()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": answer.get("model") or body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": FINISH_REASONS.get(str(answer.get("stop_reason")), "stop"),
                }
            ],
        }
        if usage is not None:
            payload["usage"] = _openai_usage(usage)
        return Completion(body=json.dumps(payload).encode(), usage=usage, completion_text=text)

    async def open_stream(self, body: dict[str, Any]) -> UpstreamStream:
        response = await self._send(to_messages_request(body))
        return _AnthropicStream(self.name, response, body["model"], self.max_response_bytes)


class _AnthropicStream:
    """Anthropic stream events as OpenAI `chat.completion.chunk`s."""

    def __init__(
        self, provider: str, response: UpstreamResponse, model: str, max_event_bytes: int
    ) -> None:
        self._provider = provider
        self._response = response
        self._max_event_bytes = max_event_bytes
        self._meta = {
            "id": f"chatcmpl-{new_id()}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }
        self._prompt_tokens: int | None = None
        self._completion_tokens: int | None = None

    def _chunk(self, payload: dict[str, Any]) -> StreamChunk:
        return parse_chunk(json.dumps({**self._meta, **payload}, separators=(",", ":")).encode())

    def _delta(self, delta: dict[str, Any], finish_reason: str | None = None) -> StreamChunk:
        return self._chunk(
            {"choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
        )

    async def __aiter__(self) -> AsyncIterator[list[StreamChunk]]:
        self._prompt_tokens = self._completion_tokens = None
        try:
            async with aclosing(
                iter_sse_batches(self._response.aiter_bytes(), self._max_event_bytes)
            ) as batches:
                async for batch in batches:
                    chunks: list[StreamChunk] = []
                    done = False
                    for data in batch:
                        done = self._translate(data, chunks)
                        if done:
                            break
                    if chunks:
                        yield chunks
                    if done:
                        return
        except httpx.HTTPError as exc:
            raise transport_error(self._provider, exc) from exc

    def _translate(self, data: bytes, out: list[StreamChunk]) -> bool:
        """Append the OpenAI chunks one Anthropic event makes; True at `message_stop`."""
        try:
            event = json.loads(data)
        except (ValueError, RecursionError):  # not JSON, or nested too deep to parse
            event = None
        if not isinstance(event, dict):
            raise UpstreamError("provider sent a malformed stream event")
        kind = event.get("type")
        if kind == "message_start":
            message = _object(event.get("message"))
            if isinstance(message.get("model"), str) and message["model"]:
                self._meta["model"] = message["model"]
            self._prompt_tokens = token_count(message.get("usage"), "input_tokens")
            out.append(self._delta({"role": "assistant", "content": ""}))
        elif kind == "content_block_delta":
            delta = _object(event.get("delta"))
            text = delta.get("text")
            if delta.get("type") == "text_delta" and isinstance(text, str) and text:
                out.append(self._delta({"content": text}))
        elif kind == "message_delta":
            # Cumulative: a later count replaces an earlier one.
            output = token_count(event.get("usage"), "output_tokens")
            if output is not None:
                self._completion_tokens = output
            reason = _object(event.get("delta")).get("stop_reason")
            if isinstance(reason, str) and reason:
                out.append(self._delta({}, FINISH_REASONS.get(reason, "stop")))
        elif kind == "message_stop":
            usage = _usage(self._prompt_tokens, self._completion_tokens)
            if usage is not None:
                out.append(self._chunk({"choices": [], "usage": _openai_usage(usage)}))
            return True
        elif kind == "error":
            error = _object(event.get("error"))
            raise UpstreamError(f"provider error mid-stream: {error.get('message')}")
        return False

    async def aclose(self) -> None:
        await self._response.aclose()
