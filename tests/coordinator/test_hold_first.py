"""Replica mode's admission: the durable hold is placed before the job is dispatched.

One process's in-memory credit estimate cannot see the holds other replicas place, so with
``hold_first`` the ledger's own check (a hold never takes a balance below zero) admits each
request, and the hold is released when nothing was delivered.
"""

from __future__ import annotations

import asyncio
import random
from typing import TYPE_CHECKING, TypeAlias

import asyncpg
import pytest

from coordinator.billing.job_log import JobLog
from coordinator.billing.keys import KeyStore
from coordinator.catalog import Catalog
from coordinator.dispatch.dispatcher import Dispatcher
from coordinator.dispatch.registry import MinerRegistry
from coordinator.dispatch.router import Router
from coordinator.errors import InsufficientCreditsError, NoMinerAvailableError
from coordinator.request_saga import BillingConfig, buyer_account, miner_account
from coordinator.service import MarketplaceService
from ledger.entry import EntryKind
from ledger.interface import ESCROW
from ledger.postgres import PostgresLedger
from tests.coordinator.core_fakes import (
    MODEL,
    WAIT_S,
    MinerKey,
    make_session,
    play_job,
    stop_id,
    text_ids,
)
from tests.coordinator.test_service import CREDIT, DISPATCH, Market, chat, cost

if TYPE_CHECKING:
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]


@pytest.fixture
async def market(db_pool: Pool, catalog: Catalog) -> Market:
    ledger = await PostgresLedger.create(db_pool)
    keys = await KeyStore.create(db_pool)
    registry = MinerRegistry()
    dispatcher = Dispatcher(DISPATCH, registry=registry, router=Router(rng=random.Random(0)))
    service = MarketplaceService(
        BillingConfig(),
        catalog=catalog,
        keys=keys,
        ledger=ledger,
        registry=registry,
        dispatcher=dispatcher,
        job_log=await JobLog.create(db_pool),
        hold_first=True,
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


async def test_the_hold_is_in_the_ledger_before_the_first_token_and_settles_exactly(
    market: Market,
) -> None:
    await market.ledger.mint(market.account, CREDIT)
    escrow_before = await market.ledger.balance(ESCROW)
    request = chat(max_tokens=32)
    answer = [*text_ids(market.entry, "Hi there!"), stop_id(market.entry)]
    miner = asyncio.create_task(play_job(market.session, market.key, market.entry, answer))
    async with market.service.complete(market.buyer, request) as completion:
        assert completion.hold is not None and completion.hold.done()  # held before any delta
        buyer, _, _, escrow = await market.balances()
        assert CREDIT - buyer == escrow - escrow_before == cost(market, request, 32)
        text = "".join([delta.text async for delta in completion])
    await asyncio.wait_for(miner, WAIT_S)
    assert text == "Hi there!"
    charged = cost(market, request, len(answer))
    buyer, miner_credit, fee, escrow = await market.balances()
    assert (buyer, miner_credit + fee, escrow) == (CREDIT - charged, charged, escrow_before)


async def test_a_balance_that_cannot_cover_the_maximum_is_refused_before_dispatch(
    market: Market,
) -> None:
    request = chat(max_tokens=32)
    await market.ledger.mint(market.account, cost(market, request, 32) - 1)
    with pytest.raises(InsufficientCreditsError, match="insufficient credits"):
        async with market.service.complete(market.buyer, request):
            pass
    assert market.session.outbox.empty()  # the miner never saw the job
    assert EntryKind.HOLD not in await market.entry_kinds()


async def test_a_request_no_miner_took_releases_its_hold(market: Market) -> None:
    await market.ledger.mint(market.account, CREDIT)
    market.registry.remove(market.session)
    market.session.close("gone")
    with pytest.raises(NoMinerAvailableError):
        async with market.service.complete(market.buyer, chat(max_tokens=32)):
            pass
    assert await market.ledger.balance(market.account) == CREDIT
    assert await market.ledger.balance(ESCROW) == 0
