"""MarketplaceService with a real ledger, key store and job log on PostgreSQL and a simulated miner.

The miner is a task that reads its session's outbox and delivers chunks and a signed result, so
everything from tokenizing to settlement runs for real, without gRPC or HTTP.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, TypeAlias

import asyncpg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from coordinator.api import Buyer, ChatMessage, CompletionRequest, ProviderPreferences, Usage
from coordinator.billing.job_log import JobLog
from coordinator.billing.keys import KeyStore
from coordinator.catalog import Catalog, CatalogEntry, request_cost
from coordinator.dispatch.dispatcher import DispatchConfig, Dispatcher
from coordinator.dispatch.registry import MinerRegistry
from coordinator.dispatch.router import Router
from coordinator.errors import (
    ContextLengthError,
    InsufficientCreditsError,
    NoMatchingEndpointError,
    NoMinerAvailableError,
)
from coordinator.gateway.session import MinerSession
from coordinator.request_saga import BillingConfig, buyer_account, miner_account
from coordinator.service import MarketplaceService
from ledger.entry import EntryKind
from ledger.interface import ESCROW, FEE, AccountRef
from ledger.postgres import PostgresLedger
from proto import miner_pb2
from proto.signing import receipt_message
from tests.coordinator.core_fakes import (
    FINISH,
    INPUT_PRICE_PER_MTOK,
    MODEL,
    OUTPUT_PRICE_PER_MTOK,
    WAIT_S,
    MinerKey,
    busy,
    failure,
    make_session,
    next_job,
    outbox_messages,
    play_job,
    stop_id,
    text_ids,
)

if TYPE_CHECKING:
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]

FEE_BPS = 750  # not the default, so the test shows the configured fee is the one applied
# Generous timeouts: the simulated miner answers at once, so they only bound a broken test.
DISPATCH = DispatchConfig(
    max_attempts=2,
    first_token_timeout_s=WAIT_S,
    token_timeout_s=WAIT_S,
    retry_after_s=3,
    queue_wait_s=0.2,  # short: a test of a busy market waits this long for its 503
)
CREDIT = 1_000_000


@dataclass
class Market:
    """A service wired to real components, one buyer and one simulated miner."""

    service: MarketplaceService
    ledger: PostgresLedger
    registry: MinerRegistry
    pool: Pool
    entry: CatalogEntry
    buyer: Buyer
    key: MinerKey  # the miner's identity
    session: MinerSession  # the miner's session, in the registry
    dispatcher: Dispatcher  # the service's, for its queue

    @property
    def account(self) -> AccountRef:
        return buyer_account(self.buyer)

    async def balances(self) -> tuple[int, int, int, int]:
        """(buyer, miner, fee, escrow) balances."""
        return (
            await self.ledger.balance(self.account),
            await self.ledger.balance(miner_account(self.session.miner_id)),
            await self.ledger.balance(FEE),
            await self.ledger.balance(ESCROW),
        )

    async def entry_kinds(self) -> list[EntryKind]:
        return [entry.kind for entry in await self.ledger.entries()]


@pytest.fixture
async def market(db_pool: Pool, catalog: Catalog) -> Market:
    return await build_market(db_pool, catalog)


async def build_market(db_pool: Pool, catalog: Catalog, *, hold_first: bool = False) -> Market:
    """A service on real components, an unfunded buyer and one simulated miner in the
    registry; ``hold_first`` as replicas run it."""
    ledger = await PostgresLedger.create(db_pool)
    keys = await KeyStore.create(db_pool)
    registry = MinerRegistry()
    dispatcher = Dispatcher(DISPATCH, registry=registry, router=Router(rng=random.Random(0)))
    service = MarketplaceService(
        BillingConfig(fee_bps=FEE_BPS),
        catalog=catalog,
        keys=keys,
        ledger=ledger,
        registry=registry,
        dispatcher=dispatcher,
        job_log=await JobLog.create(db_pool),
        hold_first=hold_first,
    )
    buyer = await service.authenticate((await keys.issue("alice")).secret)
    await ledger.open_account(buyer_account(buyer))
    key = MinerKey()
    session = make_session(catalog, key=key)
    registry.add(session)
    await ledger.open_account(miner_account(session.miner_id))
    return Market(
        service, ledger, registry, db_pool, catalog.get(MODEL), buyer, key, session, dispatcher
    )


def chat(
    max_tokens: int | None,
    content: str = "Hello!",
    *,
    provider: ProviderPreferences | None = None,
) -> CompletionRequest:
    return CompletionRequest(
        model=MODEL,
        messages=(ChatMessage(role="user", content=content),),
        prompt=None,
        max_tokens=max_tokens,
        temperature=0.0,
        top_p=1.0,
        seed=1,
        provider=provider or ProviderPreferences(),
    )


def prompt_tokens(market: Market, request: CompletionRequest) -> int:
    assert request.messages is not None
    return len(market.entry.tokenizer.encode_chat(request.messages))


def cost(market: Market, request: CompletionRequest, completion_tokens: int) -> int:
    return request_cost(
        market.entry,
        prompt_tokens=prompt_tokens(market, request),
        completion_tokens=completion_tokens,
    )


# --- settlement ---------------------------------------------------------------------------------


async def test_a_finished_job_is_settled_exactly_and_recorded(market: Market) -> None:
    await market.ledger.mint(market.account, CREDIT)
    escrow_before = await market.ledger.balance(ESCROW)
    request = chat(max_tokens=32)
    answer = [*text_ids(market.entry, "Hi there!"), stop_id(market.entry)]
    miner = asyncio.create_task(play_job(market.session, market.key, market.entry, answer))

    async with market.service.complete(market.buyer, request) as completion:
        deltas = aiter(completion)
        first = await anext(deltas)
        assert completion.hold is None  # nothing delivered yet: nothing held in the ledger
        assert await market.balances() == (CREDIT, 0, 0, escrow_before)
        text = first.text + "".join([delta.text async for delta in deltas])
        assert completion.hold is not None  # placed when the first delta was delivered
        await completion.hold
        buyer, _, _, escrow = await market.balances()
        assert CREDIT - buyer == escrow - escrow_before == cost(market, request, 32)  # the hold
    job, _ = await asyncio.wait_for(miner, WAIT_S)

    assert text == "Hi there!" and completion.finish_reason == "stop"
    assert list(job.prompt_token_ids) == market.entry.tokenizer.encode_chat(request.messages or ())
    assert job.sampling.max_tokens == 32 and job.sampling.seed == 1
    assert tuple(job.sampling.stop_token_ids) == market.entry.tokenizer.stop_token_ids
    charged = cost(market, request, len(answer))
    fee = charged * FEE_BPS // 10_000
    assert 0 < fee < charged  # the test's prices make both shares non-zero
    assert completion.usage == Usage(
        prompt_tokens=len(job.prompt_token_ids), completion_tokens=len(answer), cost=charged
    )
    assert await market.balances() == (CREDIT - charged, charged - fee, fee, escrow_before)

    verified = completion.verified
    assert verified is not None
    settlement = [
        e for e in await market.ledger.entries() if e.kind in (EntryKind.SETTLE, EntryKind.FEE)
    ]
    assert {e.reference for e in settlement} == {verified.receipt_sha256}
    row = await market.pool.fetchrow("SELECT * FROM coordinator_jobs WHERE job_id = $1", job.job_id)
    assert row is not None
    assert (row["key_id"], row["miner_id"], row["model"]) == (
        market.buyer.key_id,
        market.session.miner_id,
        MODEL,
    )
    assert (row["prompt_tokens"], row["completion_tokens"], row["cost"]) == (
        len(job.prompt_token_ids),
        len(answer),
        charged,
    )
    assert row["finish_reason"] == "stop"
    # The row alone proves the job: the signed bytes and the signature, checked with the key.
    assert row["receipt"] == receipt_message(verified.receipt)
    assert row["receipt_signature"] == verified.signature
    Ed25519PublicKey.from_public_bytes(market.key.public).verify(
        row["receipt_signature"], row["receipt"]
    )
    assert market.session.free_slots == 1


async def test_without_max_tokens_the_hold_is_sized_by_the_balance(market: Market) -> None:
    request = chat(max_tokens=None)
    room = market.entry.context_length - prompt_tokens(market, request)
    balance = cost(market, request, 5)
    affordable = max(n for n in range(room + 1) if cost(market, request, n) <= balance)
    assert 5 <= affordable < room
    await market.ledger.mint(market.account, balance)
    answer = text_ids(market.entry, "z") * affordable
    miner = asyncio.create_task(
        play_job(
            market.session, market.key, market.entry, answer, finish=FINISH.FINISH_REASON_LENGTH
        )
    )
    async with market.service.complete(market.buyer, request) as completion:
        deltas = [delta async for delta in completion]
        assert completion.hold is not None
        await completion.hold
        held = balance - await market.ledger.balance(market.account)
        assert held == cost(market, request, affordable) <= balance
    job, _ = await asyncio.wait_for(miner, WAIT_S)

    assert job.sampling.max_tokens == affordable
    assert sum(delta.token_count for delta in deltas) == affordable
    assert completion.finish_reason == "length"
    assert await market.ledger.balance(market.account) == balance - held


async def test_a_balance_short_of_one_token_is_refused_before_any_hold(market: Market) -> None:
    request = chat(max_tokens=None)
    balance = cost(market, request, 0)  # pays for the prompt only
    assert cost(market, request, 1) > balance
    await market.ledger.mint(market.account, balance)
    with pytest.raises(InsufficientCreditsError, match="one completion token"):
        async with market.service.complete(market.buyer, request):
            pytest.fail("the completion started")
    assert await market.ledger.balance(market.account) == balance
    assert await market.entry_kinds() == [EntryKind.MINT]
    assert outbox_messages(market.session) == []


async def test_max_tokens_beyond_the_balance_is_refused(market: Market) -> None:
    request = chat(max_tokens=100)
    await market.ledger.mint(market.account, cost(market, request, 99))
    with pytest.raises(InsufficientCreditsError, match="may cost up to"):
        async with market.service.complete(market.buyer, request):
            pytest.fail("the completion started")
    assert await market.entry_kinds() == [EntryKind.MINT]
    assert outbox_messages(market.session) == []


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        (
            CompletionRequest(
                model=MODEL,
                messages=None,
                prompt="a" * 600,
                max_tokens=None,
                temperature=1.0,
                top_p=1.0,
                seed=None,
            ),
            "prompt",
        ),
        (chat(max_tokens=None, content="b" * 600), "messages"),
        (chat(max_tokens=512), "max_tokens"),
    ],
    ids=["long-prompt", "long-chat", "max-tokens"],
)
async def test_beyond_the_context_is_refused(
    market: Market, request_: CompletionRequest, param: str
) -> None:
    assert market.entry.context_length == 512
    await market.ledger.mint(market.account, CREDIT)
    with pytest.raises(ContextLengthError, match="maximum context length is 512") as raised:
        async with market.service.complete(market.buyer, request_):
            pytest.fail("the completion started")
    assert raised.value.param == param
    assert await market.entry_kinds() == [EntryKind.MINT]
    assert outbox_messages(market.session) == []


async def test_no_miner_connected_charges_nothing(market: Market) -> None:
    await market.ledger.mint(market.account, CREDIT)
    market.registry.remove(market.session)
    with pytest.raises(NoMinerAvailableError):
        async with market.service.complete(market.buyer, chat(max_tokens=8)):
            pytest.fail("the completion started")
    assert await market.entry_kinds() == [EntryKind.MINT]


async def test_no_free_miner_writes_nothing_to_the_ledger(market: Market) -> None:
    await market.ledger.mint(market.account, CREDIT)
    busy(market.session)
    with pytest.raises(NoMinerAvailableError) as raised:
        async with market.service.complete(market.buyer, chat(max_tokens=8)):
            pytest.fail("the completion started")
    assert raised.value.retry_after == DISPATCH.retry_after_s
    assert await market.entry_kinds() == [EntryKind.MINT]  # no hold before a first token
    assert await market.balances() == (CREDIT, 0, 0, 0)


# --- buyers who leave ---------------------------------------------------------------------------


async def test_a_buyer_leaving_after_two_deltas_pays_for_two(market: Market) -> None:
    await market.ledger.mint(market.account, CREDIT)
    request = chat(max_tokens=16)
    answer = text_ids(market.entry, "abcde")
    miner = asyncio.create_task(
        play_job(market.session, market.key, market.entry, answer, until_cancelled=True)
    )
    taken: list[str] = []
    with pytest.raises(ConnectionResetError):
        async with market.service.complete(market.buyer, request) as completion:
            async for delta in completion:
                if len(taken) == 2:
                    # Writing the third delta fails: the buyer got two.
                    raise ConnectionResetError("the buyer hung up")
                taken.append(delta.text)
    job, cancelled = await asyncio.wait_for(miner, WAIT_S)

    assert cancelled, "the miner was not told to stop"
    assert taken == ["a", "b"] and completion.usage.completion_tokens == 2
    charged = cost(market, request, 2)
    fee = charged * FEE_BPS // 10_000
    assert await market.balances() == (CREDIT - charged, charged - fee, fee, 0)
    row = await market.pool.fetchrow("SELECT * FROM coordinator_jobs WHERE job_id = $1", job.job_id)
    assert row is not None
    assert (row["completion_tokens"], row["cost"], row["finish_reason"], row["receipt"]) == (
        2,
        charged,
        None,
        None,
    )
    assert market.session.free_slots == 1


async def test_a_cancelled_request_is_still_settled(market: Market) -> None:
    await market.ledger.mint(market.account, CREDIT)
    request = chat(max_tokens=16)
    answer = text_ids(market.entry, "abcde")
    miner = asyncio.create_task(
        play_job(market.session, market.key, market.entry, answer, until_cancelled=True)
    )
    two_taken = asyncio.Event()

    async def consume() -> None:
        async with market.service.complete(market.buyer, request) as completion:
            count = 0
            async for _ in completion:
                count += 1
                if count == 3:  # came back after two
                    two_taken.set()
                    await asyncio.Event().wait()  # the HTTP handler blocks; the client leaves

    consumer = asyncio.create_task(consume())
    await asyncio.wait_for(two_taken.wait(), WAIT_S)
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    _, cancelled = await asyncio.wait_for(miner, WAIT_S)
    assert cancelled
    charged = cost(market, request, 2)
    fee = charged * FEE_BPS // 10_000
    assert await market.balances() == (CREDIT - charged, charged - fee, fee, 0)


# --- the queue and the buyer's provider preferences ---------------------------------------------


async def test_a_queued_request_is_reserved_then_served_when_the_slot_frees(market: Market) -> None:
    await market.ledger.mint(market.account, CREDIT)
    placeholder = miner_pb2.Job(job_id="job-elsewhere", model=MODEL)
    market.session.start_job(placeholder)
    outbox_messages(market.session)
    request = chat(max_tokens=8)
    answer = [*text_ids(market.entry, "ok"), stop_id(market.entry)]

    async def buy() -> str:
        async with market.service.complete(market.buyer, request) as completion:
            return "".join([delta.text async for delta in completion])

    buyer = asyncio.create_task(buy())
    await wait_until(lambda: market.dispatcher.queue_depth(MODEL) == 1)
    # Waiting in the queue holds nothing in the ledger; the admission reserves it in memory.
    assert await market.ledger.balance(market.account) == CREDIT
    assert await market.service._credit.available(market.account) == CREDIT - cost(
        market, request, 8
    )
    miner = asyncio.create_task(play_job(market.session, market.key, market.entry, answer))
    assert market.session.deliver(failure(placeholder.job_id, "finished")) is None
    assert await asyncio.wait_for(buyer, WAIT_S) == "ok"
    await asyncio.wait_for(miner, WAIT_S)
    charged = cost(market, request, len(answer))
    assert (await market.balances())[0] == CREDIT - charged


async def test_a_buyer_who_leaves_the_queue_pays_nothing(market: Market) -> None:
    await market.ledger.mint(market.account, CREDIT)
    busy(market.session)
    outbox_messages(market.session)

    async def buy() -> None:
        async with market.service.complete(market.buyer, chat(max_tokens=8)):
            pytest.fail("the completion started")

    buyer = asyncio.create_task(buy())
    await wait_until(lambda: market.dispatcher.queue_depth(MODEL) == 1)
    buyer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await buyer
    assert market.dispatcher.queue_depth(MODEL) == 0
    assert await market.entry_kinds() == [EntryKind.MINT]  # no hold before a first token
    assert await market.balances() == (CREDIT, 0, 0, 0)
    assert outbox_messages(market.session) == []


@pytest.mark.parametrize(
    ("prompt", "completion"),
    [(Decimal("1.4999"), None), (None, Decimal("2.4")), (Decimal(0), Decimal(0))],
    ids=["prompt", "completion", "both"],
)
async def test_a_max_price_below_the_catalog_is_refused_before_anything_is_held(
    market: Market, prompt: Decimal | None, completion: Decimal | None
) -> None:
    assert (INPUT_PRICE_PER_MTOK, OUTPUT_PRICE_PER_MTOK) == (1_500_000, 2_500_000)
    await market.ledger.mint(market.account, CREDIT)
    preferences = ProviderPreferences(max_prompt_price=prompt, max_completion_price=completion)
    with pytest.raises(NoMatchingEndpointError, match="No endpoints found matching your max"):
        async with market.service.complete(market.buyer, chat(8, provider=preferences)):
            pytest.fail("the completion started")
    assert await market.entry_kinds() == [EntryKind.MINT]
    assert outbox_messages(market.session) == []


async def test_a_max_price_at_the_catalog_price_is_served(market: Market) -> None:
    await market.ledger.mint(market.account, CREDIT)
    at_price = ProviderPreferences(
        max_prompt_price=Decimal("1.5"), max_completion_price=Decimal("2.50")
    )
    answer = [stop_id(market.entry)]
    miner = asyncio.create_task(play_job(market.session, market.key, market.entry, answer))
    async with market.service.complete(market.buyer, chat(8, provider=at_price)) as completion:
        assert [delta async for delta in completion]
    await asyncio.wait_for(miner, WAIT_S)
    assert completion.finish_reason == "stop"


async def test_without_fallbacks_a_failing_miner_is_a_503_and_costs_nothing(
    market: Market, catalog: Catalog
) -> None:
    await market.ledger.mint(market.account, CREDIT)
    other = make_session(catalog)
    market.registry.add(other)
    no_fallbacks = ProviderPreferences(allow_fallbacks=False)

    async def fail_the_job() -> MinerSession:
        """Whichever miner gets the job fails it; returns that miner."""
        waits = {asyncio.ensure_future(next_job(s)): s for s in (market.session, other)}
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        (first,) = done
        chosen = waits[first]
        assert chosen.deliver(failure(first.result().job_id, "engine crashed")) is None
        return chosen

    miner = asyncio.create_task(fail_the_job())
    with pytest.raises(NoMinerAvailableError, match="engine crashed"):
        async with market.service.complete(market.buyer, chat(8, provider=no_fallbacks)):
            pytest.fail("the completion started")
    chosen = await asyncio.wait_for(miner, WAIT_S)
    spare = other if chosen is market.session else market.session
    assert outbox_messages(spare) == []  # a free miner, never tried
    assert await market.entry_kinds() == [EntryKind.MINT]  # no hold before a first token


async def test_sort_by_latency_reaches_the_router(market: Market, catalog: Catalog) -> None:
    await market.ledger.mint(market.account, CREDIT)
    slow_key = MinerKey()
    slow = make_session(catalog, key=slow_key)
    market.registry.add(slow)
    slow.speed.first_token(5.0)
    market.session.speed.first_token(0.05)
    latency = ProviderPreferences(sort="latency")
    answer = [stop_id(market.entry)]
    for _ in range(4):
        miner = asyncio.create_task(play_job(market.session, market.key, market.entry, answer))
        async with market.service.complete(market.buyer, chat(8, provider=latency)) as done:
            assert [delta async for delta in done]
        await asyncio.wait_for(miner, WAIT_S)
    assert outbox_messages(slow) == []


async def wait_until(condition: Callable[[], bool]) -> None:
    for _ in range(int(WAIT_S / 0.001)):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the condition never held")
