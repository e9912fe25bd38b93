"""The live witness: receipts stored, checkpoints advanced only by verified consistency proofs,
and every failure raised as an alarm (CRITICAL log, WitnessAlarm, alarms.jsonl)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger.checkpoint import CheckpointSigner
from ledger.entry import AccountCode, EncodedAccount
from miner.engine.base import ModelInfo
from miner.identity import Identity
from miner.jobs import signed_result
from miner.witness import Witness, WitnessLink
from miner.witness_store import WitnessStore
from proto import miner_pb2
from tests.miner_witness.log_fixture import ORIGIN, MemoryLog

WAIT_S = 5.0
Responder = Callable[[miner_pb2.ConsistencyRequest], miner_pb2.ConsistencyProof | None]


@dataclass
class Rig:
    """A witness attached to a fake connection whose coordinator side is ``log``."""

    directory: Path
    miner_id: str
    log: MemoryLog
    sent: list[miner_pb2.MinerMessage] = field(default_factory=list)
    respond: Responder | None = None  # None answers every request honestly from ``log``
    link: WitnessLink | None = None
    witness: Witness | None = None

    def send(self, message: miner_pb2.MinerMessage) -> None:
        self.sent.append(message)
        if message.WhichOneof("body") != "consistency_request":
            return
        request = message.consistency_request
        respond = self.respond or (lambda r: self.log.consistency(r.old_size, r.new_size))
        proof = respond(request)
        if proof is not None and self.link is not None:
            reply = miner_pb2.CoordinatorMessage(consistency_proof=proof)
            asyncio.get_running_loop().call_soon(self.link.handle, reply)

    async def connect(self, *, proof_timeout_s: float = 2.0) -> WitnessLink:
        store = WitnessStore.open(self.directory)
        self.witness = Witness(store, miner_id=self.miner_id, proof_timeout_s=proof_timeout_s)
        link = self.witness.attach(self.log.welcome(), self.send)
        assert link is not None
        self.link = link
        return link

    async def deliver(self, receipt: miner_pb2.CreditReceipt) -> None:
        assert self.link is not None
        self.link.handle(miner_pb2.CoordinatorMessage(credit_receipt=receipt))
        await self.settle()

    async def settle(self) -> None:
        """Waits until the witness has checked everything delivered so far."""
        assert self.link is not None
        await asyncio.wait_for(self.link.drained(), WAIT_S)

    def kinds(self) -> list[str]:
        return [str(message.WhichOneof("body")) for message in self.sent]

    def alarms(self) -> list[miner_pb2.WitnessAlarm]:
        return [m.witness_alarm for m in self.sent if m.WhichOneof("body") == "witness_alarm"]

    def stored(self) -> list[dict[str, Any]]:
        path = self.directory / "receipts.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def pinned_size(self) -> int | None:
        pinned = WitnessStore.open(self.directory).pinned
        return None if pinned is None else pinned.checkpoint.size


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    identity = Identity.generate()
    log = MemoryLog()
    log.filler(3)
    rig = Rig(tmp_path / "identity.ledger", identity.miner_id, log)
    try:
        yield rig
    finally:
        if rig.link is not None:
            await rig.link.aclose()


def earn(rig: Rig, job_id: str, amount: int, *, filler: int = 2) -> int:
    index = rig.log.credit(rig.miner_id, amount, job_id=job_id)
    rig.log.filler(filler)
    return index


async def test_a_good_receipt_is_stored_and_pins_the_first_checkpoint(rig: Rig) -> None:
    await rig.connect()
    index = earn(rig, "job-1", 900)
    await rig.deliver(rig.log.receipt("job-1", index))
    [stored] = rig.stored()
    assert stored["job_id"] == "job-1" and stored["amount"] == 900 and stored["index"] == index
    assert rig.pinned_size() == len(rig.log.leaves)
    assert (rig.directory / "checkpoint.txt").read_bytes() == rig.log.note()
    assert (rig.directory / "verifier-key.txt").read_text().strip() == rig.log.signer.verifier_key
    assert rig.alarms() == [] and "consistency_request" not in rig.kinds()


async def test_a_newer_checkpoint_replaces_the_stored_one_after_a_good_proof(rig: Rig) -> None:
    await rig.connect()
    first = earn(rig, "job-1", 100)
    await rig.deliver(rig.log.receipt("job-1", first))
    old_size = len(rig.log.leaves)
    second = earn(rig, "job-2", 200, filler=9)
    await rig.deliver(rig.log.receipt("job-2", second))
    [request] = [m.consistency_request for m in rig.sent if m.HasField("consistency_request")]
    assert (request.old_size, request.new_size) == (old_size, len(rig.log.leaves))
    assert rig.pinned_size() == len(rig.log.leaves)
    assert [r["amount"] for r in rig.stored()] == [100, 200]
    assert rig.alarms() == []


async def test_an_older_checkpoint_is_proven_a_prefix_and_keeps_the_newer_one(rig: Rig) -> None:
    await rig.connect()
    first = earn(rig, "job-1", 100)
    early = rig.log.receipt("job-1", first)
    second = earn(rig, "job-2", 200)
    await rig.deliver(rig.log.receipt("job-2", second))
    await rig.deliver(early)  # arrives late, under a smaller tree
    assert rig.pinned_size() == len(rig.log.leaves)
    assert sorted(r["amount"] for r in rig.stored()) == [100, 200]
    assert rig.alarms() == [] and rig.kinds().count("consistency_request") == 1


async def test_a_forked_log_raises_an_alarm_and_keeps_the_old_checkpoint(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    await rig.connect()
    first = earn(rig, "job-1", 100)
    await rig.deliver(rig.log.receipt("job-1", first))
    pinned = len(rig.log.leaves)
    # The operator rewrites history: drops job-1's credit, then keeps signing with the same key.
    fork = rig.log.fork(first)
    fork.filler(4)
    second = fork.credit(rig.miner_id, 300, job_id="job-2")
    fork.filler(3)
    rig.log = fork  # the coordinator now proves from the forked tree
    with caplog.at_level(logging.CRITICAL, logger="miner.witness"):
        await rig.deliver(fork.receipt("job-2", second))
    [alarm] = rig.alarms()
    assert "does not extend" in alarm.message
    assert alarm.new_checkpoint == fork.note() and alarm.old_checkpoint.startswith(ORIGIN.encode())
    assert any("ledger fork or tampering" in r.getMessage() for r in caplog.records)
    assert rig.pinned_size() == pinned
    assert json.loads((rig.directory / "alarms.jsonl").read_text())["message"] == alarm.message


async def test_two_checkpoints_of_one_size_with_different_roots_raise_an_alarm(rig: Rig) -> None:
    await rig.connect()
    first = earn(rig, "job-1", 100)
    await rig.deliver(rig.log.receipt("job-1", first))
    fork = rig.log.fork(first)
    second = fork.credit(rig.miner_id, 150, job_id="job-2")
    fork.filler(len(rig.log.leaves) - len(fork.leaves))
    await rig.deliver(fork.receipt("job-2", second))
    [alarm] = rig.alarms()
    assert "different roots" in alarm.message
    assert "consistency_request" not in rig.kinds()


async def test_a_wrong_proof_and_a_refused_proof_both_raise_alarms(rig: Rig) -> None:
    await rig.connect()
    await rig.deliver(rig.log.receipt("job-1", earn(rig, "job-1", 100)))
    honest = rig.log.consistency

    def garbled(request: miner_pb2.ConsistencyRequest) -> miner_pb2.ConsistencyProof:
        proof = honest(request.old_size, request.new_size)
        proof.hashes[0] = bytes(32)
        return proof

    rig.respond = garbled
    await rig.deliver(rig.log.receipt("job-2", earn(rig, "job-2", 200)))
    rig.respond = lambda r: miner_pb2.ConsistencyProof(
        old_size=r.old_size, new_size=r.new_size, error="size beyond the log"
    )
    await rig.deliver(rig.log.receipt("job-3", earn(rig, "job-3", 300)))
    messages = [alarm.message for alarm in rig.alarms()]
    assert len(messages) == 2
    assert "does not extend" in messages[0] and "cannot prove" in messages[1]
    assert len(rig.stored()) == 3  # each receipt is valid on its own


async def test_no_answer_is_a_warning_and_the_next_receipt_asks_again(rig: Rig) -> None:
    await rig.connect(proof_timeout_s=0.1)
    await rig.deliver(rig.log.receipt("job-1", earn(rig, "job-1", 100)))
    pinned = rig.pinned_size()
    rig.respond = lambda request: None
    await rig.deliver(rig.log.receipt("job-2", earn(rig, "job-2", 200)))
    assert rig.pinned_size() == pinned and rig.alarms() == []
    rig.respond = None
    await rig.deliver(rig.log.receipt("job-3", earn(rig, "job-3", 300)))
    requests = [m.consistency_request for m in rig.sent if m.HasField("consistency_request")]
    assert [r.old_size for r in requests] == [pinned, pinned]
    assert rig.pinned_size() == len(rig.log.leaves) and rig.alarms() == []


@pytest.mark.parametrize("forgery", ["entry", "proof", "signature", "miner", "origin"])
async def test_a_forged_receipt_is_not_stored_and_raises_an_alarm(rig: Rig, forgery: str) -> None:
    await rig.connect()
    index = earn(rig, "job-1", 500)
    receipt = rig.log.receipt("job-1", index)
    if forgery == "entry":
        receipt.entry = receipt.entry[:-1] + bytes([receipt.entry[-1] ^ 1])
    elif forgery == "proof":
        receipt.inclusion_proof[0] = bytes(32)
    elif forgery == "signature":
        impostor = MemoryLog(CheckpointSigner(ORIGIN, Ed25519PrivateKey.generate()), rig.log.leaves)
        receipt.checkpoint = impostor.note()
    elif forgery == "miner":
        index = rig.log.credit("ef" * 32, 500, job_id="job-1")
        receipt = rig.log.receipt("job-1", index)
    else:
        # The right key signs a checkpoint of another log (a key reused across logs).
        other = MemoryLog(rig.log.signer, rig.log.leaves, origin="other.test/ledger")
        receipt = other.receipt("job-1", index)
    await rig.deliver(receipt)
    [alarm] = rig.alarms()
    assert alarm.message.startswith("credit receipt for job job-1 rejected")
    assert alarm.new_checkpoint == receipt.checkpoint
    assert rig.stored() == [] and rig.pinned_size() is None


async def test_a_credit_that_does_not_reference_the_signed_job_receipt_is_rejected(
    rig: Rig,
) -> None:
    await rig.connect()
    assert rig.witness is not None
    identity = Identity.generate()
    job = miner_pb2.Job(job_id="job-7", model="m", prompt_token_ids=[1, 2])
    info = ModelInfo(
        name="m",
        vocab_size=10,
        context_length=64,
        weights_sha256=bytes(32),
        dtype="float32",
        engine="test",
        device="cpu",
    )
    result = signed_result(job, [3], miner_pb2.FINISH_REASON_LENGTH, info=info, identity=identity)
    rig.witness.job_result(result)
    # The coordinator credits job-7 with some other job's reference.
    index = rig.log.append(
        credit=EncodedAccount(AccountCode.MINER, rig.miner_id), amount=80, reference=b"\x05" * 32
    )
    rig.log.filler(1)
    await rig.deliver(rig.log.receipt("job-7", index))
    [alarm] = rig.alarms()
    assert "does not reference the job's receipt" in alarm.message
    assert rig.stored() == []


async def test_a_changed_verifier_key_raises_an_alarm_until_a_person_trusts_it(rig: Rig) -> None:
    await rig.connect()
    await rig.deliver(rig.log.receipt("job-1", earn(rig, "job-1", 100)))
    assert rig.link is not None
    await rig.link.aclose()
    pinned = rig.pinned_size()
    rotated = MemoryLog(CheckpointSigner(ORIGIN, Ed25519PrivateKey.generate()), rig.log.leaves)
    rig.log, rig.sent = rotated, []
    await rig.connect()
    await rig.settle()
    [alarm] = rig.alarms()
    assert "does not trust" in alarm.message and rotated.signer.verifier_key in alarm.message
    # Receipts are still checked (against the announced key) and the tree must still extend
    # the pinned checkpoint, but nothing signed by the new key is pinned.
    await rig.deliver(rotated.receipt("job-2", earn(rig, "job-2", 200)))
    assert len(rig.stored()) == 2 and len(rig.alarms()) == 1
    assert rig.pinned_size() == pinned
    assert rig.kinds().count("consistency_request") == 1
    await rig.link.aclose()

    # The operator announced the rotation; the miner's person adds the new key.
    with (rig.directory / "verifier-key.txt").open("a") as keys:
        keys.write(rotated.signer.verifier_key + "\n")
    rig.sent = []
    await rig.connect()
    await rig.deliver(rotated.receipt("job-3", earn(rig, "job-3", 300)))
    assert rig.alarms() == []
    [request] = [m.consistency_request for m in rig.sent if m.HasField("consistency_request")]
    assert request.old_size == pinned  # the new key's tree is proven to extend the old one's
    assert rig.pinned_size() == len(rig.log.leaves)


async def test_a_key_written_beforehand_is_the_only_one_trusted(rig: Rig) -> None:
    published = CheckpointSigner(ORIGIN, Ed25519PrivateKey.generate())
    rig.directory.mkdir()
    (rig.directory / "verifier-key.txt").write_text(published.verifier_key + "\n")
    await rig.connect()  # the coordinator announces another key than the one published
    await rig.deliver(rig.log.receipt("job-1", earn(rig, "job-1", 100)))
    [alarm] = rig.alarms()
    assert "does not trust" in alarm.message
    assert rig.pinned_size() is None and not (rig.directory / "checkpoint.txt").exists()
