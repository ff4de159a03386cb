"""Which upstream serves a requested model: direct names, aliases and fallback chains."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from app.core.anthropic import AnthropicProvider
from app.core.config import ModelRoute, Price, ProviderConfig
from app.core.errors import ApiError, NotFound, RateLimited, UpstreamError
from app.core.providers import (
    ECHO_MODEL,
    EchoProvider,
    OpenAIProvider,
    Provider,
    retry_after_seconds,
)
from app.core.upstream_transport import AiohttpTransport

logger = logging.getLogger("livegate.routing")
T = TypeVar("T")

# A model name quoted back in an error is cut here: a body may name a megabyte.
QUOTED_MODEL_LENGTH = 256

# Failures worth another try: the upstream was busy, broken or slow, not the request wrong.
RETRYABLE = (RateLimited, UpstreamError)


@dataclass(frozen=True, slots=True)
class Target:
    provider: Provider
    model: str  # the name the upstream knows
    price: Price | None
    max_retries: int

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        if self.price is None:
            return 0.0
        return (
            prompt_tokens * self.price.prompt + completion_tokens * self.price.completion
        ) / 1_000_000


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model as clients see it listed."""

    name: str
    owned_by: str
    description: str | None
    max_tokens: int | None
    price: Price | None


class ModelRouter:
    def __init__(
        self,
        configs: list[ProviderConfig],
        routes: list[ModelRoute],
        upstream: AiohttpTransport,
        echo_delay: float = 0.05,
    ) -> None:
        self._chains: dict[str, list[Target]] = {}
        self._catalogue: list[ModelInfo] = []
        if not configs:
            echo = EchoProvider(echo_delay)
            self._chains[ECHO_MODEL] = [Target(echo, ECHO_MODEL, None, 0)]
            self._catalogue.append(
                ModelInfo(ECHO_MODEL, echo.name, "Echoes your message", None, None)
            )
            return
        direct: dict[tuple[str, str], Target] = {}
        for config in configs:
            provider: Provider = (
                AnthropicProvider(config, upstream)
                if config.kind == "anthropic"
                else OpenAIProvider(config, upstream)
            )
            for model in config.models:
                target = Target(provider, model, config.prices.get(model), config.max_retries)
                direct[(config.name, model)] = target
                self._chains.setdefault(model, [target])
        for route in routes:
            chain = [direct[tuple(t.split(":", 1))] for t in route.targets]  # type: ignore[index]
            self._chains[route.name] = chain
            self._catalogue.append(
                ModelInfo(
                    route.name, "livegate", route.description, route.max_tokens, chain[0].price
                )
            )
        aliases = {r.name for r in routes}
        for (provider_name, model), target in direct.items():
            if model not in aliases:
                self._catalogue.append(ModelInfo(model, provider_name, None, None, target.price))

    def chain(self, model: str) -> list[Target]:
        try:
            return self._chains[model]
        except KeyError:
            if len(model) > QUOTED_MODEL_LENGTH:
                model = model[:QUOTED_MODEL_LENGTH] + "…"
            raise NotFound(
                f"The model `{model}` does not exist or you do not have access to it.",
                code="model_not_found",
            ) from None

    def catalogue(self) -> list[ModelInfo]:
        return list(self._catalogue)

    def chat_model(self, preferred: str | None) -> str:
        """The model for chats that name none: the configured one, else the first listed."""
        return preferred if preferred is not None else self._catalogue[0].name


def backoff(attempt: int, error: ApiError) -> float:
    """Seconds before retry `attempt` (1-based): exponential, or the upstream's Retry-After."""
    retry_after = retry_after_seconds(error.headers.get("Retry-After"))
    if retry_after is not None:
        return min(float(retry_after), 5.0)
    return float(min(0.25 * 2 ** (attempt - 1), 2.0))


async def first_answer(
    chain: list[Target], call: Callable[[Target], Awaitable[T]]
) -> tuple[Target, T]:
    """Try `call` on each target in order, retrying each on busy/broken/slow upstreams.

    A refusal of the request itself (4xx other than 429) is raised at once: another
    provider would refuse it too. When every target failed, the last error is raised.
    """
    last: ApiError | None = None
    for target in chain:
        for attempt in range(target.max_retries + 1):
            if attempt and last is not None:
                await asyncio.sleep(backoff(attempt, last))
            try:
                return target, await call(target)
            except RETRYABLE as exc:
                last = exc
                logger.warning(
                    "provider %s failed for %s (attempt %d): %s",
                    target.provider.name,
                    target.model,
                    attempt + 1,
                    exc.message,
                )
    assert last is not None
    raise last
