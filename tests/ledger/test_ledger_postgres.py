"""PostgresLedger against a real PostgreSQL: arithmetic, closing rules, races and constraints."""

from __future__ import annotations

import asyncio
import hashlib
from typing import TYPE_CHECKING, TypeAlias

import asyncpg
import pytest

from ledger.entry import MAX_AMOUNT, EntryKind
from ledger.interface import (
    ESCROW,
    FEE,
    ISSUANCE,
    AccountKind,
    AccountRef,
    Hold,
    HoldClosedError,
    InsufficientFundsError,
    InvalidAmountError,
    Ledger,
    UnknownAccountError,
)
from ledger.postgres import PostgresLedger

if TYPE_CHECKING:
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]

BUYER = AccountRef(AccountKind.BUYER, "key-1")
MINER = AccountRef(AccountKind.MINER, "ab" * 32)


def as_protocol(ledger: PostgresLedger) -> Ledger:
    return ledger  # mypy checks that PostgresLedger implements the coordinator's Ledger protocol


def ref(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


@pytest.fixture
async def ledger(db_pool: Pool) -> PostgresLedger:
    ledger = await PostgresLedger.create(db_pool)
    await ledger.open_account(BUYER)
    await ledger.open_account(MINER)
    return ledger


async def assert_books_balance(ledger: PostgresLedger, pool: Pool) -> None:
    """The invariants every state of the ledger must satisfy, recomputed from scratch."""
    balances = {b.account: b.balance for b in await ledger.balances()}
    assert sum(balances.values()) == 0
    assert all(v >= 0 for a, v in balances.items() if a != ISSUANCE)
    from_entries = dict.fromkeys(balances, 0)
    for entry in await ledger.entries(limit=100_000):
        from_entries[entry.debit] -= entry.amount
        from_entries[entry.credit] += entry.amount
    assert from_entries == balances
    open_holds = await pool.fetchval(
        "SELECT coalesce(sum(amount), 0) FROM ledger_holds WHERE status = 'open'"
    )
    assert balances[ESCROW] == open_holds


async def test_mint_hold_settle_moves_money_and_writes_entries(
    ledger: PostgresLedger, db_pool: Pool
) -> None:
    await ledger.mint(BUYER, 1_000, memo="welcome")
    hold = await ledger.hold(BUYER, 600, reference=ref("request"))
    assert (hold.buyer, hold.amount) == (BUYER, 600)
    assert await ledger.balance(BUYER) == 400
    assert await ledger.balance(ESCROW) == 600

    settlement = await ledger.settle(
        hold, miner=MINER, miner_credit=300, fee=50, reference=ref("receipt")
    )

    assert (settlement.hold_id, settlement.charged) == (hold.hold_id, 350)
    assert (settlement.miner_credit, settlement.fee, settlement.released) == (300, 50, 250)
    balances = {b.account: b.balance for b in await ledger.balances()}
    assert balances == {ISSUANCE: -1_000, ESCROW: 0, FEE: 50, BUYER: 650, MINER: 300}
    entries = await ledger.entries()
    assert [(e.kind, e.debit, e.credit, e.amount) for e in entries] == [
        (EntryKind.MINT, ISSUANCE, BUYER, 1_000),
        (EntryKind.HOLD, BUYER, ESCROW, 600),
        (EntryKind.SETTLE, ESCROW, MINER, 300),
        (EntryKind.FEE, ESCROW, FEE, 50),
        (EntryKind.RELEASE, ESCROW, BUYER, 250),
    ]
    assert [e.seq for e in entries] == sorted({e.seq for e in entries})
    assert entries[0].memo == "welcome" and entries[0].hold_id is None
    assert entries[1].reference == ref("request")
    assert {e.hold_id for e in entries[1:]} == {hold.hold_id}
    assert {e.reference for e in entries[2:]} == {ref("receipt")}
    await assert_books_balance(ledger, db_pool)


async def test_release_returns_the_whole_hold(ledger: PostgresLedger, db_pool: Pool) -> None:
    await ledger.mint(BUYER, 500)
    hold = await ledger.hold(BUYER, 200, reference=ref("r"))

    settlement = await ledger.release(hold)

    assert (settlement.charged, settlement.miner_credit, settlement.fee) == (0, 0, 0)
    assert settlement.released == 200
    assert await ledger.balance(BUYER) == 500
    last = (await ledger.entries())[-1]
    assert (last.kind, last.debit, last.credit, last.amount) == (
        EntryKind.RELEASE,
        ESCROW,
        BUYER,
        200,
    )
    assert last.reference == ref("r")  # nothing delivered: the request is the reference
    await assert_books_balance(ledger, db_pool)


async def test_settle_writes_no_zero_entries(ledger: PostgresLedger, db_pool: Pool) -> None:
    await ledger.mint(BUYER, 100)
    hold = await ledger.hold(BUYER, 100, reference=ref("r"))

    settlement = await ledger.settle(hold, miner=MINER, miner_credit=100, fee=0, reference=b"x")

    assert settlement.released == 0
    closing = [e for e in await ledger.entries() if e.kind != EntryKind.MINT][1:]
    assert [(e.kind, e.amount) for e in closing] == [(EntryKind.SETTLE, 100)]
    await assert_books_balance(ledger, db_pool)


async def test_a_hold_closes_exactly_once(ledger: PostgresLedger, db_pool: Pool) -> None:
    await ledger.mint(BUYER, 1_000)
    settled = await ledger.hold(BUYER, 100, reference=ref("a"))
    released = await ledger.hold(BUYER, 100, reference=ref("b"))
    await ledger.settle(settled, miner=MINER, miner_credit=10, fee=1, reference=b"r")
    await ledger.release(released)
    entries_before = len(await ledger.entries())

    with pytest.raises(HoldClosedError, match="settled"):
        await ledger.settle(settled, miner=MINER, miner_credit=10, fee=1, reference=b"r")
    with pytest.raises(HoldClosedError):
        await ledger.release(settled)
    with pytest.raises(HoldClosedError, match="released"):
        await ledger.settle(released, miner=MINER, miner_credit=0, fee=0, reference=b"r")
    with pytest.raises(HoldClosedError, match="no hold"):
        await ledger.release(Hold(hold_id=10**12, buyer=BUYER, amount=1))

    assert len(await ledger.entries()) == entries_before
    assert await ledger.balance(MINER) == 10
    await assert_books_balance(ledger, db_pool)


async def test_racing_settles_close_a_hold_once(ledger: PostgresLedger, db_pool: Pool) -> None:
    await ledger.mint(BUYER, 1_000)
    hold = await ledger.hold(BUYER, 100, reference=ref("r"))

    results = await asyncio.gather(
        *(
            ledger.settle(hold, miner=MINER, miner_credit=40, fee=10, reference=b"r")
            for _ in range(10)
        ),
        return_exceptions=True,
    )

    assert sum(not isinstance(r, Exception) for r in results) == 1
    assert all(isinstance(r, HoldClosedError) for r in results if isinstance(r, Exception))
    assert await ledger.balance(MINER) == 40
    await assert_books_balance(ledger, db_pool)


async def test_over_settling_is_refused_and_leaves_the_hold_open(
    ledger: PostgresLedger, db_pool: Pool
) -> None:
    await ledger.mint(BUYER, 1_000)
    hold = await ledger.hold(BUYER, 100, reference=ref("r"))

    with pytest.raises(InvalidAmountError):
        await ledger.settle(hold, miner=MINER, miner_credit=90, fee=11, reference=b"r")
    # A caller's Hold claiming more than was held does not fool the ledger.
    inflated = Hold(hold_id=hold.hold_id, buyer=BUYER, amount=10_000)
    with pytest.raises(InvalidAmountError, match="exceeds the 100 held"):
        await ledger.settle(inflated, miner=MINER, miner_credit=500, fee=0, reference=b"r")

    settlement = await ledger.settle(hold, miner=MINER, miner_credit=90, fee=10, reference=b"r")
    assert settlement.released == 0
    await assert_books_balance(ledger, db_pool)


@pytest.mark.parametrize("amount", [-1, 0, MAX_AMOUNT + 1, True, 1.5])
async def test_invalid_hold_and_mint_amounts(ledger: PostgresLedger, amount: int) -> None:
    await ledger.mint(BUYER, 1_000)
    with pytest.raises(InvalidAmountError):
        await ledger.hold(BUYER, amount, reference=ref("r"))
    with pytest.raises(InvalidAmountError):
        await ledger.mint(BUYER, amount)
    assert await ledger.balance(BUYER) == 1_000


@pytest.mark.parametrize(("miner_credit", "fee"), [(-1, 0), (0, -1), (MAX_AMOUNT, MAX_AMOUNT)])
async def test_invalid_settlement_amounts(
    ledger: PostgresLedger, miner_credit: int, fee: int
) -> None:
    await ledger.mint(BUYER, 1_000)
    hold = await ledger.hold(BUYER, 100, reference=ref("r"))
    with pytest.raises(InvalidAmountError):
        await ledger.settle(hold, miner=MINER, miner_credit=miner_credit, fee=fee, reference=b"")
    assert (await ledger.release(hold)).released == 100


async def test_a_hold_beyond_the_balance_is_refused(ledger: PostgresLedger, db_pool: Pool) -> None:
    await ledger.mint(BUYER, 99)

    with pytest.raises(InsufficientFundsError) as raised:
        await ledger.hold(BUYER, 100, reference=ref("r"))

    assert (raised.value.account, raised.value.needed, raised.value.available) == (BUYER, 100, 99)
    assert await ledger.balance(BUYER) == 99
    assert [e.kind for e in await ledger.entries()] == [EntryKind.MINT]
    await assert_books_balance(ledger, db_pool)


async def test_concurrent_holds_never_overdraw(ledger: PostgresLedger, db_pool: Pool) -> None:
    await ledger.mint(BUYER, 250)
    seen: list[int] = []
    racing = True

    async def watch() -> None:
        while racing:
            seen.append(await ledger.balance(BUYER))
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    results = await asyncio.gather(
        *(ledger.hold(BUYER, 10, reference=ref(str(i))) for i in range(100)),
        return_exceptions=True,
    )
    racing = False
    await watcher

    holds = [r for r in results if isinstance(r, Hold)]
    refused = [r for r in results if not isinstance(r, Hold)]
    assert len(holds) == 25
    assert len({h.hold_id for h in holds}) == 25
    assert all(isinstance(r, InsufficientFundsError) for r in refused)
    assert await ledger.balance(BUYER) == 0
    assert await ledger.balance(ESCROW) == 250
    assert seen and min(seen) >= 0
    await assert_books_balance(ledger, db_pool)


async def test_the_database_refuses_a_negative_balance(
    ledger: PostgresLedger, db_pool: Pool
) -> None:
    await ledger.mint(BUYER, 10)
    with pytest.raises(asyncpg.CheckViolationError):
        await db_pool.execute(
            "UPDATE ledger_accounts SET balance = -1 WHERE kind = 'buyer' AND owner = $1",
            BUYER.owner,
        )
    # Issuance is the one account allowed below zero.
    await db_pool.execute("UPDATE ledger_accounts SET balance = balance WHERE kind = 'issuance'")
    assert await ledger.balance(ISSUANCE) == -10


async def test_unknown_accounts(ledger: PostgresLedger, db_pool: Pool) -> None:
    stranger = AccountRef(AccountKind.BUYER, "nobody")
    with pytest.raises(UnknownAccountError):
        await ledger.balance(stranger)
    with pytest.raises(UnknownAccountError):
        await ledger.mint(stranger, 10)
    with pytest.raises(UnknownAccountError):
        await ledger.hold(stranger, 10, reference=ref("r"))

    await ledger.mint(BUYER, 100)
    hold = await ledger.hold(BUYER, 100, reference=ref("r"))
    ghost = AccountRef(AccountKind.MINER, "cd" * 32)
    with pytest.raises(UnknownAccountError, match="miner:"):
        await ledger.settle(hold, miner=ghost, miner_credit=1, fee=0, reference=b"r")
    # The failed settle rolled back: the hold is still open and can be settled properly.
    assert (await ledger.settle(hold, miner=MINER, miner_credit=1, fee=0, reference=b"r")).charged
    await assert_books_balance(ledger, db_pool)


async def test_accounts_must_be_well_formed(ledger: PostgresLedger) -> None:
    with pytest.raises(ValueError, match="system accounts"):
        await ledger.open_account(AccountRef(AccountKind.FEE, "mine"))
    with pytest.raises(ValueError, match="system accounts"):
        await ledger.open_account(AccountRef(AccountKind.BUYER))
    with pytest.raises(ValueError, match="mint into"):
        await ledger.mint(ESCROW, 10)
    with pytest.raises(ValueError, match="hold from"):
        await ledger.hold(MINER, 10, reference=b"r")
    await ledger.open_account(BUYER)  # again: a no-op
    assert [b.account for b in await ledger.balances()].count(BUYER) == 1


async def test_balances_are_ordered_by_account(ledger: PostgresLedger) -> None:
    for owner in ["zed", "Alpha", "émile", "bob"]:
        await ledger.open_account(AccountRef(AccountKind.BUYER, owner))
    accounts = [b.account for b in await ledger.balances()]
    assert accounts == sorted(accounts)
    assert len(accounts) == 3 + 4 + 2


async def test_balance_overflow_is_an_invalid_amount(ledger: PostgresLedger, db_pool: Pool) -> None:
    other = AccountRef(AccountKind.BUYER, "key-2")
    await ledger.open_account(other)
    await ledger.mint(BUYER, MAX_AMOUNT)
    with pytest.raises(InvalidAmountError, match="bigint"):
        await ledger.mint(other, MAX_AMOUNT)  # issuance would pass -2**63
    assert await ledger.balance(other) == 0
    await assert_books_balance(ledger, db_pool)


async def test_entries_page_by_seq(ledger: PostgresLedger) -> None:
    for i in range(1, 8):
        await ledger.mint(BUYER, i)
    everything = await ledger.entries()

    first = await ledger.entries(limit=3)
    rest = await ledger.entries(after_seq=first[-1].seq, limit=100)

    assert first + rest == everything
    assert [e.amount for e in everything] == list(range(1, 8))
    assert await ledger.entries(after_seq=everything[-1].seq) == []
    with pytest.raises(ValueError):
        await ledger.entries(limit=0)


async def test_schema_creation_is_idempotent(db_pool: Pool) -> None:
    first, second = await asyncio.gather(
        PostgresLedger.create(db_pool), PostgresLedger.create(db_pool)
    )
    await first.open_account(BUYER)
    await first.mint(BUYER, 42)

    again = await PostgresLedger.create(db_pool)

    assert await again.balance(BUYER) == 42
    assert await second.balance(BUYER) == 42
    kinds = [b.account.kind for b in await again.balances()]
    assert sorted(kinds) == sorted(["issuance", "escrow", "fee", "buyer"])


async def test_concurrent_settlements_to_one_miner_never_deadlock(
    ledger: PostgresLedger, db_pool: Pool
) -> None:
    # Regression: settling locked the miner's row FOR UPDATE after the hold's foreign key had
    # taken a key-share lock on it, so two settlements to one miner could deadlock.
    buyer = AccountRef(AccountKind.BUYER, "busy-buyer")
    miner = AccountRef(AccountKind.MINER, "busy-miner")
    await ledger.open_account(buyer)
    await ledger.open_account(miner)
    await ledger.mint(buyer, 1_000_000)

    async def request(index: int) -> None:
        hold = await ledger.hold(buyer, 1_000, reference=ref(f"request-{index}"))
        await ledger.settle(
            hold, miner=miner, miner_credit=900, fee=50, reference=ref(f"receipt-{index}")
        )

    await asyncio.wait_for(asyncio.gather(*(request(i) for i in range(120))), timeout=60)
    assert await ledger.balance(miner) == 120 * 900
    assert await ledger.balance(buyer) == 1_000_000 - 120 * 950
    open_holds = await db_pool.fetchval("SELECT count(*) FROM ledger_holds WHERE status = 'open'")
    assert open_holds == 0
    await assert_books_balance(ledger, db_pool)


async def test_release_open_holds_releases_only_its_holders_holds(
    ledger: PostgresLedger, db_pool: Pool
) -> None:
    await ledger.mint(BUYER, 1_000)
    # Holds placed together share one batch: each keeps its own holder.
    mine, theirs, nobodys, settled = await asyncio.gather(
        ledger.hold(BUYER, 100, reference=ref("mine"), holder="replica-a"),
        ledger.hold(BUYER, 200, reference=ref("theirs"), holder="replica-b"),
        ledger.hold(BUYER, 300, reference=ref("nobody's")),
        ledger.hold(BUYER, 50, reference=ref("settled"), holder="replica-a"),
    )
    await ledger.settle(settled, miner=MINER, miner_credit=40, fee=0, reference=ref("receipt"))
    holders = dict(await db_pool.fetch("SELECT id, holder FROM ledger_holds"))
    assert holders == {
        mine.hold_id: "replica-a",
        theirs.hold_id: "replica-b",
        nobodys.hold_id: None,
        settled.hold_id: "replica-a",
    }

    assert await ledger.release_open_holds(holder="replica-a") == 1
    assert await ledger.release_open_holds(holder="replica-a") == 0  # twice is harmless
    status = dict(await db_pool.fetch("SELECT id, status FROM ledger_holds"))
    assert status == {
        mine.hold_id: "released",
        theirs.hold_id: "open",
        nobodys.hold_id: "open",
        settled.hold_id: "settled",
    }
    assert await ledger.balance(BUYER) == 1_000 - 40 - 200 - 300
    with pytest.raises(HoldClosedError):
        await ledger.settle(mine, miner=MINER, miner_credit=10, fee=0, reference=ref("late"))

    assert await ledger.release_open_holds(holder=None) == 1  # the holds nobody owns
    status = dict(await db_pool.fetch("SELECT id, status FROM ledger_holds"))
    assert status[nobodys.hold_id] == "released" and status[theirs.hold_id] == "open"
    await assert_books_balance(ledger, db_pool)


async def test_a_ledger_made_before_holders_gets_the_column(db_pool: Pool) -> None:
    await PostgresLedger.create(db_pool)
    await db_pool.execute("ALTER TABLE ledger_holds DROP COLUMN holder")
    ledger = await PostgresLedger.create(db_pool)  # as the first start of this version does
    await ledger.open_account(BUYER)
    await ledger.mint(BUYER, 10)
    hold = await ledger.hold(BUYER, 10, reference=ref("r"), holder="replica-a")
    assert await db_pool.fetchval("SELECT holder FROM ledger_holds") == "replica-a"
    assert await ledger.release_open_holds(holder="replica-a") == 1
    with pytest.raises(HoldClosedError):
        await ledger.release(hold)
