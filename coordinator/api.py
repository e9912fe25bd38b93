"""What the HTTP layer sees of the coordinator: an :class:`InferenceService`.

The HTTP layer parses and validates OpenAI-shaped JSON into a :class:`CompletionRequest`, asks
the service, and renders :class:`TextDelta` events as JSON or SSE. It knows nothing of miners,
gRPC or the ledger.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal, Protocol

from coordinator.dispatch.privacy import PrivacyPolicy
from coordinator.errors import LimitKind, RateLimitState
from ledger.public import BalanceSnapshot

FinishReason = Literal["stop", "length"]

ProviderSort = Literal["price", "throughput", "latency"]
"""OpenRouter's ``provider.sort``: lowest price, highest tokens/s, lowest time to first token."""


@dataclass(frozen=True)
class Buyer:
    """An authenticated API key."""

    key_id: str  # public identifier of the key (never the secret)
    name: str  # the operator's label for the key
    spend_limit: int | None = None  # micro-units it may spend in all; None: no limit


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["system", "user", "assistant"]  # who said it
    content: str  # plain text


@dataclass(frozen=True)
class ProviderPreferences:
    """OpenRouter's ``provider`` object: how the buyer wants its miner chosen."""

    sort: ProviderSort | None = None  # None: the default balance of free capacity, speed, trust
    # Most the buyer will pay, in credits per million tokens; None: no cap.
    max_prompt_price: Decimal | None = None  # max_price.prompt
    max_completion_price: Decimal | None = None  # max_price.completion
    allow_fallbacks: bool = True  # False: a miner failing before its first token is a 503
    # data_collection and trust: which miners may see the prompt (generation and spot checks).
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)

    def over_max_price(self, *, prompt: Decimal, completion: Decimal) -> list[str]:
        """What ``max_price`` refuses of a model priced ``prompt`` and ``completion`` credits per
        million tokens, as readable reasons; empty when the model is within the caps."""
        reasons = []
        if self.max_prompt_price is not None and prompt > self.max_prompt_price:
            reasons.append(f"prompt costs {prompt.normalize():f} > {self.max_prompt_price:f}")
        if self.max_completion_price is not None and completion > self.max_completion_price:
            reasons.append(
                f"completion costs {completion.normalize():f} > {self.max_completion_price:f}"
            )
        return reasons


@dataclass(frozen=True)
class CompletionRequest:
    """A validated request; exactly one of ``messages`` (chat) and ``prompt`` is set."""

    model: str  # catalog name
    messages: tuple[ChatMessage, ...] | None  # chat: rendered with the model's chat template
    prompt: str | None  # plain completion: tokenized as is
    max_tokens: int | None  # None: as many as the context and the balance allow
    temperature: float  # 0 is greedy
    top_p: float  # in (0, 1]
    seed: int | None  # None: the coordinator picks one
    stop: tuple[str, ...] = ()  # output ends just before the first of these strings (at most 4)
    provider: ProviderPreferences = ProviderPreferences()  # routing preferences
    logprobs: bool = False  # deltas carry their tokens' logprobs (the buyer asked for them)
    top_logprobs: int = 0  # alternatives per token (0-20), reported by the miner with logprobs


@dataclass(frozen=True)
class TokenLogprob:
    """One completion token as the miner reported it."""

    token_id: int  # id in the model's vocabulary
    text: str  # the token decoded on its own (U+FFFD where it holds part of a character)
    logprob: float  # the miner's claim: natural log, fp32 logits, temperature 1
    raw: bytes = b""  # the bytes it adds to the text (a part of a character is its real bytes)
    # The most likely tokens at its position when the buyer asked for top_logprobs, most
    # likely first (the miner's claims, like logprob).
    alternatives: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class TextDelta:
    """New output: text decoded so far minus text already sent, and the tokens behind it."""

    text: str  # may be "" while a multi-byte character is incomplete or a stop string may start
    token_count: int  # tokens this delta accounts for
    tokens: tuple[TokenLogprob, ...] = ()  # those tokens with their logprobs, in order


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int  # counted by the coordinator's own tokenizer
    completion_tokens: int  # tokens delivered to the buyer
    cost: int  # micro-units charged to the buyer

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class ModelCard:
    """A model as listed by GET /v1/models."""

    name: str  # catalog name
    context_length: int  # prompt + completion tokens
    input_price_per_mtok: int  # micro-units per million prompt tokens
    output_price_per_mtok: int  # micro-units per million completion tokens
    miners: int  # miners connected and serving it now
    vetted_miners: int  # of those, the ones the operator vetted (provider.trust: vetted)
    created: int  # unix time the catalog entry was loaded


@dataclass(frozen=True)
class Readiness:
    """Whether the coordinator can serve a completion now (``GET /health/ready``)."""

    ready: bool  # at least one miner is connected and serving a catalog model
    miners: int  # miners connected and serving a catalog model


class Completion(Protocol):
    """A running completion. Iterate for deltas; ``finish_reason`` and ``usage`` are final after.

    Iteration raises :class:`coordinator.errors.UpstreamError` when the miner fails mid-stream.
    A delta counts as delivered once the consumer asks for the next one (or iteration ends), so
    a consumer that stops early is billed only for what it took.
    """

    id: str  # "chatcmpl-..." / "cmpl-..." style identifier
    model: str  # catalog name
    created: int  # unix time
    prompt_tokens: int  # counted by the coordinator
    # The key's per-minute limits right after this request was admitted (empty: no limits), for
    # OpenAI's x-ratelimit-* headers on the response.
    rate_limits: Mapping[LimitKind, RateLimitState]

    def __aiter__(self) -> AsyncIterator[TextDelta]: ...

    @property
    def finish_reason(self) -> FinishReason | None: ...

    @property
    def usage(self) -> Usage: ...

    def abandon(self) -> None:
        """The response will never reach the buyer (a non-streaming client left): bill nothing."""
        ...


class InferenceService(Protocol):
    """The coordinator as the HTTP layer uses it."""

    async def authenticate(self, api_key: str) -> Buyer:
        """Raises AuthenticationError for a missing, unknown or revoked key."""
        ...

    async def models(self) -> list[ModelCard]:
        """The catalog, with live miner counts."""
        ...

    async def readiness(self) -> Readiness:
        """Live miner count; never raises and does no I/O, so health checks stay cheap."""
        ...

    def complete(
        self, buyer: Buyer, request: CompletionRequest
    ) -> AbstractAsyncContextManager[Completion]:
        """Starts a completion.

        Entering tokenizes, holds the maximum cost and waits for the first token, so every
        error that can happen before output (RequestError, NoMinerAvailableError) is raised
        here, before any response is sent. Leaving settles: the buyer pays for delivered tokens.
        """
        ...


class PublicLedger(Protocol):
    """The read-only ledger that auditors and miners see over HTTP. No authentication."""

    origin: str  # the log's name in its checkpoints
    verifier_key: str  # C2SP verifier key of the checkpoint signer

    async def latest_checkpoint(self) -> bytes | None:
        """The newest signed checkpoint note, or None before the first."""
        ...

    async def checkpoints(self, start: int, limit: int) -> list[bytes]:
        """Signed notes of checkpoints with size >= start, smallest first."""
        ...

    async def entries(self, start: int, limit: int) -> list[bytes]:
        """Raw entry bytes for seq in [start, start + limit)."""
        ...

    async def balances(self) -> BalanceSnapshot: ...

    async def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """Raises ValueError when index or size are outside the log."""
        ...

    async def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        """Raises ValueError when the sizes are outside the log."""
        ...
