"""A scriptable :class:`coordinator.api.InferenceService` for testing the HTTP layer alone.

It follows the service contract the HTTP layer relies on: errors before output are raised on
entering ``complete``; a delta counts as delivered once the consumer asks for the next one (or
iteration ends); usage bills delivered tokens only. Each call is recorded as a :class:`Run`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import web

from coordinator.api import (
    Buyer,
    CompletionRequest,
    FinishReason,
    ModelCard,
    Readiness,
    TextDelta,
    Usage,
)
from coordinator.errors import AuthenticationError, LimitKind, RateLimitState
from coordinator.http.app import create_app

API_KEY = "sk-test-key"
PROMPT_TOKENS = 7  # what the fake "tokenizer" counts for any prompt
INPUT_PRICE_PER_TOKEN = 3  # micro-units
OUTPUT_PRICE_PER_TOKEN = 5  # micro-units


@dataclass
class Script:
    """What the next completions do."""

    deltas: Sequence[TextDelta] = ()  # yielded in order
    finish_reason: FinishReason = "stop"  # reported once iteration ends
    enter_error: BaseException | None = None  # raised on entering complete()
    error_after: int | None = None  # raise ``error`` when asked for delta number k (0-based)
    error: BaseException | None = None  # the mid-stream failure
    delay: float = 0.0  # seconds before each delta, to leave room for a client to leave
    enter_delay: float = 0.0  # seconds entering complete() takes (a queue, a slow first token)
    rate_limits: dict[LimitKind, RateLimitState] = field(default_factory=dict)  # on admission


@dataclass
class Run:
    """One call of ``complete``, as the service saw it."""

    request: CompletionRequest  # what the HTTP layer parsed
    taken: int = 0  # deltas handed to the consumer
    delivered: int = 0  # deltas the consumer came back after (billable)
    finished: bool = False  # iteration ran to its end
    exited: bool = False  # the context was left
    exit_error: BaseException | None = None  # what the context was left with
    left: asyncio.Event = field(default_factory=asyncio.Event)  # set once the context was left


class FakeCompletion:
    def __init__(self, script: Script, run: Run, *, model: str) -> None:
        self.id = "chatcmpl-fake" if run.request.messages is not None else "cmpl-fake"
        self.model = model
        self.created = 1_700_000_000
        self.prompt_tokens = PROMPT_TOKENS
        self.rate_limits = script.rate_limits
        self._script = script
        self._run = run
        self.abandoned = False

    def __aiter__(self) -> AsyncIterator[TextDelta]:
        return self

    async def __anext__(self) -> TextDelta:
        run, script = self._run, self._script
        run.delivered = run.taken  # asking again delivers the previous delta
        if script.error_after is not None and run.taken == script.error_after:
            assert script.error is not None
            raise script.error
        if run.taken == len(script.deltas):
            run.finished = True
            raise StopAsyncIteration
        if script.delay:
            await asyncio.sleep(script.delay)
        delta = script.deltas[run.taken]
        run.taken += 1
        return delta

    @property
    def finish_reason(self) -> FinishReason | None:
        return self._script.finish_reason if self._run.finished else None

    def abandon(self) -> None:
        self.abandoned = True

    @property
    def usage(self) -> Usage:
        completion = sum(delta.token_count for delta in self._script.deltas[: self._run.delivered])
        return Usage(
            prompt_tokens=PROMPT_TOKENS,
            completion_tokens=completion,
            cost=PROMPT_TOKENS * INPUT_PRICE_PER_TOKEN + completion * OUTPUT_PRICE_PER_TOKEN,
        )


@dataclass
class FakeInferenceService:
    """Knows one API key; serves whatever ``script`` says; records every run."""

    script: Script = field(default_factory=Script)
    cards: list[ModelCard] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    models_error: BaseException | None = None  # raised by models()
    miners: int = 0  # what readiness() reports as connected
    started: asyncio.Event = field(default_factory=asyncio.Event)  # set by every complete() call

    async def authenticate(self, api_key: str) -> Buyer:
        if api_key != API_KEY:
            raise AuthenticationError("Incorrect API key provided")
        return Buyer(key_id="key-1", name="test")

    async def models(self) -> list[ModelCard]:
        if self.models_error is not None:
            raise self.models_error
        return list(self.cards)

    async def readiness(self) -> Readiness:
        return Readiness(ready=self.miners > 0, miners=self.miners)

    @asynccontextmanager
    async def complete(
        self, buyer: Buyer, request: CompletionRequest
    ) -> AsyncIterator[FakeCompletion]:
        run = Run(request=request)
        self.runs.append(run)
        self.started.set()
        if self.script.enter_error is not None:
            raise self.script.enter_error
        try:
            await asyncio.sleep(self.script.enter_delay)
        except BaseException as exc:
            run.exit_error = exc
            run.exited = True
            run.left.set()
            raise
        try:
            yield FakeCompletion(self.script, run, model=request.model)
        except BaseException as exc:
            run.exit_error = exc
            raise
        finally:
            run.exited = True
            run.left.set()


def text_deltas(*texts: str) -> list[TextDelta]:
    """One token per delta."""
    return [TextDelta(text=text, token_count=1) for text in texts]


@asynccontextmanager
async def serving(
    service: FakeInferenceService,
    *,
    max_body_bytes: int | None = None,
    handler_cancellation: bool = False,
) -> AsyncIterator[str]:
    """Serves the real HTTP app on a free loopback port; yields its base URL (…/v1).

    ``handler_cancellation`` is aiohttp's switch for cancelling a handler whose client left
    (off by default in production, on in aiohttp's TestServer); the app must cope with both.
    """
    app = (
        create_app(service)
        if max_body_bytes is None
        else create_app(service, max_body_bytes=max_body_bytes)
    )
    runner = web.AppRunner(app, handler_cancellation=handler_cancellation)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}/v1"
    finally:
        await runner.cleanup()
