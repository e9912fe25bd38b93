"""The ledger side of spot checks against a real PostgreSQL: slash, refund, reward, unmatured
credits, the schema upgrade that admits REWARD, and the auditor's verdict on what they write."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import asyncpg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger.audit import audit
from ledger.audit_report import AuditReport
from ledger.audit_source import DumpAuditSource
from ledger.batch import Transfer, apply_batch
from ledger.checkpoint import CheckpointSigner
from ledger.checkpointer import Checkpointer, CheckpointerConfig
from ledger.dump import dump_ledger
from ledger.entry import MAX_AMOUNT, MAX_MEMO_BYTES, EntryKind, decode_entry
from ledger.interface import (
    ESCROW,
    FEE,
    ISSUANCE,
    AccountKind,
    AccountRef,
    InvalidAmountError,
    UnknownAccountError,
)
from ledger.postgres import UNMATURED_SQL, PostgresLedger, fit_memo
from tests.ledger.test_ledger_postgres import assert_books_balance

if TYPE_CHECKING:
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]

BUYER = AccountRef(AccountKind.BUYER, "key-1")
MINER = AccountRef(AccountKind.MINER, "ab" * 32)
SCORER = AccountRef(AccountKind.MINER, "cd" * 32)
ORIGIN = "spot.example/ledger"
SIGNER = CheckpointSigner(
    ORIGIN, Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"spot check key").digest())
)
HOUR = 3600.0


def ref(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


@pytest.fixture
async def ledger(db_pool: Pool) -> PostgresLedger:
    ledger = await PostgresLedger.create(db_pool)
    for account in (BUYER, MINER, SCORER):
        await ledger.open_account(account)
    return ledger


async def earn(ledger: PostgresLedger, *, miner_credit: int, fee: int, tag: str = "job") -> int:
    """One settled request: the miner and the fee account earn; returns the last entry's seq."""
    await ledger.mint(BUYER, miner_credit + fee)
    hold = await ledger.hold(BUYER, miner_credit + fee, reference=ref(f"request {tag}"))
    await ledger.settle(
        hold, miner=MINER, miner_credit=miner_credit, fee=fee, reference=ref(f"receipt {tag}")
    )
    return (await ledger.entries(limit=100_000))[-1].seq


async def age(pool: Pool, *seqs: int, seconds: float) -> None:
    """Backdates entries' created_at: the column unmatured() reads (the leaf is untouched)."""
    await pool.execute(
        "UPDATE ledger_entries SET created_at = created_at - make_interval(secs => $2)"
        " WHERE seq = ANY($1::bigint[])",
        list(seqs),
        seconds,
    )


async def last_seq(ledger: PostgresLedger) -> int:
    return (await ledger.entries(limit=100_000))[-1].seq


# --- slash, refund, reward --------------------------------------------------------------------


async def test_slash_takes_at_most_the_balance(ledger: PostgresLedger, db_pool: Pool) -> None:
    await earn(ledger, miner_credit=300, fee=30)

    assert await ledger.slash(MINER, 100, reference=ref("failed job"), memo="cheat") == 100
    assert await ledger.slash(MINER, 1_000, reference=ref("failed job"), memo="cheat") == 200
    before = await ledger.entries(limit=100_000)
    assert await ledger.slash(MINER, 50, reference=ref("again"), memo="nothing left") == 0

    assert await ledger.entries(limit=100_000) == before  # moving nothing writes nothing
    assert await ledger.balance(MINER) == 0
    slashes = [e for e in before if e.kind is EntryKind.SLASH]
    assert [(e.debit, e.credit, e.amount) for e in slashes] == [
        (MINER, ISSUANCE, 100),
        (MINER, ISSUANCE, 200),
    ]
    assert all(e.hold_id is None and e.memo == "cheat" for e in slashes)
    assert all(e.reference == ref("failed job") for e in slashes)
    assert all(decode_entry(e.leaf).hold_id == 0 for e in slashes)
    await assert_books_balance(ledger, db_pool)


async def test_refunds_from_a_miner_and_from_the_fee_account(
    ledger: PostgresLedger, db_pool: Pool
) -> None:
    await earn(ledger, miner_credit=300, fee=40)
    buyer_before = await ledger.balance(BUYER)

    from_miner = await ledger.refund(
        BUYER, 250, source=MINER, reference=ref("failed"), memo="job failed its spot check"
    )
    from_fee = await ledger.refund(BUYER, 100, source=FEE, reference=ref("failed"), memo="fee")

    assert (from_miner, from_fee) == (250, 40)  # the fee account held only 40
    assert await ledger.balance(BUYER) == buyer_before + 290
    assert (await ledger.balance(MINER), await ledger.balance(FEE)) == (50, 0)
    refunds = [e for e in await ledger.entries(limit=100_000) if e.kind is EntryKind.REFUND]
    assert [(e.debit, e.credit, e.amount) for e in refunds] == [
        (MINER, BUYER, 250),
        (FEE, BUYER, 40),
    ]
    assert all(e.hold_id is None for e in refunds)
    await assert_books_balance(ledger, db_pool)


async def test_reward_pays_scorers_from_the_fee_account_only(
    ledger: PostgresLedger, db_pool: Pool
) -> None:
    assert await ledger.reward(SCORER, 10, reference=ref("score"), memo="scoring") == 0
    assert await ledger.entries(limit=100_000) == []
    await earn(ledger, miner_credit=300, fee=45)

    first = await ledger.reward(SCORER, 30, reference=ref("score 1"), memo="scoring job 1")
    second = await ledger.reward(SCORER, 30, reference=ref("score 2"), memo="scoring job 2")

    assert (first, second) == (30, 15)
    assert (await ledger.balance(SCORER), await ledger.balance(FEE)) == (45, 0)
    assert await ledger.balance(MINER) == 300  # the other miner's credits are not touched
    rewards = [e for e in await ledger.entries(limit=100_000) if e.kind is EntryKind.REWARD]
    assert [(e.debit, e.credit, e.amount) for e in rewards] == [
        (FEE, SCORER, 30),
        (FEE, SCORER, 15),
    ]
    await assert_books_balance(ledger, db_pool)


async def test_accounts_and_amounts_are_validated(ledger: PostgresLedger) -> None:
    await earn(ledger, miner_credit=100, fee=10)
    with pytest.raises(ValueError, match="slash a buyer"):
        await ledger.slash(BUYER, 1, reference=b"r", memo="")
    with pytest.raises(ValueError, match="reward a fee"):
        await ledger.reward(FEE, 1, reference=b"r", memo="")
    with pytest.raises(ValueError, match="refund to a miner"):
        await ledger.refund(MINER, 1, source=FEE, reference=b"r", memo="")
    with pytest.raises(ValueError, match="refund from a buyer"):
        await ledger.refund(BUYER, 1, source=BUYER, reference=b"r", memo="")
    with pytest.raises(ValueError, match="refund from a escrow"):
        await ledger.refund(BUYER, 1, source=ESCROW, reference=b"r", memo="")
    with pytest.raises(ValueError, match="system accounts"):
        await ledger.refund(
            BUYER, 1, source=AccountRef(AccountKind.FEE, "x"), reference=b"r", memo=""
        )
    for amount in (-1, MAX_AMOUNT + 1, True, 1.5):
        with pytest.raises(InvalidAmountError):
            await ledger.slash(MINER, amount, reference=b"r", memo="")  # type: ignore[arg-type]
        with pytest.raises(InvalidAmountError):
            await ledger.refund(BUYER, amount, source=FEE, reference=b"r", memo="")  # type: ignore[arg-type]
        with pytest.raises(InvalidAmountError):
            await ledger.reward(SCORER, amount, reference=b"r", memo="")  # type: ignore[arg-type]
    ghost = AccountRef(AccountKind.MINER, "ef" * 32)
    with pytest.raises(UnknownAccountError, match="miner:"):
        await ledger.slash(ghost, 1, reference=b"r", memo="")
    with pytest.raises(UnknownAccountError, match="miner:"):
        await ledger.reward(ghost, 1, reference=b"r", memo="")
    with pytest.raises(UnknownAccountError, match="buyer:"):
        await ledger.refund(
            AccountRef(AccountKind.BUYER, "nobody"), 1, source=FEE, reference=b"r", memo=""
        )
    entries = len(await ledger.entries(limit=100_000))
    # Zero moves nothing, even for an account nobody opened.
    assert await ledger.slash(ghost, 0, reference=b"r", memo="") == 0
    assert await ledger.reward(SCORER, 0, reference=b"r", memo="") == 0
    assert await ledger.refund(BUYER, 0, source=MINER, reference=b"r", memo="") == 0
    assert len(await ledger.entries(limit=100_000)) == entries
    assert (await ledger.balance(MINER), await ledger.balance(FEE)) == (100, 10)


async def test_references_are_fitted_and_long_memos_cut(ledger: PostgresLedger) -> None:
    await earn(ledger, miner_credit=100, fee=10)
    memo = "x" * (MAX_MEMO_BYTES - 1) + "é" + "tail"  # "é" straddles the limit

    assert await ledger.slash(MINER, 1, reference=b"short", memo=memo) == 1

    entry = (await ledger.entries(limit=100_000))[-1]
    assert entry.reference == hashlib.sha256(b"short").digest()
    assert decode_entry(entry.leaf).reference == entry.reference
    assert entry.memo == "x" * (MAX_MEMO_BYTES - 1) == decode_entry(entry.leaf).memo
    assert fit_memo("é" * MAX_MEMO_BYTES) == "é" * (MAX_MEMO_BYTES // 2)
    assert fit_memo("short") == "short"


async def test_racing_slashes_never_overdraw(ledger: PostgresLedger, db_pool: Pool) -> None:
    await earn(ledger, miner_credit=250, fee=0)
    # A second ledger object on the database: its own queue, so its batches race this one's
    # under the log lock, as another process's would.
    other = PostgresLedger(db_pool)
    seen: list[int] = []
    racing = True

    async def watch() -> None:
        while racing:
            seen.append(await ledger.balance(MINER))
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    moved = await asyncio.gather(
        *(
            (ledger if i % 2 else other).slash(MINER, 7, reference=ref(f"cheat {i}"), memo="race")
            for i in range(60)
        )
    )
    racing = False
    await watcher
    await other.aclose()

    assert sum(moved) == 250
    assert all(0 <= m <= 7 for m in moved) and moved.count(7) == 250 // 7
    assert await ledger.balance(MINER) == 0
    assert seen and min(seen) >= 0
    slashed = [e.amount for e in await ledger.entries(limit=100_000) if e.kind is EntryKind.SLASH]
    assert sorted(slashed) == sorted(m for m in moved if m)
    await assert_books_balance(ledger, db_pool)


# --- unmatured credits ------------------------------------------------------------------------


async def test_unmatured_counts_only_recent_credits(ledger: PostgresLedger, db_pool: Pool) -> None:
    old = await earn(ledger, miner_credit=300, fee=100, tag="old")  # the SETTLE is not last
    settle_old = old - 1
    await age(db_pool, settle_old, seconds=2 * HOUR)
    await earn(ledger, miner_credit=200, fee=0, tag="new")
    await ledger.mint(MINER, 1_000, memo="a grant is no credit for work")
    await ledger.reward(MINER, 50, reference=ref("score"), memo="scoring")

    assert await ledger.unmatured(MINER, window_s=HOUR) == 200 + 50
    assert await ledger.unmatured(MINER, window_s=3 * HOUR) == 300 + 200 + 50
    assert await ledger.unmatured(SCORER, window_s=HOUR) == 0

    await ledger.slash(MINER, 120, reference=ref("cheat"), memo="cheat")
    assert await ledger.unmatured(MINER, window_s=HOUR) == 250 - 120
    await ledger.refund(BUYER, 30, source=MINER, reference=ref("cheat"), memo="refund")
    assert await ledger.unmatured(MINER, window_s=HOUR) == 250 - 150

    # A slash older than the window no longer counts against recent credits.
    await age(db_pool, await last_seq(ledger), seconds=2 * HOUR)
    assert await ledger.unmatured(MINER, window_s=HOUR) == 250 - 120


async def test_unmatured_is_clamped_to_the_balance(ledger: PostgresLedger, db_pool: Pool) -> None:
    await earn(ledger, miner_credit=100, fee=0)
    await ledger.slash(MINER, 80, reference=ref("cheat"), memo="")
    await age(db_pool, await last_seq(ledger), seconds=2 * HOUR)
    # Recent credits 100, no recent debits, but only 20 left to take.
    assert await ledger.unmatured(MINER, window_s=HOUR) == 20 == await ledger.balance(MINER)

    settle = await earn(ledger, miner_credit=100, fee=0, tag="two")
    await age(db_pool, *range(settle + 1), seconds=4 * HOUR)  # every credit is old now
    await ledger.slash(MINER, 10, reference=ref("cheat 2"), memo="")
    assert await ledger.unmatured(MINER, window_s=HOUR) == 0  # -10 clamped up to 0
    assert await ledger.balance(MINER) == 110


async def test_unmatured_of_unknown_and_invalid(ledger: PostgresLedger) -> None:
    ghost = AccountRef(AccountKind.MINER, "ef" * 32)
    assert await ledger.unmatured(ghost, window_s=HOUR) == 0
    for window in (-1.0, float("nan"), float("inf"), 1e10):
        with pytest.raises(ValueError, match="window_s"):
            await ledger.unmatured(MINER, window_s=window)
    with pytest.raises(ValueError, match="buyer"):
        await ledger.unmatured(BUYER, window_s=HOUR)


async def test_unmatured_uses_its_indexes(ledger: PostgresLedger, db_pool: Pool) -> None:
    async with db_pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")  # a tiny table would be scanned
        rows = await conn.fetch(f"EXPLAIN {UNMATURED_SQL}", "miner", MINER.owner, HOUR)
    plan = "\n".join(row[0] for row in rows)
    assert "ledger_entries_credited_idx" in plan and "ledger_entries_taken_idx" in plan


# --- schema -----------------------------------------------------------------------------------


async def test_an_existing_database_learns_the_reward_kind(db_pool: Pool) -> None:
    ledger = await PostgresLedger.create(db_pool)
    for account in (BUYER, MINER, SCORER):
        await ledger.open_account(account)
    await earn(ledger, miner_credit=100, fee=50)
    # The constraint as a database created before REWARD existed has it.
    await db_pool.execute(
        "ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_kind_known;"
        " ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_kind_known CHECK (kind IN"
        " ('mint', 'hold', 'settle', 'fee', 'release', 'slash', 'refund'))"
    )
    with pytest.raises(asyncpg.CheckViolationError):
        await ledger.reward(SCORER, 5, reference=ref("score"), memo="")
    assert await ledger.balance(FEE) == 50  # the failed batch rolled back

    upgraded = await PostgresLedger.create(db_pool)  # a restart with the new code

    assert await upgraded.reward(SCORER, 5, reference=ref("score"), memo="") == 5
    assert await upgraded.balance(MINER) == 100  # existing rows survived the upgrade
    oid = await db_pool.fetchval(
        "SELECT oid FROM pg_constraint WHERE conname = 'ledger_entries_kind_known'"
    )
    await PostgresLedger.create(db_pool)
    # Later starts leave the constraint alone: replacing it would re-check every entry.
    assert oid == await db_pool.fetchval(
        "SELECT oid FROM pg_constraint WHERE conname = 'ledger_entries_kind_known'"
    )
    with pytest.raises(asyncpg.CheckViolationError):
        await db_pool.execute("UPDATE ledger_entries SET kind = 'bogus' WHERE seq = 0")
    await assert_books_balance(upgraded, db_pool)


# --- the auditor's view -----------------------------------------------------------------------


async def audit_database(pool: Pool, tmp_path: Path) -> AuditReport:
    """``meshmint-ledger dump`` then an offline audit of the dump, as an auditor would."""
    path = tmp_path / "ledger.dump"
    with path.open("wb") as out:
        await dump_ledger(pool, out)
    with DumpAuditSource(path) as source:
        return audit(source.audit_input(), verifier=SIGNER.verifier, origin=ORIGIN)


async def test_the_auditor_passes_slashes_refunds_and_rewards(
    ledger: PostgresLedger, db_pool: Pool, tmp_path: Path
) -> None:
    config = CheckpointerConfig(ORIGIN, interval_s=HOUR)  # checkpoints only when asked
    async with Checkpointer.running(db_pool, SIGNER, config) as checkpointer:
        for i in range(4):
            await earn(ledger, miner_credit=300, fee=60, tag=str(i))
        await ledger.reward(SCORER, 25, reference=ref("score"), memo="scoring")
        await ledger.slash(MINER, 500, reference=ref("cheat"), memo="failed spot check")
        await ledger.refund(BUYER, 200, source=MINER, reference=ref("cheat"), memo="refund")
        await ledger.refund(BUYER, 60, source=FEE, reference=ref("cheat"), memo="fee back")
        hold = await ledger.hold(BUYER, 100, reference=ref("in flight"))  # stays open
        await checkpointer.checkpoint()

    report = await audit_database(db_pool, tmp_path)

    assert report.ok, report.findings
    assert report.open_holds == 1 and report.open_hold_amount == hold.amount
    kinds = {e.kind for e in await ledger.entries(limit=100_000)}
    assert {EntryKind.SLASH, EntryKind.REFUND, EntryKind.REWARD} <= kinds
    await assert_books_balance(ledger, db_pool)


async def test_the_auditor_flags_a_reward_between_the_wrong_accounts(
    ledger: PostgresLedger, db_pool: Pool, tmp_path: Path
) -> None:
    config = CheckpointerConfig(ORIGIN, interval_s=HOUR)
    async with Checkpointer.running(db_pool, SIGNER, config) as checkpointer:
        await earn(ledger, miner_credit=300, fee=60)
        # A writer that skips PostgresLedger's checks: a "reward" paid by a miner, not the fee.
        rogue = Transfer(EntryKind.REWARD, MINER, SCORER, 40, ref("rogue"), "")
        async with db_pool.acquire() as conn, conn.transaction():
            assert await apply_batch(conn, [rogue]) == [40]
        await checkpointer.checkpoint()

    report = await audit_database(db_pool, tmp_path)

    assert set(report.finding_counts) == {"entry.accounts"}
    assert "REWARD may not move miner -> miner" in report.findings[0].message
