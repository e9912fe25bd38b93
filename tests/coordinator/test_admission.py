"""CreditGuard: admitting requests against an in-memory estimate of each buyer's balance."""

from __future__ import annotations

import asyncio
import random

import asyncpg
import pytest

from coordinator.billing.admission import CreditGuard, CreditsShortError
from ledger.interface import AccountKind, AccountRef, InsufficientFundsError
from ledger.postgres import PostgresLedger

BUYER = AccountRef(AccountKind.BUYER, "key_buyer")
OTHER = AccountRef(AccountKind.BUYER, "key_other")
MINER = AccountRef(AccountKind.MINER, "miner")


class Balances:
    """Balances as a ledger reports them; counts the reads."""

    def __init__(self, **balances: int) -> None:
        self.balances = {AccountRef(AccountKind.BUYER, f"key_{k}"): v for k, v in balances.items()}
        self.reads = 0

    async def read(self, account: AccountRef) -> int:
        self.reads += 1
        await asyncio.sleep(0)
        return self.balances.get(account, 0)


async def test_the_balance_is_read_once_then_admissions_are_in_memory() -> None:
    ledger = Balances(buyer=1000)
    guard = CreditGuard(ledger.read)
    first = await guard.admit(BUYER, 300)
    second = await guard.admit(BUYER, 300)
    assert ledger.reads == 1
    guard.finished(first, charged=0, held=True)
    guard.finished(second, charged=0, held=True)
    assert await guard.admit(BUYER, 1000) is not None and ledger.reads == 1


async def test_a_request_beyond_the_balance_is_refused_after_a_fresh_read() -> None:
    ledger = Balances(buyer=500)
    guard = CreditGuard(ledger.read)
    admitted = await guard.admit(BUYER, 400)
    with pytest.raises(CreditsShortError) as refused:
        await guard.admit(BUYER, 200)
    assert refused.value.available == 100  # 500 read again, 400 of it still pending
    assert ledger.reads == 2
    guard.finished(admitted, charged=0, held=True)


async def test_money_that_arrived_elsewhere_is_found_before_refusing() -> None:
    ledger = Balances(buyer=100)
    guard = CreditGuard(ledger.read)
    await guard.admit(BUYER, 50)
    ledger.balances[BUYER] = 10_000  # `credits add` from another process
    admission = await guard.admit(BUYER, 5_000)
    assert admission.amount == 5_000 and ledger.reads == 2


async def test_sizing_by_the_balance_reads_it_afresh() -> None:
    ledger = Balances(buyer=100)
    guard = CreditGuard(ledger.read)
    admission = await guard.admit(BUYER, 60)
    ledger.balances[BUYER] = 10_100  # money arrived; the 60 is still admitted, not yet held
    assert await guard.available(BUYER) == 10_040
    guard.cancel(admission)
    assert await guard.available(BUYER) == 10_100


async def test_concurrent_admissions_never_exceed_the_balance() -> None:
    ledger = Balances(buyer=1000)
    guard = CreditGuard(ledger.read)

    async def one() -> bool:
        try:
            await guard.admit(BUYER, 300)
        except CreditsShortError:
            return False
        return True

    admitted = await asyncio.gather(*(one() for _ in range(10)))
    assert sum(admitted) == 3


async def test_a_failed_hold_makes_the_estimate_stale() -> None:
    ledger = Balances(buyer=1000)
    guard = CreditGuard(ledger.read)
    admission = await guard.admit(BUYER, 600)
    ledger.balances[BUYER] = 0  # another coordinator spent it all
    guard.finished(admission, charged=0, held=False)
    with pytest.raises(CreditsShortError):
        await guard.admit(BUYER, 1)
    assert ledger.reads == 2


async def test_a_hold_committing_during_a_read_is_counted_once() -> None:
    ledger = Balances(buyer=1000)
    guard = CreditGuard(ledger.read)
    admission = await guard.admit(BUYER, 300)  # its hold is still committing
    reads_before = ledger.reads

    async def read_racing_the_commit(account: AccountRef) -> int:
        balance = ledger.balances[account]  # read before the commit: 1000
        if ledger.reads == reads_before:
            ledger.balances[account] -= 300  # the hold commits meanwhile
            guard.held(admission)
        ledger.reads += 1
        await asyncio.sleep(0)
        return balance

    guard._read_balance = read_racing_the_commit
    with pytest.raises(CreditsShortError) as refused:
        await guard.admit(BUYER, 800)
    # The stale read (1000 with the hold no longer pending) would have admitted it.
    assert refused.value.available == 700
    assert ledger.reads == reads_before + 2


async def test_a_settlement_that_a_read_already_counts_is_not_added_again() -> None:
    ledger = Balances(buyer=1000)
    guard = CreditGuard(ledger.read)
    first = await guard.admit(BUYER, 100)
    ledger.balances[BUYER] -= 100  # its hold commits
    guard.held(first)
    other = await guard.admit(BUYER, 100)  # keeps the account's estimate in use
    guard.settling(first)
    ledger.balances[BUYER] += 60  # the settlement commits: 40 charged, 60 back
    assert await guard.available(BUYER) == 860  # a read between the commit and finished()
    guard.finished(first, charged=40, held=True)
    # Adding the 60 again would make 920 and admit 900 beyond the 860 the buyer has.
    with pytest.raises(CreditsShortError) as refused:
        await guard.admit(BUYER, 900)
    assert refused.value.available == 860
    guard.finished(other, charged=0, held=False)


async def test_a_request_admitted_from_a_read_in_flight_is_never_forgotten() -> None:
    ledger = Balances(buyer=1000)
    guard = CreditGuard(ledger.read)
    first = await guard.admit(BUYER, 100)
    gate = asyncio.Event()
    read = ledger.read

    async def slow_read(account: AccountRef) -> int:
        balance = await read(account)
        await gate.wait()
        return balance

    guard._read_balance = slow_read
    second = asyncio.create_task(guard.admit(BUYER, 950))  # too much for the estimate: reads
    await asyncio.sleep(0.01)
    guard.finished(first, charged=0, held=False)  # the first hold failed, while that read runs
    gate.set()
    await second  # admitted from the read: 1000 with nothing else pending
    # Its 950 are still pending: a request for 900 more must be refused, not admitted from an
    # estimate that forgot it.
    with pytest.raises(CreditsShortError) as refused:
        await guard.admit(BUYER, 900)
    assert refused.value.available == 50


async def test_idle_estimates_are_evicted_beyond_the_bound() -> None:
    ledger = Balances(buyer=10, other=10)
    guard = CreditGuard(ledger.read, max_accounts=2)
    busy = await guard.admit(BUYER, 5)
    for n in range(5):
        await guard.available(AccountRef(AccountKind.BUYER, f"key_idle{n}"))
    assert len(guard._accounts) <= 2
    assert BUYER in guard._accounts  # a request in flight keeps its account's estimate
    guard.finished(busy, charged=5, held=True)
    assert await guard.available(BUYER) == 5


async def test_the_estimate_follows_the_real_ledger(
    db_pool: asyncpg.Pool[asyncpg.Record],
) -> None:
    """Random concurrent requests through real holds and settlements: afterwards the estimate
    equals the balance and no request was admitted beyond it."""
    ledger = await PostgresLedger.create(db_pool)
    try:
        for account in (BUYER, MINER):
            await ledger.open_account(account)
        await ledger.mint(BUYER, 50_000)
        guard = CreditGuard(ledger.balance)
        rng = random.Random(7)
        refused = 0

        async def request(n: int) -> None:
            nonlocal refused
            amount = rng.randrange(1_000, 8_000)
            try:
                admission = await guard.admit(BUYER, amount)
            except CreditsShortError:
                refused += 1
                return
            try:
                hold = await ledger.hold(BUYER, amount, reference=n.to_bytes(32, "big"))
            except InsufficientFundsError:
                guard.finished(admission, charged=0, held=False)
                raise
            guard.held(admission)
            await asyncio.sleep(rng.random() / 100)
            charged = rng.randrange(0, amount + 1)
            guard.settling(admission)
            if charged:
                await ledger.settle(
                    hold, miner=MINER, miner_credit=charged, fee=0, reference=b"r" * 32
                )
            else:
                await ledger.release(hold)
            guard.finished(admission, charged=charged, held=True)

        for _ in range(4):
            await asyncio.gather(*(request(n) for n in range(40)))
        assert refused > 0  # the balance ran short, and nothing was overspent meanwhile
        assert await guard.available(BUYER) == await ledger.balance(BUYER)
    finally:
        await ledger.aclose()
