"""The outside auditor: replays a whole ledger and reports every way it breaks its promises.

Trusts nothing the operator says. From the raw entries, the signed checkpoints and the published
balances it checks, in ONE streaming pass over the entries (O(log n) memory for the tree, one
integer per account and per open hold):

- each entry decodes (``entry.malformed``), its ``seq`` is its position (``entry.seq_gap`` when
  entries are missing, ``entry.seq_order`` when one repeats or comes back), and its
  ``prev_leaf_hash`` is the leaf hash of the entry before it (``entry.prev_hash``);
- the Merkle root of the log at every checkpoint's size equals the signed root: checkpoints whose
  signature fails (``checkpoint.signature``, ``checkpoint.origin``), two valid checkpoints of one
  size with different roots (``checkpoint.equivocation``), a run of checkpoints the log does not
  match (``checkpoint.root_mismatch``) -- or that a later checkpoint the log *does* match
  contradicts, i.e. the operator signed two heads that are not prefixes of one log
  (``checkpoint.inconsistent``) -- and checkpoints larger than the log (``checkpoint.beyond_log``,
  ``log.truncated``);
- a checkpoint the auditor kept from earlier is still published (``trusted.withdrawn``) and
  still a prefix of the log (``trusted.missing``
  when the log is now shorter, ``trusted.inconsistent`` when its root differs: history was
  rewritten, whatever the operator has re-signed since);
- the balances recomputed from the entries equal the published ones at the size they were
  published for (``balance.mismatch``, ``balance.unpublished``, ``balance.extra``,
  ``balance.beyond_log``); the published ones sum to zero (``conservation.sum``); no account but
  issuance ever goes negative (``conservation.negative``);
- every entry moves value between the accounts its kind allows (``entry.accounts``): SLASH
  miner -> issuance, REFUND fee or miner -> buyer, REWARD fee -> miner, and so on; issuance moves
  only by mints out and slashes back in (``issuance.illegal_move``, ``mint.source``);
- holds: opened once with a fresh id (``hold.duplicate``, ``hold.no_id``), closed by one group of
  SETTLE, FEE, RELEASE entries (in that order, zero legs omitted) that references an open hold
  (``hold.unknown``) and returns the rest to the buyer who paid it (``hold.wrong_buyer``), whose
  charge fits the hold (``hold.overspent``) and whose legs add up to it (``hold.amounts``); no
  entry references the hold afterwards (``hold.double_close``); entries of other kinds (MINT,
  SLASH, REFUND, REWARD) carry no hold id (``entry.hold_id``); at the end the escrow balance
  equals the open holds (``escrow.mismatch``).

Account keys are ``AccountRef``'s spelling: ``issuance``, ``escrow``, ``fee`` for the system
accounts and ``buyer:<owner>`` / ``miner:<owner>`` for the others.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ledger.audit_report import AuditReport, Finding
from ledger.checkpoint import Checkpoint, CheckpointError, Verifier, parse_signed_checkpoint
from ledger.entry import (
    MAX_AMOUNT,
    MAX_MEMO_BYTES,
    MAX_OWNER_BYTES,
    ZERO_HASH,
    AccountCode,
    EntryFormatError,
    EntryKind,
)
from ledger.merkle import EMPTY_ROOT, CompactRange

MAX_FINDINGS = 1000  # findings kept in a report; the rest are only counted
MAX_FINDINGS_PER_CODE = 100  # so that one flood cannot hide every other kind of finding
PROGRESS_EVERY = 1 << 14  # entries between two progress callbacks

_HEAD = struct.Struct(">BBQQBH")  # version, kind, seq, timestamp_us, then the debit's head
_ACCOUNT_HEAD = struct.Struct(">BH")
_MIDDLE = struct.Struct(">QQ")
_LENGTH = struct.Struct(">H")
_HEAD_SIZE = 18  # version .. timestamp_us: where the debit account starts
_KINDS = frozenset(int(kind) for kind in EntryKind)  # every code a version-1 entry may carry
_ACCOUNT_CODES = range(1, 6)  # AccountCode codes
_ISSUANCE = 1

# (kind, seq, debit account bytes, credit account bytes, amount, hold_id, prev_leaf_hash)
ScannedEntry = tuple[int, int, bytes, bytes, int, int, bytes]


def scan_entry(data: bytes) -> ScannedEntry:
    """The fields the auditor needs, read straight from canonical entry bytes.

    Rejects exactly what ``entry.decode_entry`` rejects (with EntryFormatError) but builds no
    objects: accounts come back as their encoded bytes (code, length, owner), which identify an
    account one to one because the encoding is canonical.
    """
    try:
        version, kind, seq, _, debit_code, debit_len = _HEAD.unpack_from(data)
        credit_at = _HEAD_SIZE + 3 + debit_len
        credit_code, credit_len = _ACCOUNT_HEAD.unpack_from(data, credit_at)
        middle_at = credit_at + 3 + credit_len
        amount, hold_id = _MIDDLE.unpack_from(data, middle_at)
        prev_at = middle_at + 48
        (memo_len,) = _LENGTH.unpack_from(data, prev_at + 32)
    except struct.error:
        raise EntryFormatError("entry bytes end early") from None
    memo_at = prev_at + 34
    # Every length above only pushes later fields further, so ending exactly here proves that
    # each field lay inside the data.
    if memo_at + memo_len != len(data):
        raise EntryFormatError("entry length does not match its fields")
    if version != 1 or kind not in _KINDS:
        raise EntryFormatError(f"unsupported entry version {version} or kind {kind}")
    if debit_code not in _ACCOUNT_CODES or credit_code not in _ACCOUNT_CODES:
        raise EntryFormatError("unknown account kind")
    if debit_len > MAX_OWNER_BYTES or credit_len > MAX_OWNER_BYTES or memo_len > MAX_MEMO_BYTES:
        raise EntryFormatError("account owner or memo too long")
    if not 0 < amount <= MAX_AMOUNT:
        raise EntryFormatError("invalid amount")
    debit = data[_HEAD_SIZE:credit_at]
    credit = data[credit_at:middle_at]
    if debit == credit:
        raise EntryFormatError("identical accounts")
    try:
        if debit_len:
            data[_HEAD_SIZE + 3 : credit_at].decode("utf-8")
        if credit_len:
            data[credit_at + 3 : middle_at].decode("utf-8")
        if memo_len:
            data[memo_at:].decode("utf-8")
    except UnicodeDecodeError:
        raise EntryFormatError("text is not UTF-8") from None
    return kind, seq, debit, credit, amount, hold_id, data[prev_at : prev_at + 32]


_A, _K = AccountCode, EntryKind
# The accounts each kind may debit and credit (see EntryKind in ledger/entry.py).
_SHAPES: dict[int, tuple[set[int], set[int]]] = {
    _K.MINT: ({_A.ISSUANCE}, {_A.FEE, _A.BUYER, _A.MINER}),
    _K.HOLD: ({_A.BUYER}, {_A.ESCROW}),
    _K.SETTLE: ({_A.ESCROW}, {_A.MINER}),
    _K.FEE: ({_A.ESCROW}, {_A.FEE}),
    _K.RELEASE: ({_A.ESCROW}, {_A.BUYER}),
    _K.SLASH: ({_A.MINER}, {_A.ISSUANCE}),
    _K.REFUND: ({_A.FEE, _A.MINER}, {_A.BUYER}),
    _K.REWARD: ({_A.FEE}, {_A.MINER}),
}
# The same as one integer per allowed (kind, debit, credit): a single set lookup per entry.
_ALLOWED = frozenset(k << 6 | d << 3 | c for k, (ds, cs) in _SHAPES.items() for d in ds for c in cs)
_NAMES = {int(code): code.name.lower() for code in AccountCode}  # = AccountKind's values
_SYSTEM = {_A.ISSUANCE, _A.ESCROW, _A.FEE}  # singletons, with an empty owner


def _shape_problem(kind: int, debit: int, credit: int) -> tuple[str, str]:
    """(code, message) for an entry of ``kind`` between accounts of these codes."""
    name = _K(kind).name
    if kind == _K.MINT and debit != _A.ISSUANCE:
        return "mint.source", f"MINT from {_NAMES[debit]}, not issuance"
    if _A.ISSUANCE in (debit, credit) and kind not in (_K.MINT, _K.SLASH):
        return "issuance.illegal_move", f"{name} moves issuance; only MINT and SLASH may"
    return "entry.accounts", f"{name} may not move {_NAMES[debit]} -> {_NAMES[credit]}"


class _Holds:
    """Open holds, closed hold ids, and the closing group being read."""

    def __init__(self, add: Callable[[str, str, int | None], None], names: list[str]) -> None:
        self._add = add
        self._names = names  # account names by index, for messages
        self.open: dict[int, tuple[int, int]] = {}  # hold id -> (amount, buyer's account index)
        self._closed: set[int] = set()
        # The group of SETTLE/FEE/RELEASE entries being read: (id, held, buyer, first position);
        # held and buyer are -1 for a group that closes no open hold (already reported).
        self.group: tuple[int, int, int, int] | None = None
        self._last_kind = 0  # kind of the group's latest entry: the next must have a higher one
        self._charged = 0  # SETTLE + FEE so far
        self._total = 0  # SETTLE + FEE + RELEASE so far

    def on_hold(self, position: int, hold_id: int, amount: int, buyer: int) -> None:
        if self.group is not None:
            self.end_group()
        if not hold_id:
            self._add("hold.no_id", f"entry {position} opens a hold without an id", position)
        elif hold_id in self.open or hold_id in self._closed:
            self._add("hold.duplicate", f"entry {position} reopens hold {hold_id}", position)
        else:
            self.open[hold_id] = (amount, buyer)

    def on_close(self, position: int, kind: int, hold_id: int, amount: int, credit: int) -> None:
        group = self.group
        if group is not None:
            if group[0] == hold_id and kind > self._last_kind:
                self._leg(position, kind, amount, credit, group[2])
                return
            self.end_group()
        opened = self.open.pop(hold_id, None)
        if opened is None:
            if hold_id in self._closed:
                what = "hold.double_close", f"entry {position} closes hold {hold_id} again"
            else:
                what = "hold.unknown", f"entry {position} closes hold {hold_id}, never opened"
            self._add(*what, position)
            opened = (-1, -1)  # read the rest of this group without a finding per leg
        else:
            self._closed.add(hold_id)
        self.group = (hold_id, opened[0], opened[1], position)
        self._charged = self._total = 0
        self._leg(position, kind, amount, credit, opened[1])

    def _leg(self, position: int, kind: int, amount: int, credit: int, buyer: int) -> None:
        self._last_kind = kind
        self._total += amount
        if kind == _K.RELEASE:
            if credit != buyer and buyer >= 0:
                whose = f"{self._names[buyer]}'s hold to {self._names[credit]}"
                self._add("hold.wrong_buyer", f"entry {position} releases {whose}", position)
        else:
            self._charged += amount

    def on_other(self, position: int, hold_id: int) -> None:
        if self.group is not None:
            self.end_group()
        if hold_id:
            self._add("entry.hold_id", f"entry {position} names hold {hold_id}", position)

    def end_group(self) -> None:
        assert self.group is not None
        hold_id, held, _, position = self.group
        self.group = None
        if held < 0:  # a group already reported as closing no open hold
            return
        if self._charged > held:
            self._add(
                "hold.overspent", f"hold {hold_id} of {held} charged {self._charged}", position
            )
        elif self._total != held:
            self._add(
                "hold.amounts", f"hold {hold_id} of {held} closed with {self._total}", position
            )

    def open_amount(self) -> int:
        return sum(amount for amount, _ in self.open.values())


@dataclass(frozen=True)
class AuditInput:
    """What the operator published, as an auditor downloaded it."""

    entries: Iterable[bytes]  # raw entry bytes in log order; iterated once, never held whole
    checkpoints: Sequence[bytes]  # signed checkpoint notes, in size order
    balances: Mapping[str, int]  # published balances in micro-units by account key
    balances_size: int | None  # log size the balances were taken at; None: the whole log
    claimed_size: int  # how many entries the operator says there are (for progress only)


class _Findings:
    def __init__(self) -> None:
        self.kept: list[Finding] = []
        self.counts: dict[str, int] = {}
        self.omitted = 0

    def add(self, code: str, message: str, seq: int | None = None) -> None:
        count = self.counts.get(code, 0) + 1
        self.counts[code] = count
        if len(self.kept) < MAX_FINDINGS and count <= MAX_FINDINGS_PER_CODE:
            self.kept.append(Finding(code, message, seq))
        else:
            self.omitted += 1


@dataclass
class _Replay:
    """What the pass over the entries leaves behind."""

    holds: _Holds  # open holds at the end
    count: int = 0  # entries read
    roots: dict[int, bytes] = field(default_factory=dict)  # tree size -> root, at the stops
    root: bytes = EMPTY_ROOT  # root of everything read
    snapshot: dict[str, int] | None = None  # balances at the published balances' size
    balances: dict[str, int] = field(default_factory=dict)  # balances at the end


def audit(
    source: AuditInput,
    *,
    verifier: Verifier | Sequence[Verifier],
    origin: str,
    trusted: Checkpoint | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> AuditReport:
    """Replay ``source`` against the operator's key(s) and report every finding.

    Exceptions raised while iterating ``source.entries`` (a download failing half-way) propagate:
    an audit that could not finish is not a finding.
    """
    started = time.perf_counter()
    findings = _Findings()
    heads = _verify_checkpoints(source.checkpoints, verifier, origin, findings)
    stops = {*heads, *([trusted.size] if trusted else [])}
    if source.balances_size is not None:
        stops.add(source.balances_size)
    replay = _replay(source, sorted(stops), findings.add, progress)
    _check_heads(heads, replay, findings.add)
    if trusted is not None:
        _check_trusted(trusted, origin, replay, findings.add)
        if trusted.origin == origin and trusted.root_hash not in heads.get(trusted.size, []):
            # The operator signed it (we hold it) but no longer publishes it: checkpoints are
            # never deleted, so someone removed evidence.
            findings.add(
                "trusted.withdrawn",
                f"the operator no longer publishes the trusted checkpoint of size {trusted.size}",
            )
    _check_balances(source, replay, findings.add)
    latest = max(heads, default=None)
    return AuditReport(
        entries=replay.count,
        claimed_entries=source.claimed_size,
        root=replay.root,
        latest_checkpoint=None if latest is None else Checkpoint(origin, latest, heads[latest][0]),
        checkpoints_verified=sum(len(roots) for roots in heads.values()),
        trusted=trusted,
        accounts=len(replay.balances),
        open_holds=len(replay.holds.open),
        open_hold_amount=replay.holds.open_amount(),
        escrow_balance=replay.balances.get("escrow", 0),
        elapsed_s=time.perf_counter() - started,
        findings=tuple(findings.kept),
        finding_counts=dict(findings.counts),
        omitted=findings.omitted,
    )


def _verify_checkpoints(
    notes: Sequence[bytes],
    verifier: Verifier | Sequence[Verifier],
    origin: str,
    findings: _Findings,
) -> dict[int, list[bytes]]:
    """Tree size -> the distinct roots signed for it, from the notes that verify."""
    heads: dict[int, list[bytes]] = {}
    for index, note in enumerate(notes):
        try:
            head = parse_signed_checkpoint(note, verifier)
        except CheckpointError as exc:
            findings.add("checkpoint.signature", f"checkpoint #{index} rejected: {exc}")
            continue
        if head.origin != origin:
            findings.add("checkpoint.origin", f"checkpoint #{index} is for {head.origin!r}")
            continue
        roots = heads.setdefault(head.size, [])
        if head.root_hash not in roots:
            roots.append(head.root_hash)
            if len(roots) == 2:
                findings.add(
                    "checkpoint.equivocation",
                    f"two validly signed checkpoints of size {head.size} with different roots",
                )
    return heads


def _replay(
    source: AuditInput,
    stops: list[int],
    add: Callable[[str, str, int | None], None],
    progress: Callable[[int, int], None] | None,
) -> _Replay:
    # The hot loop: locals for everything it touches, accounts as indices into parallel lists.
    sha256, scan, allowed = hashlib.sha256, scan_entry, _ALLOWED
    tree = CompactRange()
    append = tree.append
    index_of: dict[bytes, int] = {}  # encoded account -> index into names, codes and money
    names: list[str] = []
    codes: list[int] = []
    money: list[int] = []
    negative: set[int] = set()  # accounts already reported below zero
    holds = _Holds(add, names)
    on_hold, on_close, on_other = holds.on_hold, holds.on_close, holds.on_other
    replay = _Replay(holds)
    stop_at = iter([*stops, -1])

    def stop(size: int) -> int:
        """Note what the audit needs at this size; returns the next size to stop at."""
        replay.roots[size] = tree.root()
        if size == source.balances_size:
            replay.snapshot = dict(zip(names, money, strict=True))
        return next(stop_at)

    next_stop, total = next(stop_at), source.claimed_size
    prev, expected_seq, size = ZERO_HASH, 0, 0
    for data in source.entries:
        if size == next_stop:  # the first `size` entries are in: the state at that size
            next_stop = stop(size)
        position = size
        size += 1
        leaf = sha256(b"\x00" + data).digest()
        append(leaf)
        if progress is not None and not size % PROGRESS_EVERY:
            progress(size, total)
        try:
            kind, seq, debit, credit, amount, hold_id, prev_hash = scan(data)
        except EntryFormatError as exc:
            add("entry.malformed", f"entry {position} does not decode: {exc}", position)
            prev, expected_seq = leaf, expected_seq + 1  # it still holds its place in the log
            continue
        if seq != expected_seq:
            what = "entry.seq_gap" if seq > expected_seq else "entry.seq_order"
            add(what, f"entry {position} has seq {seq}, expected {expected_seq}", position)
        # Resynchronise after a gap, but not back to an old seq: one finding per displaced entry.
        expected_seq = max(expected_seq, seq + 1)
        if prev_hash != prev:
            add("entry.prev_hash", f"entry {position} does not chain to the one before", position)
        prev = leaf
        d = index_of.get(debit)
        if d is None:
            d = _new_account(debit, index_of, names, codes, money, add, position)
        c = index_of.get(credit)
        if c is None:
            c = _new_account(credit, index_of, names, codes, money, add, position)
        d_code = codes[d]
        if (kind << 6 | d_code << 3 | codes[c]) not in allowed:
            code, message = _shape_problem(kind, d_code, codes[c])
            add(code, f"entry {position}: {message}", position)
        left = money[d] = money[d] - amount
        money[c] += amount
        if left < 0 and d_code != _ISSUANCE and d not in negative:
            negative.add(d)  # once per account: it may bounce around zero many times
            add("conservation.negative", f"entry {position} takes {names[d]} below 0", position)
        if kind == 2:
            on_hold(position, hold_id, amount, d)
        elif 3 <= kind <= 5:
            on_close(position, kind, hold_id, amount, c)
        elif hold_id or holds.group is not None:
            on_other(position, hold_id)
    if holds.group is not None:
        holds.end_group()
    if size == next_stop:
        stop(size)
    if progress is not None:
        progress(size, total)
    replay.count, replay.root = size, tree.root()
    replay.balances = dict(zip(names, money, strict=True))
    return replay


def _new_account(
    encoded: bytes,
    index_of: dict[bytes, int],
    names: list[str],
    codes: list[int],
    money: list[int],
    add: Callable[[str, str, int | None], None],
    position: int,
) -> int:
    code, owner = encoded[0], encoded[3:].decode("utf-8")  # scan_entry checked the UTF-8
    name = f"{_NAMES[code]}:{owner}" if owner else _NAMES[code]
    if (code in _SYSTEM) == bool(owner):
        why = "a system account with an owner" if owner else "an account without an owner"
        add("entry.accounts", f"entry {position} uses {why}: {name!r}", position)
    index_of[encoded] = len(names)
    names.append(name)
    codes.append(code)
    money.append(0)
    return len(names) - 1


def _check_heads(
    heads: dict[int, list[bytes]], replay: _Replay, add: Callable[[str, str], None]
) -> None:
    """Signed roots against replayed ones; one finding per run of checkpoints that disagree."""
    if heads and max(heads) > replay.count:
        add("log.truncated", f"{replay.count} entries, but a checkpoint signs {max(heads)}")
    run: list[int] = []  # consecutive checkpoint sizes whose roots the log does not match
    good = 0  # the largest size below the run whose checkpoint matches
    for size in sorted(heads):
        if size > replay.count:
            add("checkpoint.beyond_log", f"checkpoint of size {size} is beyond the log's end")
        elif replay.roots[size] not in heads[size]:
            run.append(size)
        else:
            if run:
                # Both heads verify, the later one matches the log: the earlier is no prefix.
                add(
                    "checkpoint.inconsistent",
                    f"signed checkpoints of sizes {run[0]}..{run[-1]} ({len(run)}) are not"
                    f" prefixes of the signed tree of size {size}: two histories were signed"
                    f" (they part within entries {good}..{run[0] - 1})",
                )
                run = []
            good = size
    if run:
        add(
            "checkpoint.root_mismatch",
            f"signed checkpoints of sizes {run[0]}..{run[-1]} ({len(run)}) do not match the"
            f" log (it departs from them within entries {good}..{run[0] - 1})",
        )


def _check_trusted(
    trusted: Checkpoint, origin: str, replay: _Replay, add: Callable[[str, str], None]
) -> None:
    if trusted.origin != origin:
        add("trusted.origin", f"the trusted checkpoint is for {trusted.origin!r}, not {origin!r}")
    elif trusted.size > replay.count:
        add("trusted.missing", f"the log lost entries {replay.count}..{trusted.size - 1}")
    elif replay.roots[trusted.size] != trusted.root_hash:
        add("trusted.inconsistent", f"the first {trusted.size} entries were rewritten")


def _check_balances(source: AuditInput, replay: _Replay, add: Callable[[str, str], None]) -> None:
    published = source.balances
    if sum(published.values()):
        add("conservation.sum", f"published balances sum to {sum(published.values())}, not 0")
    for name, amount in published.items():
        if amount < 0 and name != "issuance":
            add("conservation.negative", f"{name} is published with {amount}")
    escrow, held = replay.balances.get("escrow", 0), replay.holds.open_amount()
    if escrow != held:
        add("escrow.mismatch", f"escrow holds {escrow}, the open holds {held}")
    if source.balances_size is not None and source.balances_size > replay.count:
        add("balance.beyond_log", f"balances of size {source.balances_size}, log {replay.count}")
        return
    replayed = replay.balances if replay.snapshot is None else replay.snapshot
    for name in sorted(replayed.keys() | published.keys()):
        mine, theirs = replayed.get(name), published.get(name)
        if theirs is None:
            if mine:
                add("balance.unpublished", f"{name} should be {mine} but is not published")
        elif mine is None:
            if theirs:
                add("balance.extra", f"{name} is published with {theirs} but no entry moves it")
        elif mine != theirs:
            add("balance.mismatch", f"{name} is published as {theirs}; the entries give {mine}")
