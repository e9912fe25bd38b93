"""One sequencer step: apply a batch of ledger operations in one transaction.

Every writer, in every process, takes the log lock for the length of its transaction, so entries
get gap-free sequence numbers in commit order and each transaction extends the Merkle tree from
where the last one left it (the stored frontier in ``ledger_head``). Operations are checked in
memory against the balances and holds read under that lock; an operation that fails (not enough
funds, a hold already closed) gets its exception and changes nothing, while the others in the
batch still commit. Callers learn their outcome only after the commit: an acknowledged entry is
durable.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

from ledger.entry import (
    MAX_AMOUNT,
    ZERO_HASH,
    AccountCode,
    EncodedAccount,
    EntryKind,
    LedgerEntry,
    encode_entry,
)
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
    Settlement,
    UnknownAccountError,
)
from ledger.merkle import CompactRange, leaf_hash

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Connection: TypeAlias = PoolConnectionProxy[asyncpg.Record] | asyncpg.Connection[asyncpg.Record]
else:
    Connection = Any

# pg_advisory_xact_lock key taken by every transaction that appends to the log ("mmlogapp").
LOG_LOCK_KEY = 0x6D6D6C6F67617070

_CODES = {
    AccountKind.ISSUANCE: AccountCode.ISSUANCE,
    AccountKind.ESCROW: AccountCode.ESCROW,
    AccountKind.FEE: AccountCode.FEE,
    AccountKind.BUYER: AccountCode.BUYER,
    AccountKind.MINER: AccountCode.MINER,
}


@dataclass(frozen=True)
class OpenAccount:
    account: AccountRef


@dataclass(frozen=True)
class Mint:
    account: AccountRef
    amount: int
    memo: str


@dataclass(frozen=True)
class PlaceHold:
    buyer: AccountRef
    amount: int
    reference: bytes
    holder: str | None = None  # the coordinator replica that placed it; None: nobody's


@dataclass(frozen=True)
class CloseHold:
    hold: Hold
    miner: AccountRef | None  # None releases everything to the buyer
    miner_credit: int
    fee: int
    reference: bytes | None  # the receipt hash; None keeps the hold's own reference


@dataclass(frozen=True)
class Transfer:
    """Moves up to ``amount`` from ``debit`` to ``credit``, outside any hold.

    The amount moved is capped at the debit account's balance as read under the log lock, so
    racing transfers never push it below zero; the outcome is the amount moved, and 0 writes no
    entry. Callers (PostgresLedger) check that the accounts suit ``kind`` and fit the memo.
    """

    kind: EntryKind  # SLASH, REFUND or REWARD
    debit: AccountRef  # pays: a miner or the fee account
    credit: AccountRef  # receives: issuance, a buyer or a miner
    amount: int  # the most to move, micro-units, >= 0
    reference: bytes  # ties the entry to its cause (e.g. the failed job's receipt hash)
    memo: str  # why, for humans reading the log


Operation = OpenAccount | Mint | PlaceHold | CloseHold | Transfer
Outcome = None | Hold | Settlement | int | BaseException


@dataclass
class _Account:
    id: int
    balance: int
    dirty: bool = False


@dataclass
class _HoldRow:
    id: int
    buyer: AccountRef
    amount: int
    status: str
    reference: bytes
    new: bool = False
    closed: dict[str, Any] = field(default_factory=dict)
    holder: str | None = None  # set for new holds only: the column is written, never read


def reference_of(value: bytes | None) -> bytes:
    """Entry references are 32 bytes: shorter or longer references are hashed to fit."""
    if value is None:
        return ZERO_HASH
    return value if len(value) == 32 else hashlib.sha256(value).digest()


class _Batch:
    def __init__(self, conn: Connection, frontier: CompactRange, last_hash: bytes) -> None:
        self.conn = conn
        self.frontier = frontier
        self.last_hash = last_hash
        self.timestamp_us = time.time_ns() // 1000
        self.accounts: dict[AccountRef, _Account] = {}
        self.holds: dict[int, _HoldRow] = {}
        self.entry_rows: list[tuple[Any, ...]] = []
        self.node_rows: list[tuple[int, int, bytes]] = []

    def append(
        self,
        kind: EntryKind,
        debit: AccountRef,
        credit: AccountRef,
        amount: int,
        *,
        hold_id: int = 0,
        reference: bytes | None = None,
        memo: str = "",
    ) -> None:
        seq = self.frontier.size
        entry = LedgerEntry(
            kind=kind,
            seq=seq,
            timestamp_us=self.timestamp_us,
            debit=EncodedAccount(_CODES[debit.kind], debit.owner),
            credit=EncodedAccount(_CODES[credit.kind], credit.owner),
            amount=amount,
            hold_id=hold_id,
            reference=reference_of(reference),
            prev_leaf_hash=self.last_hash,
            memo=memo,
        )
        leaf = encode_entry(entry)
        digest = leaf_hash(leaf)
        for node, node_hash in self.frontier.append_nodes(digest):
            if node.level > 0:  # level 0 is the entry's own leaf_hash column
                self.node_rows.append((node.level, node.index, node_hash))
        self.last_hash = digest
        debit_row, credit_row = self.accounts[debit], self.accounts[credit]
        debit_row.balance -= amount
        credit_row.balance += amount
        debit_row.dirty = credit_row.dirty = True
        self.entry_rows.append(
            (
                seq,
                kind.name.lower(),
                debit_row.id,
                credit_row.id,
                amount,
                hold_id or None,
                reference,
                memo,
                leaf,
                digest,
            )
        )


async def _load_accounts(batch: _Batch, wanted: set[AccountRef]) -> None:
    rows = await batch.conn.fetch(
        "SELECT id, kind, owner, balance FROM ledger_accounts"
        " WHERE (kind, owner) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
        [str(a.kind) for a in wanted],
        [a.owner for a in wanted],
    )
    for row in rows:
        batch.accounts[AccountRef(AccountKind(row["kind"]), row["owner"])] = _Account(
            row["id"], row["balance"]
        )


async def _load_holds(batch: _Batch, ids: set[int]) -> None:
    rows = await batch.conn.fetch(
        "SELECT h.id, h.amount, h.status, h.reference, a.kind, a.owner FROM ledger_holds AS h"
        " JOIN ledger_accounts AS a ON a.id = h.buyer WHERE h.id = ANY($1::bigint[])",
        list(ids),
    )
    for row in rows:
        batch.holds[row["id"]] = _HoldRow(
            row["id"],
            AccountRef(AccountKind(row["kind"]), row["owner"]),
            row["amount"],
            row["status"],
            row["reference"],
        )


def _check_room(batch: _Batch, legs: Sequence[tuple[AccountRef, AccountRef, int]]) -> None:
    """Refuses an operation whose legs would push a balance out of the bigint range."""
    # Only the legs' own accounts: copying every balance in the batch made a batch of n
    # operations on n accounts cost n² (the better half of a 1000-operation batch's time).
    after: dict[AccountRef, int] = {}
    for debit, credit, amount in legs:
        after[debit] = after.get(debit, batch.accounts[debit].balance) - amount
        after[credit] = after.get(credit, batch.accounts[credit].balance) + amount
        if after[debit] < -MAX_AMOUNT or after[credit] > MAX_AMOUNT:
            raise InvalidAmountError(f"moving {amount} would leave the bigint range")


def _require(batch: _Batch, *accounts: AccountRef) -> None:
    missing = [str(a) for a in accounts if a not in batch.accounts]
    if missing:
        raise UnknownAccountError(f"no account {', '.join(sorted(missing))}")


def _apply_one(batch: _Batch, op: Operation, hold_ids: list[int]) -> Outcome:
    if isinstance(op, OpenAccount):
        return None
    if isinstance(op, Mint):
        _require(batch, op.account)
        _check_room(batch, [(ISSUANCE, op.account, op.amount)])
        batch.append(EntryKind.MINT, ISSUANCE, op.account, op.amount, memo=op.memo)
        return None
    if isinstance(op, PlaceHold):
        _require(batch, op.buyer)
        available = batch.accounts[op.buyer].balance
        if available < op.amount:
            raise InsufficientFundsError(op.buyer, needed=op.amount, available=available)
        hold_id = hold_ids.pop()
        batch.holds[hold_id] = _HoldRow(
            hold_id, op.buyer, op.amount, "open", op.reference, new=True, holder=op.holder
        )
        batch.append(
            EntryKind.HOLD, op.buyer, ESCROW, op.amount, hold_id=hold_id, reference=op.reference
        )
        return Hold(hold_id=hold_id, buyer=op.buyer, amount=op.amount)
    if isinstance(op, Transfer):
        return _transfer(batch, op)
    return _close(batch, op)


def _transfer(batch: _Batch, op: Transfer) -> int:
    _require(batch, op.debit, op.credit)
    moved = min(op.amount, max(batch.accounts[op.debit].balance, 0))
    if moved == 0:
        return 0
    _check_room(batch, [(op.debit, op.credit, moved)])
    batch.append(op.kind, op.debit, op.credit, moved, reference=op.reference, memo=op.memo)
    return moved


def _close(batch: _Batch, op: CloseHold) -> Settlement:
    row = batch.holds.get(op.hold.hold_id)
    charged = op.miner_credit + op.fee
    if row is None:
        raise HoldClosedError(f"no hold {op.hold.hold_id}")
    if row.status != "open":
        raise HoldClosedError(f"hold {row.id} is already {row.status}")
    if charged > row.amount or row.amount < op.hold.amount:
        raise InvalidAmountError(f"hold {row.id}: charging {charged} exceeds the {row.amount} held")
    if op.miner is not None:
        _require(batch, op.miner)
    reference = op.reference if op.reference is not None else row.reference
    released = row.amount - charged
    legs: list[tuple[EntryKind, AccountRef | None, int]] = [
        (EntryKind.SETTLE, op.miner, op.miner_credit),
        (EntryKind.FEE, FEE, op.fee),
        (EntryKind.RELEASE, row.buyer, released),
    ]
    paid = [
        (kind, credit, amount) for kind, credit, amount in legs if amount > 0 and credit is not None
    ]
    _check_room(batch, [(ESCROW, credit, amount) for _, credit, amount in paid])
    for kind, credit, amount in paid:
        batch.append(kind, ESCROW, credit, amount, hold_id=row.id, reference=reference)
    row.status = "settled" if op.miner is not None else "released"
    row.closed = {
        "charged": charged,
        "miner_credit": op.miner_credit,
        "fee": op.fee,
        "released": released,
        "miner": batch.accounts[op.miner].id if op.miner is not None else None,
        "settlement_reference": op.reference,
    }
    return Settlement(
        hold_id=row.id,
        charged=charged,
        miner_credit=op.miner_credit,
        fee=op.fee,
        released=released,
    )


async def apply_batch(conn: Connection, ops: Sequence[Operation]) -> list[Outcome]:
    """Applies ``ops`` in order inside the caller's transaction; returns one outcome each."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", LOG_LOCK_KEY)
    head = await conn.fetchrow("SELECT size, frontier, last_leaf_hash FROM ledger_head")
    assert head is not None, "ledger_head is created with the schema"
    frontier = CompactRange.from_bytes(head["frontier"])
    if frontier.size != head["size"]:
        raise RuntimeError("ledger_head is inconsistent: frontier size differs from size")
    batch = _Batch(conn, frontier, head["last_leaf_hash"])

    opened = [op.account for op in ops if isinstance(op, OpenAccount)]
    if opened:
        await conn.execute(
            "INSERT INTO ledger_accounts (kind, owner)"
            " SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT (kind, owner) DO NOTHING",
            [str(a.kind) for a in opened],
            [a.owner for a in opened],
        )
    wanted: set[AccountRef] = {ISSUANCE, ESCROW, FEE}
    hold_wanted: set[int] = set()
    for op in ops:
        if isinstance(op, Mint):
            wanted.add(op.account)
        elif isinstance(op, PlaceHold):
            wanted.add(op.buyer)
        elif isinstance(op, CloseHold):
            wanted.add(op.hold.buyer)
            hold_wanted.add(op.hold.hold_id)
            if op.miner is not None:
                wanted.add(op.miner)
        elif isinstance(op, Transfer):
            wanted.update((op.debit, op.credit))
    await _load_accounts(batch, wanted)
    if hold_wanted:
        await _load_holds(batch, hold_wanted)
    # Buyers of the holds being closed that no operation named: usually none, and then a round
    # trip saved.
    missing = {row.buyer for row in batch.holds.values() if row.buyer not in batch.accounts}
    if missing:
        await _load_accounts(batch, missing)
    holds_needed = sum(isinstance(op, PlaceHold) for op in ops)
    hold_ids: list[int] = []
    if holds_needed:
        rows = await conn.fetch(
            "SELECT nextval('ledger_holds_id_seq') AS id FROM generate_series(1, $1)", holds_needed
        )
        hold_ids = sorted((row["id"] for row in rows), reverse=True)

    outcomes: list[Outcome] = []
    for op in ops:
        try:
            outcomes.append(_apply_one(batch, op, hold_ids))
        except (UnknownAccountError, InsufficientFundsError, HoldClosedError) as error:
            outcomes.append(error)
        except InvalidAmountError as error:
            outcomes.append(error)
    await _persist(batch)
    return outcomes


# Everything a batch writes, in one statement (one round trip instead of one per table; COPY
# would cost two each). Data-modifying CTEs share one snapshot and none reads another's rows;
# the foreign keys from new entries to new holds are checked at the end of the statement, when
# all of them are in. Closing a hold opened in the same batch cannot happen: a hold is closed
# only by its owner, who learns of it once its batch committed.
_PERSIST_SQL = """
WITH new_holds AS (
    INSERT INTO ledger_holds (id, buyer, amount, reference, holder)
    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bytea[], $32::text[])
), new_entries AS (
    INSERT INTO ledger_entries
        (seq, kind, debit, credit, amount, hold_id, reference, memo, leaf, leaf_hash)
    SELECT * FROM unnest($5::bigint[], $6::text[], $7::bigint[], $8::bigint[], $9::bigint[],
        $10::bigint[], $11::bytea[], $12::text[], $13::bytea[], $14::bytea[])
), new_nodes AS (
    INSERT INTO ledger_tree (level, idx, hash)
    SELECT * FROM unnest($15::smallint[], $16::bigint[], $17::bytea[])
), closed AS (
    UPDATE ledger_holds AS h SET status = c.status, charged = c.charged,
        miner_credit = c.miner_credit, fee = c.fee, released = c.released,
        miner = c.miner, settlement_reference = c.reference, closed_at = now()
    FROM unnest($18::bigint[], $19::text[], $20::bigint[], $21::bigint[], $22::bigint[],
        $23::bigint[], $24::bigint[], $25::bytea[])
        AS c(id, status, charged, miner_credit, fee, released, miner, reference)
    WHERE h.id = c.id AND h.status = 'open'
    RETURNING h.id
), balances AS (
    UPDATE ledger_accounts AS a SET balance = d.balance
    FROM unnest($26::bigint[], $27::bigint[]) AS d(id, balance) WHERE a.id = d.id
), head AS (
    UPDATE ledger_head SET size = $28, frontier = $29, last_leaf_hash = $30 WHERE $31
)
SELECT count(*) FROM closed
"""


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as ``width`` column lists (empty lists for no rows), for unnest()."""
    if not rows:
        return [[] for _ in range(width)]
    return [list(column) for column in zip(*rows, strict=True)]


async def _persist(batch: _Batch) -> None:
    new_holds = [row for row in batch.holds.values() if row.new]
    closed = [row for row in batch.holds.values() if row.closed]
    dirty = [a for a in batch.accounts.values() if a.dirty]
    hold_columns = _columns(
        [(r.id, batch.accounts[r.buyer].id, r.amount, r.reference) for r in new_holds], 4
    )
    closed_columns = _columns(
        [
            (
                r.id,
                r.status,
                r.closed["charged"],
                r.closed["miner_credit"],
                r.closed["fee"],
                r.closed["released"],
                r.closed["miner"],
                r.closed["settlement_reference"],
            )
            for r in closed
        ],
        8,
    )
    updated = await batch.conn.fetchval(
        _PERSIST_SQL,
        *hold_columns,
        *_columns(batch.entry_rows, 10),
        *_columns(batch.node_rows, 3),
        *closed_columns,
        [a.id for a in dirty],
        [a.balance for a in dirty],
        batch.frontier.size,
        batch.frontier.to_bytes(),
        batch.last_hash,
        bool(batch.entry_rows),
        [r.holder for r in new_holds],
    )
    if updated != len(closed):
        # Holds are loaded and checked under the log lock, so this means a writer that ignores
        # the lock; roll the whole batch back rather than write entries for holds not closed.
        raise RuntimeError(f"closed {updated} of {len(closed)} holds: the ledger changed under us")
