"""ledger.audit against synthetic logs written by a stand-in sequencer: a clean log passes, and
every kind of tampering is caught with its own finding code. Also: the fast entry scanner
rejects exactly what decode_entry rejects, the reports render, and (slow) the speed target."""

from __future__ import annotations

import hashlib
import io
import json
import random
import struct
import time
from collections.abc import Iterable, Sequence

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.audit import MAX_FINDINGS_PER_CODE, AuditInput, audit, scan_entry
from ledger.audit_report import AuditReport, ProgressBar, render_text, report_json
from ledger.checkpoint import Checkpoint, CheckpointSigner, parse_signed_checkpoint
from ledger.entry import (
    MAX_AMOUNT,
    ZERO_HASH,
    AccountCode,
    EncodedAccount,
    EntryFormatError,
    EntryKind,
    LedgerEntry,
    decode_entry,
    encode_entry,
)
from ledger.merkle import CompactRange, leaf_hash, root

ORIGIN = "audit.example/ledger"
SIGNER = CheckpointSigner(
    ORIGIN, Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"audit test key").digest())
)
K = EntryKind
ISSUANCE = EncodedAccount(AccountCode.ISSUANCE, "")
ESCROW = EncodedAccount(AccountCode.ESCROW, "")
FEE = EncodedAccount(AccountCode.FEE, "")


def buyer(name: str) -> EncodedAccount:
    return EncodedAccount(AccountCode.BUYER, name)


def miner(name: str) -> EncodedAccount:
    return EncodedAccount(AccountCode.MINER, name)


def key(account: EncodedAccount) -> str:
    kind = account.kind.name.lower()
    return f"{kind}:{account.owner}" if account.owner else kind


class Sequencer:
    """Plays the ledger's sequencer: chained entries, their balances, and a checkpoint signed
    every ``every`` entries. Its raw ``write`` lets a test commit whatever a rogue operator would.
    """

    def __init__(self, *, every: int = 16, signer: CheckpointSigner = SIGNER) -> None:
        self.every = every
        self.signer = signer
        self.entries: list[bytes] = []
        self.tree = CompactRange()
        self.balances: dict[str, int] = {}
        self.checkpoints: list[bytes] = []
        self.holds: dict[int, tuple[EncodedAccount, int]] = {}  # open: id -> (buyer, amount)
        self._next_hold = 1

    def write(
        self,
        kind: EntryKind,
        debit: EncodedAccount,
        credit: EncodedAccount,
        amount: int,
        hold_id: int = 0,
        *,
        memo: str = "",
    ) -> bytes:
        prev = leaf_hash(self.entries[-1]) if self.entries else ZERO_HASH
        entry = LedgerEntry(
            kind=kind,
            seq=len(self.entries),
            timestamp_us=1_700_000_000_000_000 + len(self.entries),
            debit=debit,
            credit=credit,
            amount=amount,
            hold_id=hold_id,
            reference=hashlib.sha256(b"ref %d" % len(self.entries)).digest(),
            prev_leaf_hash=prev,
            memo=memo,
        )
        data = encode_entry(entry)
        self._next_hold = max(self._next_hold, hold_id + 1)
        self.entries.append(data)
        self.tree.append(leaf_hash(data))
        self.balances[key(debit)] = self.balances.get(key(debit), 0) - amount
        self.balances[key(credit)] = self.balances.get(key(credit), 0) + amount
        if len(self.entries) % self.every == 0:
            self.checkpoint()
        return data

    def checkpoint(self) -> bytes:
        note = self.signer.sign(Checkpoint(ORIGIN, self.tree.size, self.tree.root()))
        self.checkpoints.append(note)
        return note

    def mint(self, account: EncodedAccount, amount: int) -> None:
        self.write(K.MINT, ISSUANCE, account, amount, memo="top-up")

    def hold(self, who: EncodedAccount, amount: int) -> int:
        hold_id, self._next_hold = self._next_hold, self._next_hold + 1
        self.write(K.HOLD, who, ESCROW, amount, hold_id)
        self.holds[hold_id] = (who, amount)
        return hold_id

    def settle(self, hold_id: int, to: EncodedAccount, *, credit: int, fee: int) -> None:
        who, amount = self.holds.pop(hold_id)
        legs = ((K.SETTLE, to, credit), (K.FEE, FEE, fee), (K.RELEASE, who, amount - credit - fee))
        for kind, account, leg in legs:
            if leg:
                self.write(kind, ESCROW, account, leg, hold_id)

    def release(self, hold_id: int) -> None:
        who, amount = self.holds.pop(hold_id)
        self.write(K.RELEASE, ESCROW, who, amount, hold_id)

    def traffic(self, requests: int, *, seed: int = 7) -> None:
        """A plausible day: top-ups, requests settled or released, some left in flight, a slash."""
        rng = random.Random(seed)
        buyers = [buyer(f"key{i}") for i in range(5)]
        miners = [miner(f"{i:02x}" * 32) for i in range(3)]
        for account in buyers:
            self.mint(account, 50_000_000)
        for n in range(requests):
            hold_id = self.hold(rng.choice(buyers), rng.randrange(1_000, 200_000))
            amount = self.holds[hold_id][1]
            if n % 7 == 3:
                self.release(hold_id)
            elif n % 11 != 5:  # the rest stay open, in flight
                charge = rng.randrange(0, amount + 1)
                fee = charge // 10
                self.settle(hold_id, rng.choice(miners), credit=charge - fee, fee=fee)
        self.write(K.SLASH, miners[0], ISSUANCE, 1)

    def source(
        self,
        *,
        entries: Sequence[bytes] | None = None,
        checkpoints: Sequence[bytes] | None = None,
        balances: dict[str, int] | None = None,
        balances_size: int | None = None,
    ) -> AuditInput:
        entries = self.entries if entries is None else entries
        return AuditInput(
            entries=iter(entries),
            checkpoints=self.checkpoints if checkpoints is None else checkpoints,
            balances=self.balances if balances is None else balances,
            balances_size=len(self.entries) if balances_size is None else balances_size,
            claimed_size=len(entries),
        )


def busy_log(requests: int = 40, *, every: int = 16) -> Sequencer:
    log = Sequencer(every=every)
    log.traffic(requests)
    log.checkpoint()  # so that a change anywhere, even in the last entry, is under a signature
    return log


def run(source: AuditInput, trusted: Checkpoint | None = None) -> AuditReport:
    return audit(source, verifier=SIGNER.verifier, origin=ORIGIN, trusted=trusted)


def codes(report: AuditReport) -> set[str]:
    return set(report.finding_counts)


def test_clean_log_passes_and_reports_its_state() -> None:
    log = busy_log()
    seen: list[tuple[int, int]] = []

    report = audit(
        log.source(),
        verifier=SIGNER.verifier,
        origin=ORIGIN,
        progress=lambda done, total: seen.append((done, total)),
    )

    assert report.ok and report.findings == () and report.omitted == 0
    assert report.entries == report.tree_size == len(log.entries)
    assert report.root == root([leaf_hash(e) for e in log.entries])
    assert report.latest_checkpoint == Checkpoint(ORIGIN, len(log.entries), report.root)
    assert report.checkpoints_verified == len(log.checkpoints)
    assert report.open_holds == len(log.holds) > 0
    assert report.open_hold_amount == sum(amount for _, amount in log.holds.values())
    assert report.escrow_balance == report.open_hold_amount == log.balances["escrow"]
    assert report.accounts == len(log.balances)
    assert seen[-1] == (len(log.entries), len(log.entries))


def test_empty_log_with_no_checkpoints_is_clean() -> None:
    report = run(AuditInput([], [], {}, 0, 0))
    assert report.ok and report.entries == 0 and report.latest_checkpoint is None


def flip(data: bytes, at: int, mask: int = 0x01) -> bytes:
    return data[:at] + bytes([data[at] ^ mask]) + data[at + 1 :]


def test_a_flipped_byte_in_an_amount_breaks_the_chain_the_root_and_the_balances() -> None:
    log = busy_log()
    entries = list(log.entries)
    target = 30
    memo = decode_entry(entries[target]).memo.encode()
    amount_at = len(entries[target]) - len(memo) - 2 - 64 - 16 + 7  # the amount's low byte
    entries[target] = flip(entries[target], amount_at)
    decode_entry(entries[target])  # still a well-formed entry: only the hashes give it away

    report = run(log.source(entries=entries))

    assert {"entry.prev_hash", "checkpoint.root_mismatch", "balance.mismatch"} <= codes(report)
    [chain] = [f for f in report.findings if f.code == "entry.prev_hash"]
    assert chain.seq == target + 1


def test_a_flipped_version_byte_is_a_malformed_entry() -> None:
    log = busy_log()
    entries = list(log.entries)
    entries[3] = flip(entries[3], 0)
    report = run(log.source(entries=entries))
    assert {"entry.malformed", "entry.prev_hash", "checkpoint.root_mismatch"} <= codes(report)
    assert [f.seq for f in report.findings if f.code == "entry.malformed"] == [3]
    assert "entry.seq_gap" not in codes(report)  # a malformed entry still holds its place


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_single_byte_change_anywhere_is_caught(data: st.DataObject) -> None:
    log = busy_log(12, every=8)
    entries = list(log.entries)
    index = data.draw(st.integers(0, len(entries) - 1))
    at = data.draw(st.integers(0, len(entries[index]) - 1))
    entries[index] = flip(entries[index], at, data.draw(st.integers(1, 255)))
    report = run(log.source(entries=entries))
    assert not report.ok
    assert "checkpoint.root_mismatch" in codes(report)


def test_a_deleted_entry() -> None:
    log = busy_log()
    hold_at = next(  # a request that was settled right away
        i
        for i in range(20, 40)
        if decode_entry(log.entries[i]).kind == K.HOLD
        and decode_entry(log.entries[i + 1]).kind == K.SETTLE
    )
    entries = log.entries[:hold_at] + log.entries[hold_at + 1 :]
    report = run(log.source(entries=entries, balances_size=len(entries)))
    assert {"entry.seq_gap", "entry.prev_hash", "checkpoint.root_mismatch"} <= codes(report)
    assert report.finding_counts["entry.seq_gap"] == 1  # the rest resynchronise
    # Its settlement now closes a hold never opened: one finding for the group, not per leg.
    assert report.finding_counts["hold.unknown"] == 1
    assert report.finding_counts.get("conservation.negative", 0) <= 1  # once per account


def test_two_swapped_entries() -> None:
    log = busy_log()
    entries = list(log.entries)
    entries[10], entries[11] = entries[11], entries[10]
    report = run(log.source(entries=entries))
    found = codes(report)
    assert {"entry.seq_gap", "entry.seq_order", "entry.prev_hash"} <= found
    assert "checkpoint.root_mismatch" in found or "checkpoint.inconsistent" in found
    assert report.finding_counts["entry.seq_gap"] == report.finding_counts["entry.seq_order"] == 1


def test_a_tail_truncated_below_the_latest_checkpoint() -> None:
    log = busy_log()
    kept = len(log.entries) - 5
    report = run(log.source(entries=log.entries[:kept]))
    assert {"log.truncated", "checkpoint.beyond_log", "balance.beyond_log"} <= codes(report)
    # What remains is still consistent with every checkpoint it reaches.
    assert "checkpoint.root_mismatch" not in codes(report)


def test_wrong_published_balances() -> None:
    log = busy_log()
    wrong = dict(log.balances)
    wrong["buyer:key1"] += 5
    wrong["buyer:key2"] -= 5  # still sums to zero: only the recomputation catches it
    report = run(log.source(balances=wrong))
    assert codes(report) == {"balance.mismatch"}
    assert report.finding_counts["balance.mismatch"] == 2

    inflated = dict(log.balances, **{"buyer:key1": log.balances["buyer:key1"] + 5})
    assert codes(run(log.source(balances=inflated))) == {"balance.mismatch", "conservation.sum"}

    missing = {k: v for k, v in log.balances.items() if k != "buyer:key3"}
    missing["buyer:key4"] += log.balances["buyer:key3"]
    assert "balance.unpublished" in codes(run(log.source(balances=missing)))

    extra = dict(log.balances, **{"buyer:ghost": 7, "issuance": log.balances["issuance"] - 7})
    assert codes(run(log.source(balances=extra))) == {"balance.extra", "balance.mismatch"}


def test_balances_are_compared_at_the_size_they_were_published_for() -> None:
    log = busy_log()
    size = 25
    at_size = Sequencer(every=10**9)
    for data in log.entries[:size]:
        entry = decode_entry(data)
        at_size.write(entry.kind, entry.debit, entry.credit, entry.amount, entry.hold_id)
    assert run(log.source(balances=at_size.balances, balances_size=size)).ok
    assert "balance.mismatch" in codes(run(log.source(balances=log.balances, balances_size=size)))


def test_history_rewritten_and_re_signed_is_caught_only_by_a_trusted_checkpoint() -> None:
    honest = busy_log(every=8)
    trusted = parse_signed_checkpoint(honest.checkpoints[5], SIGNER.verifier)  # size 48
    # The operator rewrites history from about entry 30 (where a request starts, not inside a
    # settlement): mints to bob instead, re-chains, and re-signs every checkpoint.
    cut = next(i for i in range(30, 48) if decode_entry(honest.entries[i]).kind == K.HOLD)
    forged = Sequencer(every=8)
    for data in honest.entries[:cut]:
        entry = decode_entry(data)
        forged.write(entry.kind, entry.debit, entry.credit, entry.amount, entry.hold_id)
    forged.mint(buyer("bob"), 1_000_000_000)
    forged.traffic(20, seed=99)
    forged.checkpoint()

    assert run(forged.source()).ok  # self-consistent: nothing inside the log can tell
    report = run(forged.source(), trusted=trusted)
    # The forged log contradicts the checkpoint we hold, and no longer publishes it.
    assert codes(report) == {"trusted.inconsistent", "trusted.withdrawn"}
    assert run(honest.source(), trusted=trusted).ok

    shortened = forged.source(entries=forged.entries[:40], checkpoints=[], balances_size=40)
    assert "trusted.missing" in codes(run(shortened, trusted=trusted))


def test_a_missing_checkpoint_is_fine_an_altered_one_is_not() -> None:
    log = busy_log()
    assert run(log.source(checkpoints=log.checkpoints[:2] + log.checkpoints[3:])).ok
    # ... unless the auditor kept that checkpoint: deleting a signed checkpoint is evidence lost.
    kept = parse_signed_checkpoint(log.checkpoints[2], SIGNER.verifier)
    withdrawn = log.source(checkpoints=log.checkpoints[:2] + log.checkpoints[3:])
    assert codes(run(withdrawn, trusted=kept)) == {"trusted.withdrawn"}
    notes = list(log.checkpoints)
    body, signature = notes[2].split(b"\n\n")
    lines = body.split(b"\n")
    lines[1] = str(int(lines[1]) + 1).encode()  # the size, re-signing impossible without the key
    notes[2] = b"\n".join(lines) + b"\n\n" + signature
    report = run(log.source(checkpoints=notes))
    assert codes(report) == {"checkpoint.signature"}


def test_a_checkpoint_signed_by_another_key_or_for_another_log() -> None:
    log = busy_log()
    stranger = CheckpointSigner(ORIGIN, Ed25519PrivateKey.generate())
    mine = log.tree.root()
    notes = [
        stranger.sign(Checkpoint(ORIGIN, len(log.entries), mine)),
        SIGNER.sign(Checkpoint("other.example/log", len(log.entries), mine)),
    ]
    report = run(log.source(checkpoints=notes))
    assert codes(report) == {"checkpoint.signature", "checkpoint.origin"}


def test_equivocation_two_signed_roots_for_one_size() -> None:
    log = busy_log()
    forked = SIGNER.sign(Checkpoint(ORIGIN, 32, hashlib.sha256(b"another history").digest()))
    report = run(log.source(checkpoints=[*log.checkpoints, forked]))
    assert codes(report) == {"checkpoint.equivocation"}


def test_signed_heads_that_cannot_be_prefixes_of_one_log() -> None:
    log = busy_log()
    notes = list(log.checkpoints)
    fork = Checkpoint(ORIGIN, 32, hashlib.sha256(b"fork").digest())
    notes[1] = SIGNER.sign(fork)  # size 32 signed over a history later heads contradict
    assert codes(run(log.source(checkpoints=notes))) == {"checkpoint.inconsistent"}
    notes = [*log.checkpoints[:-1], SIGNER.sign(Checkpoint(ORIGIN, len(log.entries), bytes(32)))]
    assert codes(run(log.source(checkpoints=notes))) == {"checkpoint.root_mismatch"}


def rogue(write: Iterable[tuple[EntryKind, EncodedAccount, EncodedAccount, int, int]]) -> set[str]:
    """The findings for a clean log followed by the given raw entries, all signed and chained."""
    log = busy_log(10)
    for kind, debit, credit, amount, hold_id in write:
        log.write(kind, debit, credit, amount, hold_id)
    log.checkpoint()
    return codes(run(log.source()))


def test_a_mint_from_a_non_issuance_account() -> None:
    assert rogue([(K.MINT, buyer("key1"), buyer("key2"), 5, 0)]) == {"mint.source"}


def test_issuance_moved_by_a_non_mint_entry() -> None:
    assert rogue([(K.REFUND, ISSUANCE, buyer("key1"), 5, 0)]) == {"issuance.illegal_move"}
    # SLASH is the one way back into issuance: only the unfunded miner going negative is wrong.
    assert rogue([(K.SLASH, miner("m"), ISSUANCE, 5, 0)]) == {"conservation.negative"}


def test_spot_check_entries_between_their_own_accounts_are_clean() -> None:
    # busy_log(10) leaves miner 00.. and the fee account funded and buyer key1 open.
    funded = miner("00" * 32)
    assert rogue([(K.SLASH, funded, ISSUANCE, 1, 0)]) == set()
    assert rogue([(K.REFUND, funded, buyer("key1"), 1, 0)]) == set()
    assert rogue([(K.REFUND, FEE, buyer("key1"), 1, 0)]) == set()
    assert rogue([(K.REWARD, FEE, miner("scorer"), 1, 0)]) == set()


@pytest.mark.parametrize(
    ("debit", "credit", "found"),
    [
        (ESCROW, miner("m"), {"entry.accounts", "escrow.mismatch"}),
        (miner("00" * 32), miner("m"), {"entry.accounts"}),
        (FEE, buyer("key1"), {"entry.accounts"}),
        (ISSUANCE, miner("m"), {"issuance.illegal_move"}),
        (FEE, ISSUANCE, {"issuance.illegal_move"}),
    ],
)
def test_a_reward_between_the_wrong_accounts(
    debit: EncodedAccount, credit: EncodedAccount, found: set[str]
) -> None:
    assert rogue([(K.REWARD, debit, credit, 1, 0)]) == found


def test_spot_check_entries_with_the_wrong_accounts_or_a_hold_id() -> None:
    funded = miner("00" * 32)
    assert rogue([(K.SLASH, funded, FEE, 1, 0)]) == {"entry.accounts"}
    assert rogue([(K.SLASH, buyer("key1"), ISSUANCE, 1, 0)]) == {"entry.accounts"}
    assert rogue([(K.REFUND, funded, miner("m"), 1, 0)]) == {"entry.accounts"}
    assert rogue([(K.REFUND, buyer("key1"), buyer("key2"), 1, 0)]) == {"entry.accounts"}
    for kind, debit, credit in (
        (K.SLASH, funded, ISSUANCE),
        (K.REFUND, FEE, buyer("key1")),
        (K.REWARD, FEE, miner("scorer")),
    ):
        assert rogue([(kind, debit, credit, 1, 3)]) == {"entry.hold_id"}


def test_a_hold_closed_twice() -> None:
    found = rogue(
        [
            (K.HOLD, buyer("key1"), ESCROW, 100, 500),
            (K.SETTLE, ESCROW, miner("m"), 60, 500),
            (K.RELEASE, ESCROW, buyer("key1"), 40, 500),
            (K.RELEASE, ESCROW, buyer("key1"), 40, 500),
        ]
    )
    assert "hold.double_close" in found and "escrow.mismatch" in found
    assert not found & {"hold.amounts", "hold.overspent", "hold.unknown"}


def test_an_over_settled_hold() -> None:
    found = rogue(
        [
            (K.HOLD, buyer("key1"), ESCROW, 100, 500),
            (K.SETTLE, ESCROW, miner("m"), 80, 500),
            (K.FEE, ESCROW, FEE, 30, 500),
        ]
    )
    assert "hold.overspent" in found and "escrow.mismatch" in found
    assert "hold.amounts" not in found


def test_hold_groups_that_do_not_add_up_or_go_astray() -> None:
    hold = (K.HOLD, buyer("key1"), ESCROW, 100, 500)
    short = rogue([hold, (K.SETTLE, ESCROW, miner("m"), 50, 500)])
    assert short == {"hold.amounts", "escrow.mismatch"}
    stray = [hold, (K.RELEASE, ESCROW, buyer("key2"), 100, 500)]
    assert rogue(stray) == {"hold.wrong_buyer"}
    assert rogue([(K.RELEASE, ESCROW, buyer("key1"), 1, 999)]) == {
        "hold.unknown",
        "escrow.mismatch",
    }
    assert rogue([hold, (K.HOLD, buyer("key1"), ESCROW, 5, 500)]) == {
        "hold.duplicate",
        "escrow.mismatch",
    }
    assert "hold.no_id" in rogue([(K.HOLD, buyer("key1"), ESCROW, 5, 0)])
    assert rogue([(K.MINT, ISSUANCE, buyer("key1"), 5, 77)]) == {"entry.hold_id"}
    # SETTLE, FEE, RELEASE out of order: the FEE starts a second closing of a closed hold.
    disorder = [hold, (K.RELEASE, ESCROW, buyer("key1"), 90, 500), (K.FEE, ESCROW, FEE, 10, 500)]
    assert "hold.double_close" in rogue(disorder)


def test_accounts_that_no_entry_of_that_kind_may_touch() -> None:
    assert rogue([(K.MINT, ISSUANCE, ESCROW, 5, 0)]) == {"entry.accounts", "escrow.mismatch"}
    assert rogue([(K.HOLD, buyer("key1"), FEE, 5, 900)]) == {"entry.accounts", "escrow.mismatch"}
    named_system = EncodedAccount(AccountCode.ISSUANCE, "shadow")
    assert "entry.accounts" in rogue([(K.MINT, named_system, buyer("key1"), 5, 0)])
    assert rogue([(K.HOLD, buyer("key1"), ESCROW, 60_000_000, 901)]) == {"conservation.negative"}


def test_findings_are_capped_but_all_counted() -> None:
    log = busy_log(3)
    extra = MAX_FINDINGS_PER_CODE + 50
    entries = [*log.entries, *([b"\x02junk"] * extra)]
    report = run(log.source(entries=entries, balances_size=len(log.entries)))
    assert report.finding_counts["entry.malformed"] == extra
    assert sum(f.code == "entry.malformed" for f in report.findings) == MAX_FINDINGS_PER_CODE
    assert report.omitted == 50
    assert "50 more" in render_text(
        report, source="x", origin=ORIGIN, verifier_key=SIGNER.verifier_key, key_pinned=True
    )


def test_reports_as_json_and_text() -> None:
    log = busy_log()
    entries = list(log.entries)
    entries[5] = flip(entries[5], len(entries[5]) - 40)
    bad = run(log.source(entries=entries))
    document = report_json(
        bad, source="dump.bin", origin=ORIGIN, verifier_key=SIGNER.verifier_key, key_pinned=False
    )
    document = json.loads(json.dumps(document))
    assert document["ok"] is False and document["verifier_key_pinned"] is False
    assert document["tree"]["size"] == len(entries) and document["entries"] == len(entries)
    assert document["latest_checkpoint"]["size"] == len(entries)
    assert {f["code"] for f in document["findings"]} == set(document["finding_counts"])
    assert all(set(f) == {"code", "message", "seq"} for f in document["findings"])
    assert document["holds"]["escrow_balance"] == log.balances["escrow"]
    assert any("pin it" in note for note in document["notes"])
    text = render_text(
        bad, source="dump.bin", origin=ORIGIN, verifier_key=SIGNER.verifier_key, key_pinned=False
    )
    assert "FAILED" in text and "entry.prev_hash [entry 6]" in text and "not pinned" in text
    good = render_text(
        run(log.source()),
        source="dump.bin",
        origin=ORIGIN,
        verifier_key=SIGNER.verifier_key,
        key_pinned=True,
    )
    assert "OK: no findings" in good and "pin it" not in good


def test_progress_bar_draws_and_finishes_its_line() -> None:
    out = io.StringIO()
    bar = ProgressBar(out, interval_s=0)
    bar(520_000, 1_000_000)
    bar(1_000_000, 1_000_000)
    bar.close()
    drawn = out.getvalue()
    assert "\r[" + "#" * 16 + " " * 14 + "]  52%  520.0k entries" in drawn
    assert drawn.endswith("] 100%  1.0M entries\n")


# --- the fast scanner rejects exactly what decode_entry rejects -----------------------------

owners = st.text(max_size=6) | st.sampled_from(["", "é", "x" * 128, "x" * 129, "\U0001f600"])
accounts = st.builds(EncodedAccount, st.sampled_from(list(AccountCode)), owners)
entries = st.builds(
    LedgerEntry,
    kind=st.sampled_from(list(EntryKind)),
    seq=st.integers(0, 2**64 - 1),
    timestamp_us=st.integers(0, 2**64 - 1),
    debit=accounts,
    credit=accounts,
    amount=st.sampled_from([1, 2, MAX_AMOUNT]) | st.integers(1, MAX_AMOUNT),
    hold_id=st.integers(0, 2**64 - 1),
    reference=st.binary(min_size=32, max_size=32),
    prev_leaf_hash=st.binary(min_size=32, max_size=32),
    memo=st.text(max_size=8) | st.just("m" * 1024),
)


def raw(entry: LedgerEntry) -> bytes:
    """encode_entry without its checks, so invalid field values can be produced too."""

    def account(a: EncodedAccount) -> bytes:
        owner = a.owner.encode()
        return struct.pack(">BH", a.kind, len(owner)) + owner

    memo = entry.memo.encode()
    return b"".join(
        (
            struct.pack(">BBQQ", 1, entry.kind, entry.seq, entry.timestamp_us),
            account(entry.debit),
            account(entry.credit),
            struct.pack(">QQ", entry.amount, entry.hold_id),
            entry.reference,
            entry.prev_leaf_hash,
            struct.pack(">H", len(memo)),
            memo,
        )
    )


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(raw(draw(entries)))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["set", "cut", "insert", "delete", "amount"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "set" and data:
            data[at] = draw(st.sampled_from([0, 1, 2, 5, 6, 7, 8, 0x7F, 0x80, 0xC0, 0xED, 0xFF]))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=3))
        elif op == "delete" and data:
            del data[at]
        elif op == "amount" and len(data) > 40:
            value = draw(st.sampled_from([0, MAX_AMOUNT + 1, 2**64 - 1]))
            data[-16:-8] = value.to_bytes(8, "big")  # lands somewhere in the tail: fine
    return bytes(data)


def same_verdict(data: bytes) -> None:
    try:
        entry = decode_entry(data)
    except EntryFormatError:
        with pytest.raises(EntryFormatError):
            scan_entry(data)
        return
    kind, seq, debit, credit, amount, hold_id, prev = scan_entry(data)
    assert (kind, seq, amount, hold_id, prev) == (
        entry.kind,
        entry.seq,
        entry.amount,
        entry.hold_id,
        entry.prev_leaf_hash,
    )
    assert (debit[0], debit[3:].decode()) == (entry.debit.kind, entry.debit.owner)
    assert (credit[0], credit[3:].decode()) == (entry.credit.kind, entry.credit.owner)


@settings(max_examples=400, deadline=None)
@given(entries)
def test_scan_agrees_with_decode_on_generated_entries(entry: LedgerEntry) -> None:
    same_verdict(raw(entry))


@settings(max_examples=600, deadline=None)
@given(mutated() | st.binary(max_size=200))
def test_scan_agrees_with_decode_on_mutated_bytes(data: bytes) -> None:
    same_verdict(data)


# --- speed ------------------------------------------------------------------------------------


def synthetic_log(
    count: int, *, every: int = 10_000
) -> tuple[list[bytes], list[bytes], dict[str, int]]:
    """``count`` entries of mints, holds and settlements, built fast with struct."""
    head, tail = struct.Struct(">BBQQ"), struct.Struct(">QQ")
    buyers = [struct.pack(">BH", 4, 6) + b"buyer%d" % i for i in range(10)]
    miners = [struct.pack(">BH", 5, 6) + b"miner%d" % i for i in range(10)]
    issuance, escrow, fee = (struct.pack(">BH", code, 0) for code in (1, 2, 3))
    names = {
        issuance: "issuance",
        escrow: "escrow",
        fee: "fee",
        **{a: f"buyer:buyer{i}" for i, a in enumerate(buyers)},
        **{a: f"miner:miner{i}" for i, a in enumerate(miners)},
    }
    out: list[bytes] = []
    checkpoints: list[bytes] = []
    balances = dict.fromkeys(names.values(), 0)
    tree = CompactRange()
    prev = ZERO_HASH
    ref = bytes(range(32))
    hold_id = 0

    def put(kind: int, debit: bytes, credit: bytes, amount: int, hold: int) -> None:
        nonlocal prev
        data = b"".join(
            (
                head.pack(1, kind, len(out), 1_700_000_000_000_000 + len(out)),
                debit,
                credit,
                tail.pack(amount, hold),
                ref,
                prev,
                b"\x00\x00",
            )
        )
        out.append(data)
        prev = leaf_hash(data)
        tree.append(prev)
        balances[names[debit]] -= amount
        balances[names[credit]] += amount
        if len(out) % every == 0:
            checkpoints.append(SIGNER.sign(Checkpoint(ORIGIN, tree.size, tree.root())))

    for b in buyers:
        put(1, issuance, b, 10**15, 0)
    while len(out) + 4 <= count:  # whole requests: a hold and its settlement
        hold_id += 1
        b, m = buyers[hold_id % 10], miners[hold_id % 7]
        put(2, b, escrow, 1000, hold_id)
        put(3, escrow, m, 600, hold_id)
        put(4, escrow, fee, 100, hold_id)
        put(5, escrow, b, 300, hold_id)
    while len(out) < count:
        put(1, issuance, buyers[0], 1, 0)
    checkpoints.append(SIGNER.sign(Checkpoint(ORIGIN, tree.size, tree.root())))
    return out, checkpoints, balances


@pytest.mark.slow
def test_audits_at_least_100k_entries_per_second() -> None:
    count = 1_000_000
    entries, checkpoints, balances = synthetic_log(count)
    source = AuditInput(iter(entries), checkpoints, balances, count, count)
    started = time.perf_counter()
    report = run(source)
    rate = count / (time.perf_counter() - started)
    print(f"audited {count:,} entries at {rate:,.0f} entries/s")
    assert report.ok, report.findings[:5]
    assert rate >= 100_000
