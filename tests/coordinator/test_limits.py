"""Per-key limits: the token-bucket limiter on a fake clock, the 429s an OpenAI client sees, the
service refusing over-limit requests on a real ledger before anything is held, and the CLI."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import asyncpg
import openai
import pytest
from openai import AsyncOpenAI

from coordinator.api import Buyer, ChatMessage, CompletionRequest
from coordinator.billing.job_log import JobLog
from coordinator.billing.keys import KeyStore
from coordinator.billing.limits import (
    LimitsConfig,
    LocalRateLimits,
    RateLimiter,
    RateLimits,
    SpendGuard,
)
from coordinator.catalog import Catalog, CatalogEntry, request_cost
from coordinator.cli import main
from coordinator.dispatch.dispatcher import DispatchConfig, Dispatcher
from coordinator.dispatch.registry import MinerRegistry
from coordinator.dispatch.router import Router
from coordinator.errors import RateLimitedError, SpendLimitError
from coordinator.gateway.session import MinerSession
from coordinator.http.errors import duration
from coordinator.request_saga import BillingConfig, buyer_account, miner_account
from coordinator.service import MarketplaceService
from ledger.entry import EntryKind
from ledger.postgres import PostgresLedger
from tests.coordinator.core_fakes import (
    MODEL,
    WAIT_S,
    MinerKey,
    make_session,
    outbox_messages,
    play_job,
    stop_id,
    text_ids,
)
from tests.coordinator.fake_service import API_KEY, FakeInferenceService, Script, serving

if TYPE_CHECKING:
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(rpm: int = 0, tpm: int = 0, max_keys: int = 100) -> tuple[RateLimiter, Clock]:
    clock = Clock()
    config = LimitsConfig(requests_per_minute=rpm, tokens_per_minute=tpm, max_keys=max_keys)
    return RateLimiter(config, clock=clock), clock


# --- the limiter ---------------------------------------------------------------------------------


def test_requests_per_minute_burst_then_refill_evenly() -> None:
    limits, clock = limiter(rpm=3)
    for _ in range(3):
        limits.check("k", tokens=10)
    with pytest.raises(RateLimitedError) as raised:
        limits.check("k", tokens=10)
    error = raised.value
    assert error.limit_kind == "requests" and error.limit == 3 and error.remaining == 0
    assert error.retry_after_s == pytest.approx(20.0)  # one request per 20 s
    assert error.reset_s == pytest.approx(60.0)
    clock.now += 19.9
    with pytest.raises(RateLimitedError) as again:
        limits.check("k", tokens=10)
    assert again.value.retry_after_s == pytest.approx(0.1)
    clock.now += 0.1
    limits.check("k", tokens=10)
    limits.check("other", tokens=10)  # keys do not share buckets


def test_tokens_are_reserved_then_corrected_to_usage() -> None:
    limits, clock = limiter(tpm=600)
    first = limits.check("k", tokens=500)
    assert first.states["tokens"].remaining == 100 and "requests" not in first.states
    with pytest.raises(RateLimitedError) as raised:
        limits.check("k", tokens=200)
    assert raised.value.limit_kind == "tokens"
    assert raised.value.retry_after_s == pytest.approx(10.0)  # 100 missing at 10 per second
    limits.record_usage(first, tokens=120)  # the request used less than it reserved
    limits.record_usage(first, tokens=0)  # only the first correction counts
    second = limits.check("k", tokens=200)
    assert second.states["tokens"].remaining == 600 - 120 - 200
    limits.cancel(second)  # never reached a miner: costs nothing
    assert limits.check("k", tokens=0).states["tokens"].remaining == 480
    clock.now += 6
    assert limits.check("k", tokens=0).states["tokens"].remaining == 540


def test_a_request_larger_than_a_minute_waits_for_a_full_bucket_then_runs() -> None:
    limits, clock = limiter(tpm=100)
    limits.check("k", tokens=1)
    with pytest.raises(RateLimitedError) as raised:
        limits.check("k", tokens=250)
    assert raised.value.retry_after_s == pytest.approx(0.6)  # until the bucket is full
    clock.now += 0.6
    debt = limits.check("k", tokens=250)
    assert debt.states["tokens"].remaining == 0
    assert debt.states["tokens"].reset_s == pytest.approx(150.0)  # 250 tokens at 100/min


def test_cancel_gives_the_request_back() -> None:
    limits, _ = limiter(rpm=1)
    limits.cancel(limits.check("k", tokens=1))
    limits.check("k", tokens=1)
    with pytest.raises(RateLimitedError):
        limits.check("k", tokens=1)


def test_zero_means_unlimited() -> None:
    limits, _ = limiter(rpm=0, tpm=0)
    for _ in range(10_000):
        assert limits.check("k", tokens=10**9).states == {}


def test_idle_keys_are_forgotten_and_memory_is_bounded() -> None:
    limits, clock = limiter(rpm=1, max_keys=50)
    for n in range(200):
        limits.check(f"key-{n}", tokens=1)
    assert len(limits) == 50  # the least recently seen went first
    clock.now += 30
    limits.check("fresh", tokens=1)
    assert len(limits) == 50
    clock.now += 30  # a minute after all but "fresh" were last seen: their buckets are full
    limits.check("newer", tokens=1)
    assert len(limits) == 2
    with pytest.raises(RateLimitedError):
        limits.check("fresh", tokens=1)  # a key still in its minute is remembered
    limits.check("key-0", tokens=1)  # a forgotten key starts afresh


def test_reset_durations_use_openais_format() -> None:
    assert [duration(s) for s in (0.02, 0.5, 1.0, 1.25, 59.99, 60.0, 360.2)] == [
        "20ms",
        "500ms",
        "1s",
        "1.3s",
        "60s",
        "1m0s",
        "6m1s",
    ]


# --- what an OpenAI client sees ------------------------------------------------------------------


def chat(max_tokens: int | None) -> CompletionRequest:
    return CompletionRequest(
        model=MODEL,
        messages=(ChatMessage(role="user", content="Hello!"),),
        prompt=None,
        max_tokens=max_tokens,
        temperature=0.0,
        top_p=1.0,
        seed=1,
    )


async def test_a_rate_limit_is_a_429_with_openai_headers() -> None:
    limits, _ = limiter(rpm=2, tpm=1000)
    limits.check("key-1", tokens=300)
    limits.check("key-1", tokens=300)
    with pytest.raises(RateLimitedError) as raised:
        limits.check("key-1", tokens=300)
    service = FakeInferenceService(script=Script(enter_error=raised.value))
    async with (
        serving(service) as base_url,
        AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as client,
    ):
        with pytest.raises(openai.RateLimitError) as error:
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}]
            )
    response = error.value.response
    assert response.status_code == 429
    assert error.value.code == "rate_limit_exceeded"
    assert response.headers["retry-after"] == "30"
    assert response.headers["retry-after-ms"] == "30000"
    assert response.headers["x-ratelimit-limit-requests"] == "2"
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert response.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert response.headers["x-ratelimit-limit-tokens"] == "1000"
    assert response.headers["x-ratelimit-remaining-tokens"] == "400"
    assert response.headers["x-ratelimit-reset-tokens"] == "36s"


async def test_a_spend_limit_is_a_429_the_sdk_does_not_retry() -> None:
    service = FakeInferenceService(script=Script(enter_error=SpendLimitError("spend limit")))
    async with (
        serving(service) as base_url,
        AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=3) as client,
    ):
        with pytest.raises(openai.RateLimitError) as error:
            await client.completions.create(model=MODEL, prompt="hi")
    assert error.value.code == "spend_limit_exceeded"
    assert error.value.type == "insufficient_quota"
    assert "retry-after" not in error.value.response.headers
    assert len(service.runs) == 1  # x-should-retry: false stops the SDK's automatic retries


# --- the service on a real ledger ----------------------------------------------------------------

DISPATCH = DispatchConfig(max_attempts=1, first_token_timeout_s=WAIT_S, token_timeout_s=WAIT_S)


@dataclass
class Market:
    service: MarketplaceService
    ledger: PostgresLedger
    keys: KeyStore
    entry: CatalogEntry
    buyer: Buyer
    secret: str  # the buyer's API key
    key: MinerKey
    session: MinerSession

    def max_cost(self, request: CompletionRequest) -> int:
        assert request.messages is not None and request.max_tokens is not None
        prompt = len(self.entry.tokenizer.encode_chat(request.messages))
        return request_cost(self.entry, prompt_tokens=prompt, completion_tokens=request.max_tokens)

    async def authenticate(self) -> Buyer:
        """The buyer as a new request sees it (with its spend limit now)."""
        return await self.service.authenticate(self.secret)

    async def kinds(self) -> list[EntryKind]:
        return [entry.kind for entry in await self.ledger.entries()]

    async def play(self, text: str) -> asyncio.Task[object]:
        answer = [*text_ids(self.entry, text), stop_id(self.entry)]
        return asyncio.create_task(play_job(self.session, self.key, self.entry, answer))


async def make_market(pool: Pool, catalog: Catalog, limits: RateLimits | None) -> Market:
    ledger = await PostgresLedger.create(pool)
    keys = await KeyStore.create(pool)
    registry = MinerRegistry()
    service = MarketplaceService(
        BillingConfig(),
        catalog=catalog,
        keys=keys,
        ledger=ledger,
        registry=registry,
        dispatcher=Dispatcher(DISPATCH, registry=registry, router=Router(rng=random.Random(0))),
        job_log=await JobLog.create(pool),
        limits=limits,
    )
    secret = (await keys.issue("alice")).secret
    buyer = await service.authenticate(secret)
    await ledger.open_account(buyer_account(buyer))
    await ledger.mint(buyer_account(buyer), 10_000_000)
    key = MinerKey()
    session = make_session(catalog, key=key)
    registry.add(session)
    await ledger.open_account(miner_account(session.miner_id))
    return Market(service, ledger, keys, catalog.get(MODEL), buyer, secret, key, session)


async def test_a_spend_limit_refuses_before_anything_is_held(
    db_pool: Pool, catalog: Catalog
) -> None:
    market = await make_market(db_pool, catalog, None)
    request = chat(max_tokens=16)
    max_cost = market.max_cost(request)
    assert await market.keys.set_spend_limit(market.buyer.key_id, max_cost - 1)
    buyer = await market.authenticate()
    with pytest.raises(SpendLimitError, match="spend limit reached"):
        async with market.service.complete(buyer, request):
            pytest.fail("the completion started")
    assert await market.kinds() == [EntryKind.MINT]
    assert outbox_messages(market.session) == []

    assert await market.keys.set_spend_limit(market.buyer.key_id, max_cost)  # exactly enough
    buyer = await market.authenticate()
    miner = await market.play("Hi")
    async with market.service.complete(buyer, request) as completion:
        _ = [delta async for delta in completion]
    await asyncio.wait_for(miner, WAIT_S)
    assert 0 < completion.usage.cost < max_cost
    kinds = await market.kinds()
    assert kinds[:3] == [EntryKind.MINT, EntryKind.HOLD, EntryKind.SETTLE]
    with pytest.raises(SpendLimitError):  # what it spent now counts against the limit
        async with market.service.complete(buyer, request):
            pytest.fail("the completion started")
    assert await market.kinds() == kinds
    assert await market.keys.set_spend_limit(market.buyer.key_id, None)
    assert await market.keys.spend_limit(market.buyer.key_id) is None


async def test_the_spend_guard_takes_the_limit_from_the_buyer(db_pool: Pool) -> None:
    keys = await KeyStore.create(db_pool)
    guard = SpendGuard(job_log=await JobLog.create(db_pool))
    key = await keys.issue("alice", spend_limit=100)
    # The Buyer is what authentication said; the guard does not ask the database again.
    assert await guard.admit(Buyer(key.key_id, "alice", spend_limit=None), 1_000) is None
    limited = Buyer(key.key_id, "alice", spend_limit=150)
    first = await guard.admit(limited, 90)
    assert first is not None and first.amount == 90
    with pytest.raises(SpendLimitError, match="held by requests in flight"):
        await guard.admit(limited, 61)  # 90 held + 61 > 150
    await guard.finished(first)
    second = await guard.admit(limited, 150)
    assert second is not None
    await guard.finished(second)


async def test_a_rate_limited_request_is_refused_before_anything_is_held(
    db_pool: Pool, catalog: Catalog
) -> None:
    limits = LocalRateLimits(LimitsConfig(requests_per_minute=1, tokens_per_minute=0))
    market = await make_market(db_pool, catalog, limits)
    request = chat(max_tokens=8)
    miner = await market.play("Yo")
    async with market.service.complete(market.buyer, request) as completion:
        _ = [delta async for delta in completion]
    await asyncio.wait_for(miner, WAIT_S)
    kinds = await market.kinds()
    with pytest.raises(RateLimitedError) as raised:
        async with market.service.complete(market.buyer, request):
            pytest.fail("the completion started")
    assert 0 < raised.value.retry_after_s <= 60
    assert await market.kinds() == kinds
    assert outbox_messages(market.session) == []


# --- the CLI -------------------------------------------------------------------------------------


def test_keys_limit_sets_and_lifts_a_spend_limit(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = ["--database-url", database_url, "--data-dir", str(tmp_path)]
    assert main(["keys", "create", "--name", "bob", "--spend-limit", "2.5", *storage]) == 0

    async def limit_of_bob() -> tuple[str, int | None]:
        connection = await asyncpg.connect(database_url)
        try:
            row = await connection.fetchrow(
                "SELECT key_id, spend_limit FROM coordinator_api_keys WHERE name = 'bob'"
            )
        finally:
            await connection.close()
        assert row is not None
        return row["key_id"], row["spend_limit"]

    key_id, limit = asyncio.run(limit_of_bob())
    assert limit == 2_500_000
    capsys.readouterr()
    assert main(["keys", "limit", key_id, "0.75", *storage]) == 0
    assert "0.75" in capsys.readouterr().out
    assert asyncio.run(limit_of_bob()) == (key_id, 750_000)
    assert main(["keys", "limit", key_id, "none", *storage]) == 0
    assert asyncio.run(limit_of_bob()) == (key_id, None)
    assert main(["keys", "limit", "key_missing", "1", *storage]) == 2
    assert "no key 'key_missing'" in capsys.readouterr().err
