"""The ledger in PostgreSQL: accounts, holds, and an append-only, Merkle-hashed log of entries.

Writes go through one group-commit queue per process: concurrent calls are gathered into
batches and each batch is applied in one transaction by ``ledger.batch.apply_batch``, which
holds the log lock, so entries get gap-free sequence numbers in commit order in every process,
and extends the Merkle tree. Callers are answered only after their batch committed. Balances in
``ledger_accounts`` always equal the entries' credits minus debits; the database's constraints
(no negative balance but issuance's, positive amounts, holds that add up) are the backstop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import TYPE_CHECKING, TypeAlias

import asyncpg

from ledger.batch import (
    CloseHold,
    Mint,
    OpenAccount,
    Operation,
    Outcome,
    PlaceHold,
    Transfer,
    apply_batch,
    reference_of,
)
from ledger.entry import MAX_AMOUNT, MAX_MEMO_BYTES, EntryKind
from ledger.interface import (
    FEE,
    ISSUANCE,
    AccountBalance,
    AccountKind,
    AccountRef,
    Hold,
    HoldClosedError,
    InvalidAmountError,
    Settlement,
    UnknownAccountError,
)

logger = logging.getLogger(__name__)

# The longest verification window unmatured() accepts: older than this, a credit has matured
# whatever the window (and PostgreSQL intervals have a range), about 31 years.
_MAX_WINDOW_S = 1e9

# pg_advisory_xact_lock key serialising schema creation: concurrent CREATE ... IF NOT EXISTS
# statements can still collide in the catalog. The bytes spell "mmledger".
_SCHEMA_LOCK_KEY = 0x6D6D6C6564676572

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    _Connection: TypeAlias = PoolConnectionProxy[asyncpg.Record]


# PostgresLedger.unmatured: $1, $2 name the miner, $3 is the window in seconds. The kinds match
# the partial indexes' predicates (schema.sql) so that both sums are index scans.
UNMATURED_SQL = (
    "SELECT least(greatest(coalesce(("
    "   SELECT sum(e.amount) FROM ledger_entries AS e WHERE e.credit = a.id"
    "   AND e.kind IN ('settle', 'reward') AND e.created_at > w.since), 0)"
    " - coalesce(("
    "   SELECT sum(e.amount) FROM ledger_entries AS e WHERE e.debit = a.id"
    "   AND e.kind IN ('slash', 'refund') AND e.created_at > w.since), 0),"
    " 0), a.balance)::bigint"
    " FROM ledger_accounts AS a,"
    " (SELECT now() - make_interval(secs => $3::float8) AS since) AS w"
    " WHERE a.kind = $1 AND a.owner = $2"
)


@dataclass(frozen=True)
class Entry:
    """One double entry: ``amount`` moves from ``debit`` to ``credit``."""

    seq: int  # index in the Merkle log: gap-free from 0, in commit order
    kind: EntryKind  # why the money moved
    debit: AccountRef  # the account that pays
    credit: AccountRef  # the account that receives
    amount: int  # micro-units, > 0
    hold_id: int | None  # the hold this entry opens or closes; None outside holds (mint, slash..)
    reference: bytes | None  # request hash for holds and releases, receipt hash for settlements
    memo: str  # free text, set by mints, slashes, refunds and rewards
    created_at: datetime  # when the transaction that wrote it started
    leaf: bytes  # the canonical bytes hashed into the Merkle log (ledger/entry.py)


class PostgresLedger:
    """Implements ``ledger.interface.Ledger`` on an asyncpg pool.

    Use ``await PostgresLedger.create(pool)``; the bare constructor does no I/O and suits
    read-only callers that must not create tables in a database that has none. Call
    ``aclose()`` before closing the pool so the last batch can commit.
    """

    def __init__(self, pool: asyncpg.Pool[asyncpg.Record], *, max_batch: int = 1000) -> None:
        self._pool = pool
        self._max_batch = max_batch
        self._queue: list[tuple[Operation, asyncio.Future[Outcome]]] = []
        self._flusher: asyncio.Task[None] | None = None

    @classmethod
    async def create(
        cls, pool: asyncpg.Pool[asyncpg.Record], *, max_batch: int = 1000
    ) -> PostgresLedger:
        """Creates the tables and the system accounts where missing, then returns the ledger."""
        schema = resources.files("ledger").joinpath("schema.sql").read_text(encoding="utf-8")
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK_KEY)
            await conn.execute(schema)
        return cls(pool, max_batch=max_batch)

    async def aclose(self) -> None:
        """Waits for queued operations to commit."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)

    async def open_account(self, account: AccountRef) -> None:
        _check_account(account)
        await self._submit(OpenAccount(account))

    async def mint(self, account: AccountRef, amount: int, *, memo: str = "") -> None:
        _check_account(account, kinds=(AccountKind.BUYER, AccountKind.MINER), role="mint into")
        _check_amount("mint amount", amount, positive=True)
        await self._submit(Mint(account, amount, memo))
        logger.info("minted %d micro-units into %s", amount, account)

    async def hold(
        self, buyer: AccountRef, amount: int, *, reference: bytes, holder: str | None = None
    ) -> Hold:
        _check_account(buyer, kinds=(AccountKind.BUYER,), role="hold from")
        _check_amount("hold amount", amount, positive=True)
        outcome = await self._submit(PlaceHold(buyer, amount, reference, holder))
        assert isinstance(outcome, Hold)
        return outcome

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
        outcome = await self._submit(CloseHold(hold, miner, miner_credit, fee, reference))
        assert isinstance(outcome, Settlement)
        return outcome

    async def release(self, hold: Hold) -> Settlement:
        outcome = await self._submit(CloseHold(hold, None, 0, 0, None))
        assert isinstance(outcome, Settlement)
        return outcome

    async def release_open_holds(self, *, holder: str | None = None) -> int:
        """Releases the open holds placed by ``holder``; returns how many this call closed.

        For cleaning up after a coordinator replica that is gone (``coordinator.replicas``): no
        request outlives its replica, so its open holds belong to requests that died with it and
        would otherwise keep the buyers' money in escrow forever. ``holder=None`` releases the
        holds that name no holder: those placed before holders existed, or by callers outside a
        replica; only safe while no such caller can have a request in flight (a fenced single
        coordinator at startup); it is the default, so a caller that places holds without a
        holder keeps the old meaning (every hold it placed). A hold that closes meanwhile (its
        request settled it, or another sweeper released it first) is skipped, so running this
        twice is harmless.
        """
        rows = await self._pool.fetch(
            "SELECT h.id, h.amount, a.kind, a.owner FROM ledger_holds AS h"
            " JOIN ledger_accounts AS a ON a.id = h.buyer"
            " WHERE h.status = 'open' AND h.holder IS NOT DISTINCT FROM $1",
            holder,
        )
        outcomes = await asyncio.gather(
            *(self.release(Hold(r["id"], _ref(r["kind"], r["owner"]), r["amount"])) for r in rows),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, HoldClosedError):
                raise outcome
        return sum(isinstance(outcome, Settlement) for outcome in outcomes)

    async def slash(self, miner: AccountRef, amount: int, *, reference: bytes, memo: str) -> int:
        _check_account(miner, kinds=(AccountKind.MINER,), role="slash")
        moved = await self._transfer(EntryKind.SLASH, miner, ISSUANCE, amount, reference, memo)
        if moved:
            logger.info("slashed %d of %d micro-units from %s", moved, amount, miner)
        return moved

    async def refund(
        self, buyer: AccountRef, amount: int, *, source: AccountRef, reference: bytes, memo: str
    ) -> int:
        _check_account(buyer, kinds=(AccountKind.BUYER,), role="refund to")
        _check_account(source, kinds=(AccountKind.MINER, AccountKind.FEE), role="refund from")
        return await self._transfer(EntryKind.REFUND, source, buyer, amount, reference, memo)

    async def reward(self, miner: AccountRef, amount: int, *, reference: bytes, memo: str) -> int:
        _check_account(miner, kinds=(AccountKind.MINER,), role="reward")
        return await self._transfer(EntryKind.REWARD, FEE, miner, amount, reference, memo)

    async def _transfer(
        self,
        kind: EntryKind,
        debit: AccountRef,
        credit: AccountRef,
        amount: int,
        reference: bytes,
        memo: str,
    ) -> int:
        _check_amount(f"{kind.name.lower()} amount", amount, positive=False)
        if amount == 0:
            return 0
        # The column holds what the leaf holds: exactly 32 bytes.
        op = Transfer(kind, debit, credit, amount, reference_of(reference), fit_memo(memo))
        outcome = await self._submit(op)
        assert isinstance(outcome, int)
        return outcome

    async def unmatured(self, miner: AccountRef, *, window_s: float) -> int:
        _check_account(miner, kinds=(AccountKind.MINER,), role="look up unmatured credits of")
        if not 0 <= window_s <= _MAX_WINDOW_S:  # also refuses NaN
            raise ValueError(f"window_s must be in [0, {_MAX_WINDOW_S:g}], not {window_s!r}")
        # One statement, so the balance and the sums come from one snapshot; the window is
        # measured on the database's clock, the one that stamped created_at.
        value: int | None = await self._pool.fetchval(
            UNMATURED_SQL,
            str(miner.kind),
            miner.owner,
            float(window_s),
        )
        return value or 0

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

    async def entries(self, *, after_seq: int = -1, limit: int = 1000) -> list[Entry]:
        """Entries with ``seq > after_seq`` in ``seq`` order, at most ``limit`` of them."""
        if not 1 <= limit <= 100_000:
            raise ValueError(f"limit must be between 1 and 100000, not {limit}")
        rows = await self._pool.fetch(
            "SELECT e.seq, e.kind, d.kind AS debit_kind, d.owner AS debit_owner,"
            " c.kind AS credit_kind, c.owner AS credit_owner, e.amount, e.hold_id,"
            " e.reference, e.memo, e.created_at, e.leaf"
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
                kind=EntryKind[row["kind"].upper()],
                debit=_ref(row["debit_kind"], row["debit_owner"]),
                credit=_ref(row["credit_kind"], row["credit_owner"]),
                amount=row["amount"],
                hold_id=row["hold_id"],
                reference=row["reference"],
                memo=row["memo"],
                created_at=row["created_at"],
                leaf=row["leaf"],
            )
            for row in rows
        ]

    async def _submit(self, op: Operation) -> Outcome:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._queue.append((op, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        try:
            outcome = await asyncio.shield(future)
        except asyncio.CancelledError:
            # The caller left, but its operation may still commit: a hold nobody knows about
            # would keep the buyer's money in escrow forever, so give it back.
            with contextlib.suppress(Exception):
                placed = await future
                if isinstance(placed, Hold):
                    await self._submit(CloseHold(placed, None, 0, 0, None))
            raise
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    outcomes = await apply_batch(conn, [op for op, _ in batch])
            except asyncpg.NumericValueOutOfRangeError as exc:
                error: BaseException = InvalidAmountError(
                    f"a balance would leave the bigint range: {exc}"
                )
                outcomes = [error] * len(batch)
            except Exception as exc:
                logger.exception("a ledger batch of %d operations failed", len(batch))
                outcomes = [exc] * len(batch)
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if not future.done():
                    future.set_result(outcome)


def fit_memo(memo: str) -> str:
    """``memo`` cut to MAX_MEMO_BYTES of UTF-8 on a character boundary.

    Truncated rather than refused: a slash or a refund must not fail because its reason (which
    may quote a miner's error text) is long, and an entry that cannot be encoded would fail its
    whole batch.
    """
    data = memo.encode("utf-8")
    if len(data) <= MAX_MEMO_BYTES:
        return memo
    return data[:MAX_MEMO_BYTES].decode("utf-8", errors="ignore")


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
