"""Replica mode's admission: the durable hold is placed before the job is dispatched.

One process's in-memory credit estimate cannot see the holds other replicas place, so with
``hold_first`` the ledger's own check (a hold never takes a balance below zero) admits each
request, and the hold is released when nothing was delivered.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING, TypeAlias

import asyncpg
import pytest

from coordinator.catalog import Catalog
from coordinator.errors import (
    InsufficientCreditsError,
    NoMinerAvailableError,
    StorageUnavailableError,
)
from coordinator.http.errors import http_error_for
from ledger.entry import EntryKind
from ledger.interface import ESCROW
from ledger.postgres import PostgresLedger
from tests.coordinator.core_fakes import (
    WAIT_S,
    play_job,
    stop_id,
    text_ids,
)
from tests.coordinator.test_service import CREDIT, Market, build_market, chat, cost

if TYPE_CHECKING:
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]


@pytest.fixture
async def market(db_pool: Pool, catalog: Catalog) -> Market:
    return await build_market(db_pool, catalog, hold_first=True)


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


class _DatabaseDown:
    """The real ledger, except that placing a hold finds the database unreachable."""

    def __init__(self, ledger: PostgresLedger) -> None:
        self._ledger = ledger

    def __getattr__(self, name: str) -> object:
        return getattr(self._ledger, name)

    async def hold(self, *args: object, **kwargs: object) -> object:
        raise ConnectionRefusedError("connection refused")


async def test_a_database_that_cannot_be_reached_is_a_clean_503_and_nothing_is_sent(
    market: Market,
) -> None:
    await market.ledger.mint(market.account, CREDIT)
    service = market.service
    service._saga_parts = dataclasses.replace(
        service._saga_parts, ledger=_DatabaseDown(market.ledger)
    )
    with pytest.raises(StorageUnavailableError, match="nothing was charged") as refused:
        async with service.complete(market.buyer, chat(max_tokens=8)):
            pytest.fail("the completion started")
    error = http_error_for(refused.value)
    assert error.status == 503 and error.headers["Retry-After"] == "5"
    assert market.session.outbox.empty()  # the miner never saw the job
    assert await market.ledger.balance(market.account) == CREDIT
