"""The canonical binary encoding of a ledger entry: the exact bytes that become a Merkle leaf.

JSON and protobuf are not canonical, so the layout is fixed here, versioned, and parsed
strictly (a decoder that accepted two spellings of one entry would let an operator change the
bytes behind a leaf hash). The bytes are stored as they were hashed and never re-serialized.

Version 1 layout, all integers big-endian:

    u8   version            = 1
    u8   kind               EntryKind code
    u64  seq                the entry's index in the log (= its leaf index), from 0
    u64  timestamp_us       unix time in microseconds when the sequencer wrote it
    acct debit              the account that loses ``amount``
    acct credit             the account that gains ``amount``
    u64  amount             micro-units, > 0 and < 2**63
    u64  hold_id            the hold this entry opens or closes; 0 for none
    32B  reference          e.g. the request hash (hold) or the job receipt hash (settle)
    32B  prev_leaf_hash     leaf hash of entry seq-1; 32 zero bytes for seq 0
    u16  memo length, then that many bytes of UTF-8 (at most MAX_MEMO_BYTES)

    acct = u8 AccountKind code, u16 owner length, owner UTF-8 (at most MAX_OWNER_BYTES)

Third parties can decode entries with this module alone (stdlib only; out of the package its
errors derive from a stand-in for ``ledger.interface.LedgerError``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

try:
    from ledger.interface import LedgerError
except ImportError:  # pragma: no cover - this file copied out of meshmint, as it may be

    class LedgerError(Exception):  # type: ignore[no-redef]
        """Stands in for ledger.interface.LedgerError, the root of the ledger's errors."""


ENTRY_VERSION = 1
MAX_OWNER_BYTES = 128
MAX_MEMO_BYTES = 1024
MAX_AMOUNT = 2**63 - 1
ZERO_HASH = bytes(32)

_HEAD = struct.Struct(">BBQQ")
_MIDDLE = struct.Struct(">QQ")
_ACCOUNT_HEAD = struct.Struct(">BH")
_LENGTH = struct.Struct(">H")


class EntryKind(IntEnum):
    """What an entry records. Codes are part of the encoding: never renumber."""

    MINT = 1  # issuance -> account: new credits
    HOLD = 2  # buyer -> escrow: a request's maximum cost reserved
    SETTLE = 3  # escrow -> miner: the miner's share of a charge
    FEE = 4  # escrow -> fee: the operator's share of a charge
    RELEASE = 5  # escrow -> buyer: the unspent rest of a hold
    SLASH = 6  # miner -> issuance: credits taken from a cheating miner
    REFUND = 7  # fee or miner -> buyer: a charge given back
    REWARD = 8  # fee -> miner: pay for verification (scoring) work


class AccountCode(IntEnum):
    """Account kinds as encoded. Codes are part of the encoding: never renumber."""

    ISSUANCE = 1
    ESCROW = 2
    FEE = 3
    BUYER = 4
    MINER = 5


@dataclass(frozen=True)
class EncodedAccount:
    kind: AccountCode  # what the account is for
    owner: str  # API key id, miner id, or "" for system accounts


@dataclass(frozen=True)
class LedgerEntry:
    """One double entry as it appears in the log."""

    kind: EntryKind  # what happened
    seq: int  # index in the log
    timestamp_us: int  # unix microseconds
    debit: EncodedAccount  # loses amount
    credit: EncodedAccount  # gains amount
    amount: int  # micro-units
    hold_id: int  # 0 when the entry belongs to no hold
    reference: bytes  # 32 bytes
    prev_leaf_hash: bytes  # 32 bytes
    memo: str = ""  # free text for humans (e.g. why credits were minted)


class EntryFormatError(LedgerError, ValueError):
    """Bytes that are not a valid version-1 entry, or an entry that cannot be encoded."""


def _account(account: EncodedAccount) -> bytes:
    owner = account.owner.encode("utf-8")
    if len(owner) > MAX_OWNER_BYTES:
        raise EntryFormatError(f"account owner longer than {MAX_OWNER_BYTES} bytes")
    return _ACCOUNT_HEAD.pack(int(account.kind), len(owner)) + owner


def encode_entry(entry: LedgerEntry) -> bytes:
    """The canonical bytes of ``entry``."""
    if not 0 < entry.amount <= MAX_AMOUNT:
        raise EntryFormatError(f"amount must be in (0, 2**63), got {entry.amount}")
    if len(entry.reference) != 32 or len(entry.prev_leaf_hash) != 32:
        raise EntryFormatError("reference and prev_leaf_hash must be 32 bytes")
    if entry.debit == entry.credit:
        raise EntryFormatError("an entry must move value between two different accounts")
    memo = entry.memo.encode("utf-8")
    if len(memo) > MAX_MEMO_BYTES:
        raise EntryFormatError(f"memo longer than {MAX_MEMO_BYTES} bytes")
    try:
        return b"".join(
            (
                _HEAD.pack(ENTRY_VERSION, int(entry.kind), entry.seq, entry.timestamp_us),
                _account(entry.debit),
                _account(entry.credit),
                _MIDDLE.pack(entry.amount, entry.hold_id),
                entry.reference,
                entry.prev_leaf_hash,
                _LENGTH.pack(len(memo)),
                memo,
            )
        )
    except struct.error as error:
        raise EntryFormatError(f"field out of range: {error}") from None


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    def take(self, count: int) -> bytes:
        if self._at + count > len(self._data):
            raise EntryFormatError("entry bytes end early")
        chunk = self._data[self._at : self._at + count]
        self._at += count
        return chunk

    def unpack(self, layout: struct.Struct) -> tuple[int, ...]:
        return layout.unpack(self.take(layout.size))

    def text(self, length: int, limit: int, what: str) -> str:
        if length > limit:
            raise EntryFormatError(f"{what} longer than {limit} bytes")
        try:
            return self.take(length).decode("utf-8")
        except UnicodeDecodeError:
            raise EntryFormatError(f"{what} is not UTF-8") from None

    def account(self) -> EncodedAccount:
        code, length = self.unpack(_ACCOUNT_HEAD)
        try:
            kind = AccountCode(code)
        except ValueError:
            raise EntryFormatError(f"unknown account kind {code}") from None
        return EncodedAccount(kind, self.text(length, MAX_OWNER_BYTES, "account owner"))

    def finish(self) -> None:
        if self._at != len(self._data):
            raise EntryFormatError("trailing bytes after the entry")


def decode_entry(data: bytes) -> LedgerEntry:
    """Parses canonical entry bytes; raises EntryFormatError for anything else."""
    reader = _Reader(bytes(data))
    version, kind_code, seq, timestamp_us = reader.unpack(_HEAD)
    if version != ENTRY_VERSION:
        raise EntryFormatError(f"unsupported entry version {version}")
    try:
        kind = EntryKind(kind_code)
    except ValueError:
        raise EntryFormatError(f"unknown entry kind {kind_code}") from None
    debit = reader.account()
    credit = reader.account()
    amount, hold_id = reader.unpack(_MIDDLE)
    reference = reader.take(32)
    prev_leaf_hash = reader.take(32)
    (memo_length,) = reader.unpack(_LENGTH)
    memo = reader.text(memo_length, MAX_MEMO_BYTES, "memo")
    reader.finish()
    entry = LedgerEntry(
        kind=kind,
        seq=seq,
        timestamp_us=timestamp_us,
        debit=debit,
        credit=credit,
        amount=amount,
        hold_id=hold_id,
        reference=reference,
        prev_leaf_hash=prev_leaf_hash,
        memo=memo,
    )
    if not 0 < amount <= MAX_AMOUNT or debit == credit:
        raise EntryFormatError("invalid amount or identical accounts")
    return entry
