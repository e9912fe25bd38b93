"""verify_credit: a genuine receipt passes; each single forgery is caught and named."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger.checkpoint import CheckpointSigner, parse_verifier_key
from ledger.entry import AccountCode, EncodedAccount, EntryKind, decode_entry
from miner.witness import WitnessError, verify_credit
from proto import miner_pb2
from tests.miner_witness.log_fixture import ORIGIN, MemoryLog

MINER = "ab" * 32
OTHER_MINER = "cd" * 32


def check(
    log: MemoryLog,
    receipt: miner_pb2.CreditReceipt,
    *,
    miner_id: str = MINER,
    origin: str = ORIGIN,
    vkey: str | None = None,
) -> None:
    verify_credit(
        entry=receipt.entry,
        index=receipt.index,
        tree_size=receipt.tree_size,
        inclusion_proof=list(receipt.inclusion_proof),
        checkpoint=receipt.checkpoint,
        verifier=parse_verifier_key(vkey or log.signer.verifier_key),
        origin=origin,
        miner_id=miner_id,
    )


@pytest.fixture
def log() -> MemoryLog:
    log = MemoryLog()
    log.filler(5)
    log.credit(MINER, 1234, job_id="job-1")
    log.filler(6)
    return log


def test_a_genuine_receipt_verifies_and_yields_the_entry(log: MemoryLog) -> None:
    receipt = log.receipt("job-1", 5)
    credit = verify_credit(
        entry=receipt.entry,
        index=5,
        tree_size=12,
        inclusion_proof=list(receipt.inclusion_proof),
        checkpoint=receipt.checkpoint,
        verifier=parse_verifier_key(log.signer.verifier_key),
        origin=ORIGIN,
        miner_id=MINER,
    )
    assert credit.entry.amount == 1234 and credit.entry.kind is EntryKind.SETTLE
    assert credit.checkpoint.size == 12


@pytest.mark.parametrize("index", [0, 5, 11])
def test_every_position_of_a_tree_verifies(index: int) -> None:
    log = MemoryLog()
    for i in range(12):
        log.credit(MINER, 10 + i, job_id=f"job-{i}")
    check(log, log.receipt(f"job-{index}", index))


def test_a_changed_amount_breaks_the_inclusion_proof(log: MemoryLog) -> None:
    receipt = log.receipt("job-1", 5)
    original = decode_entry(receipt.entry)
    # Amount is a u64 right after both accounts; find it by value and bump it by one.
    forged = receipt.entry.replace(
        original.amount.to_bytes(8, "big"), (original.amount + 1).to_bytes(8, "big")
    )
    assert decode_entry(forged).amount == 1235
    receipt.entry = forged
    with pytest.raises(WitnessError, match="not in the tree"):
        check(log, receipt)


def test_bytes_that_are_no_entry_are_rejected(log: MemoryLog) -> None:
    receipt = log.receipt("job-1", 5)
    receipt.entry = receipt.entry + b"\x00"
    with pytest.raises(WitnessError, match="does not decode"):
        check(log, receipt)


def test_a_tampered_proof_hash_is_rejected(log: MemoryLog) -> None:
    receipt = log.receipt("job-1", 5)
    proof = list(receipt.inclusion_proof)
    proof[1] = bytes([proof[1][0] ^ 1]) + proof[1][1:]
    del receipt.inclusion_proof[:]
    receipt.inclusion_proof.extend(proof)
    with pytest.raises(WitnessError, match="bad proof"):
        check(log, receipt)


def test_a_proof_for_another_index_is_rejected(log: MemoryLog) -> None:
    receipt = log.receipt("job-1", 5)
    receipt.inclusion_proof[:] = log.receipt("x", 4).inclusion_proof
    with pytest.raises(WitnessError, match="bad proof"):
        check(log, receipt)


def test_a_checkpoint_signed_by_another_key_is_rejected(log: MemoryLog) -> None:
    impostor = MemoryLog(CheckpointSigner(ORIGIN, Ed25519PrivateKey.generate()), log.leaves)
    receipt = impostor.receipt("job-1", 5)
    with pytest.raises(WitnessError, match="checkpoint does not verify"):
        check(log, receipt)  # verified with the genuine key


def test_a_checkpoint_with_an_altered_root_is_rejected(log: MemoryLog) -> None:
    receipt = log.receipt("job-1", 5)
    body, signature = receipt.checkpoint.split(b"\n\n", 1)
    lines = body.split(b"\n")
    lines[1] = b"13"  # claim a bigger tree under the same signature
    receipt.checkpoint = b"\n".join(lines) + b"\n\n" + signature
    with pytest.raises(WitnessError, match="checkpoint does not verify"):
        check(log, receipt)


def test_a_credit_to_another_miner_is_rejected(log: MemoryLog) -> None:
    with pytest.raises(WitnessError, match="not this miner"):
        check(log, log.receipt("job-1", 5), miner_id=OTHER_MINER)


def test_a_checkpoint_of_another_log_is_rejected(log: MemoryLog) -> None:
    with pytest.raises(WitnessError, match="origin"):
        check(log, log.receipt("job-1", 5), origin="someone.else/ledger")


def test_an_entry_that_is_not_a_settlement_is_rejected() -> None:
    log = MemoryLog()
    log.append(credit=EncodedAccount(AccountCode.MINER, MINER), amount=5, kind=EntryKind.MINT)
    log.filler(2)
    with pytest.raises(WitnessError, match="not a settle entry"):
        check(log, log.receipt("job-1", 0))


def test_an_index_that_differs_from_the_entry_is_rejected(log: MemoryLog) -> None:
    receipt = log.receipt("job-1", 5)
    receipt.index = 6
    with pytest.raises(WitnessError, match="number 5"):
        check(log, receipt)


def test_a_tree_size_that_differs_from_the_checkpoint_is_rejected(log: MemoryLog) -> None:
    receipt = log.receipt("job-1", 5)
    receipt.tree_size = 11
    with pytest.raises(WitnessError, match="size 12"):
        check(log, receipt)
