"""The ledger in PostgreSQL: accounts with balances, an append-only table of double entries, holds.

Every method is one transaction. Balances live in ``ledger_accounts`` and change only together
with the entries that explain them, so each balance equals its credits minus its debits. The
database enforces what it can (no negative balance but issuance's, positive entry amounts,
settlements that add up), so a bug here fails loudly instead of corrupting the books.

Concurrency: a transaction locks the account rows it touches, ordered by id, before changing
them, so writers never deadlock; a hold takes the buyer's funds with one conditional UPDATE, so
racing holds can never overdraw; a hold is closed by one conditional UPDATE on its row, so it
closes exactly once. Every hold and settlement touches the escrow row, which serialises them;
batching through a single sequencer is the way past that, not weaker locking.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from importlib import resources
from typing import TYPE_CHECKING, TypeAlias

import asyncpg

from ledger.interface import (
    ESCROW,
    FEE,
    ISSUANCE,
    AccountBalance,
    AccountKind,
    AccountRef,
    Hold,
    HoldClosedError,
    InsufficientFundsError,
    InvalidAmountError,
    Settlement,
    UnknownAccountError,
)

logger = logging.getLogger(__name__)

MAX_AMOUNT = 2**63 - 1  # the largest PostgreSQL bigint
# pg_advisory_xact_lock key serialising schema creation: concurrent CREATE ... IF NOT EXISTS
# statements can still collide in the catalog. The bytes spell "mmledger".
_SCHEMA_LOCK_KEY = 0x6D6D6C6564676572

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    _Connection: TypeAlias = PoolConnectionProxy[asyncpg.Record]


class EntryKind(StrEnum):
    MINT = "mint"  # issuance -> account
    HOLD = "hold"  # buyer -> escrow
    SETTLE = "settle"  # escrow -> miner
    FEE = "fee"  # escrow -> fee
    RELEASE = "release"  # escrow -> buyer


@dataclass(frozen=True)
class Entry:
    """One double entry: ``amount`` moves from ``debit`` to ``credit``."""

    seq: int  # position in the ledger, increasing (see schema.sql about gaps and commit order)
    kind: EntryKind  # why the money moved
    debit: AccountRef  # the account that pays
    credit: AccountRef  # the account that receives
    amount: int  # micro-units, > 0
    hold_id: int | None  # the hold this entry opens or closes; None for mints
    reference: bytes | None  # request hash for holds and releases, receipt hash for settlements
    memo: str  # free text, set by mints
    created_at: datetime  # when the transaction that wrote it started


@dataclass(frozen=True)
class _Locked:
    id: int
    balance: int


class PostgresLedger:
    """Implements ``ledger.interface.Ledger`` on an asyncpg pool.

    Use ``await PostgresLedger.create(pool)``; the bare constructor does no I/O and suits
    read-only callers that must not create tables in a database that has none.
    """

    def __init__(self, pool: asyncpg.Pool[asyncpg.Record]) -> None:
        self._pool = pool

    @classmethod
    async def create(cls, pool: asyncpg.Pool[asyncpg.Record]) -> PostgresLedger:
        """Creates the tables and the system accounts where missing, then returns the ledger."""
        schema = resources.files("ledger").joinpath("schema.sql").read_text(encoding="utf-8")
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK_KEY)
            await conn.execute(schema)
        return cls(pool)

    async def open_account(self, account: AccountRef) -> None:
        _check_account(account)
        await self._pool.execute(
            "INSERT INTO ledger_accounts (kind, owner) VALUES ($1, $2)"
            " ON CONFLICT (kind, owner) DO NOTHING",
            str(account.kind),
            account.owner,
        )

    async def mint(self, account: AccountRef, amount: int, *, memo: str = "") -> None:
        _check_account(account, kinds=(AccountKind.BUYER, AccountKind.MINER), role="mint into")
        _check_amount("mint amount", amount, positive=True)
        async with self._transaction() as conn:
            locked = await _lock(conn, [ISSUANCE, account])
            await _move(conn, {locked[ISSUANCE].id: -amount, locked[account].id: amount})
            await _write_entries(
                conn, [(EntryKind.MINT, locked[ISSUANCE].id, locked[account].id, amount)], memo=memo
            )
        logger.info("minted %d micro-units into %s", amount, account)

    async def hold(self, buyer: AccountRef, amount: int, *, reference: bytes) -> Hold:
        _check_account(buyer, kinds=(AccountKind.BUYER,), role="hold from")
        _check_amount("hold amount", amount, positive=True)
        async with self._transaction() as conn:
            locked = await _lock(conn, [buyer, ESCROW])
            taken = await conn.fetchval(
                "UPDATE ledger_accounts SET balance = balance - $1"
                " WHERE id = $2 AND balance >= $1 RETURNING balance",
                amount,
                locked[buyer].id,
            )
            if taken is None:
                raise InsufficientFundsError(buyer, needed=amount, available=locked[buyer].balance)
            await _move(conn, {locked[ESCROW].id: amount})
            hold_id: int = await conn.fetchval(
                "INSERT INTO ledger_holds (buyer, amount, reference) VALUES ($1, $2, $3)"
                " RETURNING id",
                locked[buyer].id,
                amount,
                reference,
            )
            await _write_entries(
                conn,
                [(EntryKind.HOLD, locked[buyer].id, locked[ESCROW].id, amount)],
                hold_id=hold_id,
                reference=reference,
            )
        return Hold(hold_id=hold_id, buyer=buyer, amount=amount)

    async def settle(
        self, hold: Hold, *, miner: AccountRef, miner_credit: int, fee: int, reference: bytes
    ) -> Settlement:
        _check_account(miner, kinds=(AccountKind.MINER,), role="settle to")
        _check_amount("miner credit", miner_credit, positive=False)
        _check_amount("fee", fee, positive=False)
        _check_amount("charge", miner_credit + fee, positive=False)
        if miner_credit + fee > hold.amount:
            raise InvalidAmountError(
                f"hold {hold.hold_id}: miner credit {miner_credit} + fee {fee}"
                f" exceeds the {hold.amount} held"
            )
        return await self._close(
            hold, miner=miner, miner_credit=miner_credit, fee=fee, reference=reference
        )

    async def release(self, hold: Hold) -> Settlement:
        return await self._close(hold, miner=None, miner_credit=0, fee=0, reference=None)

    async def balance(self, account: AccountRef) -> int:
        balance: int | None = await self._pool.fetchval(
            "SELECT balance FROM ledger_accounts WHERE kind = $1 AND owner = $2",
            str(account.kind),
            account.owner,
        )
        if balance is None:
            raise UnknownAccountError(f"no account {account}")
        return balance

    async def balances(self) -> list[AccountBalance]:
        # One statement, so one snapshot: the balances returned always sum to zero.
        rows = await self._pool.fetch("SELECT kind, owner, balance FROM ledger_accounts")
        return sorted(
            (AccountBalance(_ref(row["kind"], row["owner"]), row["balance"]) for row in rows),
            key=lambda b: b.account,
        )

    async def entries(self, *, after_seq: int = 0, limit: int = 1000) -> list[Entry]:
        """Entries with ``seq > after_seq`` in ``seq`` order, at most ``limit`` of them."""
        if not 1 <= limit <= 100_000:
            raise ValueError(f"limit must be between 1 and 100000, not {limit}")
        rows = await self._pool.fetch(
            "SELECT e.seq, e.kind, d.kind AS debit_kind, d.owner AS debit_owner,"
            " c.kind AS credit_kind, c.owner AS credit_owner, e.amount, e.hold_id,"
            " e.reference, e.memo, e.created_at"
            " FROM ledger_entries AS e"
            " JOIN ledger_accounts AS d ON d.id = e.debit"
            " JOIN ledger_accounts AS c ON c.id = e.credit"
            " WHERE e.seq > $1 ORDER BY e.seq LIMIT $2",
            after_seq,
            limit,
        )
        return [
            Entry(
                seq=row["seq"],
                kind=EntryKind(row["kind"]),
                debit=_ref(row["debit_kind"], row["debit_owner"]),
                credit=_ref(row["credit_kind"], row["credit_owner"]),
                amount=row["amount"],
                hold_id=row["hold_id"],
                reference=row["reference"],
                memo=row["memo"],
                created_at=row["created_at"],
            )
            for row in rows
        ]

    async def _close(
        self,
        hold: Hold,
        *,
        miner: AccountRef | None,
        miner_credit: int,
        fee: int,
        reference: bytes | None,
    ) -> Settlement:
        charged = miner_credit + fee
        status = "settled" if miner is not None else "released"
        async with self._transaction() as conn:
            # Closing the hold row first makes a second settle wait here, then find it closed.
            row = await conn.fetchrow(
                "UPDATE ledger_holds AS h SET status = $2, charged = $3, miner_credit = $4,"
                " fee = $5, released = h.amount - $3, closed_at = now(),"
                " miner = (SELECT id FROM ledger_accounts WHERE kind = $6 AND owner = $7),"
                " settlement_reference = $8"
                " FROM ledger_accounts AS b"
                " WHERE h.id = $1 AND h.status = 'open' AND h.amount >= $3 AND b.id = h.buyer"
                " RETURNING h.amount, h.reference, b.kind, b.owner",
                hold.hold_id,
                status,
                charged,
                miner_credit,
                fee,
                None if miner is None else str(miner.kind),
                None if miner is None else miner.owner,
                reference,
            )
            if row is None:
                raise await _why_not_open(conn, hold, charged)
            amount: int = row["amount"]
            buyer = _ref(row["kind"], row["owner"])
            released = amount - charged
            locked = await _lock(conn, [ESCROW, FEE, buyer] + ([miner] if miner else []))
            escrow = locked[ESCROW].id
            legs = [
                (EntryKind.SETTLE, escrow, locked[miner].id if miner else 0, miner_credit),
                (EntryKind.FEE, escrow, locked[FEE].id, fee),
                (EntryKind.RELEASE, escrow, locked[buyer].id, released),
            ]
            legs = [leg for leg in legs if leg[3] > 0]
            deltas = {escrow: -amount}
            for _, _, credit, leg_amount in legs:
                deltas[credit] = deltas.get(credit, 0) + leg_amount
            await _move(conn, deltas)
            await _write_entries(
                conn,
                legs,
                hold_id=hold.hold_id,
                reference=reference if reference is not None else row["reference"],
            )
        return Settlement(
            hold_id=hold.hold_id,
            charged=charged,
            miner_credit=miner_credit,
            fee=fee,
            released=released,
        )

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[_Connection]:
        async with self._pool.acquire() as conn:
            try:
                async with conn.transaction():
                    yield conn
            except asyncpg.NumericValueOutOfRangeError as exc:
                raise InvalidAmountError(f"a balance would leave the bigint range: {exc}") from exc


async def _lock(conn: _Connection, accounts: Iterable[AccountRef]) -> dict[AccountRef, _Locked]:
    """Locks the accounts' rows in id order (so writers never deadlock) and reads them."""
    wanted = set(accounts)
    rows = await conn.fetch(
        "SELECT id, kind, owner, balance FROM ledger_accounts"
        " WHERE (kind, owner) IN (SELECT * FROM unnest($1::text[], $2::text[]))"
        " ORDER BY id FOR NO KEY UPDATE",
        [str(a.kind) for a in wanted],
        [a.owner for a in wanted],
    )
    locked = {_ref(row["kind"], row["owner"]): _Locked(row["id"], row["balance"]) for row in rows}
    missing = wanted - locked.keys()
    if missing:
        raise UnknownAccountError(f"no account {', '.join(sorted(map(str, missing)))}")
    return locked


async def _move(conn: _Connection, deltas: dict[int, int]) -> None:
    """Adds each delta to its account's balance; the CHECK constraints are the backstop."""
    await conn.execute(
        "UPDATE ledger_accounts AS a SET balance = a.balance + d.delta"
        " FROM unnest($1::bigint[], $2::bigint[]) AS d(id, delta) WHERE a.id = d.id",
        list(deltas),
        list(deltas.values()),
    )


async def _write_entries(
    conn: _Connection,
    legs: list[tuple[EntryKind, int, int, int]],
    *,
    hold_id: int | None = None,
    reference: bytes | None = None,
    memo: str = "",
) -> None:
    """Appends one entry per (kind, debit id, credit id, amount), in order."""
    await conn.executemany(
        "INSERT INTO ledger_entries (kind, debit, credit, amount, hold_id, reference, memo)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7)",
        [
            (str(kind), debit, credit, amount, hold_id, reference, memo)
            for kind, debit, credit, amount in legs
        ],
    )


async def _why_not_open(conn: _Connection, hold: Hold, charged: int) -> Exception:
    row = await conn.fetchrow("SELECT status, amount FROM ledger_holds WHERE id = $1", hold.hold_id)
    if row is None:
        return HoldClosedError(f"no hold {hold.hold_id}")
    if row["status"] != "open":
        return HoldClosedError(f"hold {hold.hold_id} is already {row['status']}")
    return InvalidAmountError(
        f"hold {hold.hold_id}: charging {charged} exceeds the {row['amount']} held"
    )


def _ref(kind: str, owner: str) -> AccountRef:
    return AccountRef(AccountKind(kind), owner)


_SYSTEM_KINDS = frozenset({AccountKind.ISSUANCE, AccountKind.ESCROW, AccountKind.FEE})


def _check_account(
    account: AccountRef, *, kinds: Iterable[AccountKind] = tuple(AccountKind), role: str = "open"
) -> None:
    """Refuses malformed references and accounts of the wrong kind: programming errors."""
    if (account.kind in _SYSTEM_KINDS) != (account.owner == ""):
        raise ValueError(f"{account!r}: system accounts have no owner, others need one")
    if account.kind not in kinds:
        raise ValueError(f"cannot {role} a {account.kind} account")


def _check_amount(name: str, amount: int, *, positive: bool) -> None:
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise InvalidAmountError(f"{name} must be an integer of micro-units, not {amount!r}")
    if amount < 0 or (positive and amount == 0):
        raise InvalidAmountError(f"{name} must be {'positive' if positive else '>= 0'}: {amount}")
    if amount > MAX_AMOUNT:
        raise InvalidAmountError(f"{name} exceeds {MAX_AMOUNT}: {amount}")
