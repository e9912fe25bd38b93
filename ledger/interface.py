"""What the coordinator sees of the ledger: accounts, mints, holds and settlements.

Amounts are integers in micro-units (1 credit = 1,000,000 micro-units). Every balance change is
a double entry that debits one account and credits another, so all balances always sum to zero;
only the issuance account may go negative, and only through mints.

A buyer's request first *holds* its maximum cost (buyer -> escrow), then *settles* exactly once:
escrow -> miner (its share), escrow -> fee (the operator's), escrow -> buyer (the rest).

Spot checks move money outside holds: a confirmed cheat is *slashed* (miner -> issuance), the
buyer of a failed job *refunded* (miner or fee -> buyer), and scorers *rewarded* for their work
(fee -> miner). These move at most what the paying account holds, never driving it below zero,
and return the amount actually moved. A miner's credits *mature* once they are older than the
verification window; until then they are what a slash can take (``unmatured``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

MICRO_PER_CREDIT = 1_000_000


class AccountKind(StrEnum):
    ISSUANCE = "issuance"  # source of all credits; the only account that may be negative
    ESCROW = "escrow"  # holds of requests in flight
    FEE = "fee"  # the operator's take
    BUYER = "buyer"  # one per API key
    MINER = "miner"  # one per miner identity key


@dataclass(frozen=True, order=True)
class AccountRef:
    """Names an account. System accounts (issuance, escrow, fee) have an empty owner."""

    kind: AccountKind  # what the account is for
    owner: str = ""  # API key id for buyers, hex public key for miners, "" for system accounts

    def __str__(self) -> str:
        return f"{self.kind}:{self.owner}" if self.owner else str(self.kind)


ISSUANCE = AccountRef(AccountKind.ISSUANCE)
ESCROW = AccountRef(AccountKind.ESCROW)
FEE = AccountRef(AccountKind.FEE)


@dataclass(frozen=True)
class AccountBalance:
    account: AccountRef  # which account
    balance: int  # micro-units; negative only for issuance


@dataclass(frozen=True)
class Hold:
    """An open reservation of a buyer's funds; settled or released exactly once."""

    hold_id: int  # ledger-assigned identifier
    buyer: AccountRef  # whose funds are held
    amount: int  # micro-units moved from the buyer to escrow


@dataclass(frozen=True)
class Settlement:
    """How a hold was closed."""

    hold_id: int  # the hold this closed
    charged: int  # what the buyer paid: miner_credit + fee
    miner_credit: int  # credited to the miner
    fee: int  # credited to the operator's fee account
    released: int  # returned to the buyer: hold amount - charged


class LedgerError(Exception):
    """Root of everything the ledger package raises on purpose.

    LedgerError
    ├── InvalidAmountError       an amount is negative, zero where not allowed, or too large
    ├── UnknownAccountError      the account was never opened
    ├── InsufficientFundsError   the buyer's balance does not cover the hold
    ├── HoldClosedError          the hold does not exist, or was already settled or released
    │
    │   The sequencer (checkpointer.py), also RuntimeErrors:
    ├── SequencerFencedError     another process holds the sequencer lock, or took it over
    ├── SigningKeyChangedError   the last checkpoint was signed by another key, no rotation asked
    ├── LogForkError             the stored tree does not extend the signed checkpoints
    │
    │   Bytes, keys and ranges, also ValueErrors:
    ├── CheckpointError          a malformed, unsigned or wrongly signed note or key (checkpoint.py)
    ├── EntryFormatError         bytes that are not a valid entry, or one not encodable (entry.py)
    ├── LogRangeError            an index or size outside the log (log_reader.py)
    ├── KeyFileError             a key file unreadable, not Ed25519 or open to others (keyfile.py)
    ├── DumpError                the database holds no signed ledger to dump (dump.py)
    │
    │   The database (database.py), also an OSError:
    ├── DatabaseUnreachableError PostgreSQL at the given URL cannot be reached or refuses us
    │
    │   The meshmint-ledger tool:
    ├── AuditSourceError         the data to audit could not be fetched or read (audit_source.py)
    └── CliError                 a failure the user can act on, exit status 2 (cli.py)

    The subclasses that were ValueErrors or RuntimeErrors before this tree still are, so an
    ``except ValueError`` written for them still catches them. This module imports nothing from
    the package, so every other module can import LedgerError from it without a cycle.
    """


class InvalidAmountError(LedgerError):
    """An amount is negative, zero where not allowed, or larger than the hold it closes."""


class UnknownAccountError(LedgerError):
    """The account was never opened."""


class InsufficientFundsError(LedgerError):
    """The buyer's balance does not cover the hold."""

    def __init__(self, account: AccountRef, *, needed: int, available: int) -> None:
        super().__init__(f"{account} has {available} micro-units, {needed} needed")
        self.account = account
        self.needed = needed
        self.available = available


class HoldClosedError(LedgerError):
    """The hold does not exist, or was already settled or released."""


class Ledger(Protocol):
    """The ledger as the coordinator uses it. All methods are safe under concurrency."""

    async def open_account(self, account: AccountRef) -> None:
        """Creates the account with a zero balance; does nothing if it exists."""
        ...

    async def mint(self, account: AccountRef, amount: int, *, memo: str = "") -> None:
        """Issues ``amount`` new micro-units into ``account`` (issuance -> account)."""
        ...

    async def hold(
        self, buyer: AccountRef, amount: int, *, reference: bytes, holder: str | None = None
    ) -> Hold:
        """Moves ``amount`` from ``buyer`` to escrow, atomically checking the balance.

        Raises InsufficientFundsError rather than letting any balance go below zero, also when
        many holds race. ``reference`` (32 bytes) ties the hold to its request. ``holder`` names
        the coordinator replica that placed it (``coordinator.replicas``), so that the holds of
        a replica that died, and only those, can be released; None when no replica owns it.
        """
        ...

    async def settle(
        self, hold: Hold, *, miner: AccountRef, miner_credit: int, fee: int, reference: bytes
    ) -> Settlement:
        """Closes ``hold``: pays the miner and the fee from escrow, returns the rest to the buyer.

        ``miner_credit + fee`` must not exceed the held amount; zero is allowed. Raises
        HoldClosedError when the hold was already closed. ``reference`` is the job receipt hash.
        """
        ...

    async def release(self, hold: Hold) -> Settlement:
        """Closes ``hold`` returning everything to the buyer (nothing was delivered)."""
        ...

    async def slash(self, miner: AccountRef, amount: int, *, reference: bytes, memo: str) -> int:
        """Moves up to ``amount`` from ``miner`` to issuance (SLASH); returns what was moved.

        Capped at the miner's balance, also when many slashes race; 0 moves nothing and writes no
        entry. ``reference`` is 32 bytes (others are hashed to fit), e.g. the failed job's receipt
        hash; ``memo`` says why and is cut to MAX_MEMO_BYTES of UTF-8 if longer. Raises
        InvalidAmountError for a negative amount, UnknownAccountError for an account never
        opened, ValueError for an account that is not a miner.
        """
        ...

    async def refund(
        self, buyer: AccountRef, amount: int, *, source: AccountRef, reference: bytes, memo: str
    ) -> int:
        """Moves up to ``amount`` from ``source`` (a miner, or the fee account) to ``buyer``
        (REFUND); returns what was moved. Capped at ``source``'s balance; otherwise as ``slash``.
        """
        ...

    async def reward(self, miner: AccountRef, amount: int, *, reference: bytes, memo: str) -> int:
        """Pays ``miner`` up to ``amount`` from the fee account (REWARD); returns what was moved.

        Capped at the fee account's balance; otherwise as ``slash``.
        """
        ...

    async def unmatured(self, miner: AccountRef, *, window_s: float) -> int:
        """Credits that have not matured yet: SETTLE and REWARD credits to ``miner`` whose entries
        are younger than ``window_s`` seconds, minus SLASH and REFUND debits from ``miner`` in
        that window, clamped to [0, balance]. 0 for an unknown account.

        Ages are measured on the database's clock, from the start of the transaction that wrote
        each entry. Raises ValueError for a ``window_s`` that is negative, NaN or above 1e9 (about
        31 years), or for an account that is not a miner.
        """
        ...

    async def balance(self, account: AccountRef) -> int:
        """The account's balance in micro-units. Raises UnknownAccountError."""
        ...

    async def balances(self) -> list[AccountBalance]:
        """Every account's balance, ordered by account."""
        ...
