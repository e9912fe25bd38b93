"""Every miner is a witness of the ledger: it verifies its credits and that the log only grows.

For each credited job the coordinator sends a ``CreditReceipt``. The witness checks that the
entry decodes, is a settle entry crediting this miner at the given index and, when the miner
still remembers the job, references the job's signed receipt; that the entry's leaf hash and
the inclusion proof lead to the root of the checkpoint; and that the checkpoint is signed by the
verifier key and names the origin the coordinator announced in ``Welcome``. Verified receipts
are stored (``miner/witness_store.py``); ``meshmint-miner earnings`` verifies them again.

The witness keeps the newest checkpoint it has verified. A receipt under another checkpoint
makes it ask for a consistency proof between the two; only a verified proof lets a newer
checkpoint replace the stored one. Any failure (a receipt or proof that does not verify, two
checkpoints of one size with different roots, a verifier key the miner does not trust) is
logged at CRITICAL as "ledger fork or tampering", stored in ``alarms.jsonl`` and reported to
the coordinator in a ``WitnessAlarm``. A coordinator that does not answer in time is only
warned about: the next receipt asks again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ledger.checkpoint import (
    Checkpoint,
    CheckpointError,
    Verifier,
    parse_signed_checkpoint,
    parse_verifier_key,
)
from ledger.entry import (
    AccountCode,
    EncodedAccount,
    EntryFormatError,
    EntryKind,
    LedgerEntry,
    decode_entry,
)
from ledger.merkle import leaf_hash, verify_consistency, verify_inclusion
from miner.witness_store import ReceiptRecord, WitnessError, WitnessStore
from proto import miner_pb2
from proto.signing import receipt_message

logger = logging.getLogger(__name__)

__all__ = ["VerifiedCredit", "Witness", "WitnessError", "WitnessLink", "verify_credit"]

Send = Callable[[miner_pb2.MinerMessage], None]

_REMEMBERED_JOBS = 4096  # signed job receipts remembered until their credit arrives
_MAX_QUEUED_RECEIPTS = 10_000  # receipts waiting for the witness; beyond this they are dropped
_MAX_ALARM_CHARS = 4000  # an alarm's text, as sent to the coordinator
# Each checkpoint quoted in an alarm (a real one is ~200 bytes); keeps alarms far below
# proto.limits.MAX_MINER_MESSAGE_BYTES whatever the coordinator sent.
_MAX_ALARM_NOTE_BYTES = 64 * 1024


@dataclass(frozen=True)
class VerifiedCredit:
    """A credit proven to be in the log under a checkpoint signed by the trusted key."""

    entry: LedgerEntry  # the decoded settle entry
    checkpoint: Checkpoint  # the checkpoint it is included in


def verify_credit(
    *,
    entry: bytes,
    index: int,
    tree_size: int,
    inclusion_proof: Sequence[bytes],
    checkpoint: bytes,
    verifier: Verifier,
    origin: str,
    miner_id: str,
) -> VerifiedCredit:
    """Checks one credit receipt offline; raises WitnessError saying what does not hold."""
    try:
        signed = parse_signed_checkpoint(checkpoint, verifier, origin=origin)
    except CheckpointError as error:
        raise WitnessError(f"the checkpoint does not verify: {error}") from None
    if signed.size != tree_size:
        raise WitnessError(f"the checkpoint is of size {signed.size}, the proof of {tree_size}")
    try:
        decoded = decode_entry(entry)
    except EntryFormatError as error:
        raise WitnessError(f"the entry does not decode: {error}") from None
    if decoded.kind is not EntryKind.SETTLE:
        raise WitnessError(f"entry {index} is a {decoded.kind.name} entry, not a settle entry")
    if decoded.credit != EncodedAccount(AccountCode.MINER, miner_id):
        raise WitnessError(f"entry {index} credits {decoded.credit.owner!r}, not this miner")
    if decoded.seq != index:
        raise WitnessError(f"the entry says it is number {decoded.seq}, the receipt {index}")
    if not verify_inclusion(leaf_hash(entry), index, tree_size, inclusion_proof, signed.root_hash):
        raise WitnessError(f"entry {index} is not in the tree of size {tree_size}: bad proof")
    return VerifiedCredit(decoded, signed)


def verify_record(record: ReceiptRecord, *, miner_id: str) -> VerifiedCredit:
    """``verify_credit`` on a stored receipt, with the key and origin stored alongside."""
    try:
        verifier = parse_verifier_key(record.verifier_key)
    except CheckpointError as error:
        raise WitnessError(f"the stored verifier key is unusable: {error}") from None
    credit = verify_credit(
        entry=record.entry,
        index=record.index,
        tree_size=record.tree_size,
        inclusion_proof=record.inclusion_proof,
        checkpoint=record.checkpoint,
        verifier=verifier,
        origin=record.origin,
        miner_id=miner_id,
    )
    if credit.entry.amount != record.amount:
        raise WitnessError(f"the record says {record.amount}, the entry {credit.entry.amount}")
    return credit


class Witness:
    """The miner's witness across connections: its store and the jobs it signed receipts for."""

    def __init__(self, store: WitnessStore, *, miner_id: str, proof_timeout_s: float = 10.0):
        self.store = store
        self.miner_id = miner_id
        self.proof_timeout_s = proof_timeout_s  # how long to wait for a consistency proof
        self._signed: OrderedDict[str, set[bytes]] = OrderedDict()

    def job_result(self, result: miner_pb2.JobResult) -> None:
        """Remembers the hash of a signed job receipt: the settle entry must reference it."""
        digest = hashlib.sha256(receipt_message(result.receipt) + result.signature).digest()
        self._signed.setdefault(result.job_id, set()).add(digest)
        self._signed.move_to_end(result.job_id)
        while len(self._signed) > _REMEMBERED_JOBS:
            self._signed.popitem(last=False)

    def references_ok(self, job_id: str, reference: bytes) -> bool:
        """False only when the job is remembered and the reference is none of its own."""
        signed = self._signed.pop(job_id, None)
        # Settled without a verified receipt (e.g. the buyer left early): the job id's hash.
        return signed is None or reference in signed | {hashlib.sha256(job_id.encode()).digest()}

    def attach(self, welcome: miner_pb2.Welcome, send: Send) -> WitnessLink | None:
        """Starts witnessing on a new connection; None when its coordinator sends no receipts."""
        if not welcome.ledger_verifier_key:
            logger.info("the coordinator sends no ledger receipts: nothing to witness")
            return None
        try:
            verifier = parse_verifier_key(welcome.ledger_verifier_key)
        except CheckpointError as error:
            logger.error("the coordinator's ledger key is unusable (%s): not witnessing", error)
            return None
        link = WitnessLink(
            self, verifier=verifier, vkey=welcome.ledger_verifier_key, origin=welcome.ledger_origin
        )
        link.start(send)
        return link


class WitnessLink:
    """Witnessing over one connection: receipts are checked one at a time, in arrival order."""

    def __init__(self, witness: Witness, *, verifier: Verifier, vkey: str, origin: str) -> None:
        self._witness = witness
        self._store = witness.store
        self._verifier = verifier
        self._vkey = vkey
        self._origin = origin
        self._send: Send = lambda message: None
        self._queue: asyncio.Queue[miner_pb2.CreditReceipt] = asyncio.Queue()
        self._waiting: dict[tuple[int, int], asyncio.Future[miner_pb2.ConsistencyProof]] = {}
        self._worker: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()  # set once the connection's key has been checked

    def start(self, send: Send) -> None:
        self._send = send
        self._worker = asyncio.create_task(self._work(), name="ledger-witness")

    def handle(self, message: miner_pb2.CoordinatorMessage) -> None:
        """Takes a CreditReceipt or a ConsistencyProof from the coordinator."""
        kind = message.WhichOneof("body")
        if kind == "credit_receipt":
            if self._queue.qsize() >= _MAX_QUEUED_RECEIPTS:
                logger.warning(
                    "too many receipts waiting; dropped %s", message.credit_receipt.job_id
                )
                return
            self._queue.put_nowait(message.credit_receipt)
        elif kind == "consistency_proof":
            proof = message.consistency_proof
            waiter = self._waiting.get((proof.old_size, proof.new_size))
            if waiter is not None and not waiter.done():
                waiter.set_result(proof)
            else:
                logger.debug("unasked consistency proof %d -> %d", proof.old_size, proof.new_size)

    async def drained(self) -> None:
        """Waits until every receipt received so far has been checked (and stored)."""
        await self._ready.wait()
        await self._queue.join()

    async def aclose(self) -> None:
        """Stops witnessing (the connection ended); receipts not yet checked are dropped."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    async def _work(self) -> None:
        trusted = self._store.trusted_keys
        if trusted and self._vkey not in trusted:
            pinned = self._store.pinned
            await self._alarm(
                f"the coordinator signs the ledger with {self._vkey}, which this miner does not "
                f"trust (it trusts {', '.join(trusted)}); once the operator has announced the "
                f"rotation, add the new key as a line of {self._store.directory}/verifier-key.txt",
                old=pinned.note if pinned is not None else b"",
                new=b"",
            )
        self._ready.set()
        while True:
            receipt = await self._queue.get()
            try:
                await self._check(receipt)
            except OSError:
                # A full disk must not end witnessing; this receipt is lost, the next may fit.
                logger.exception("could not store the receipt of job %s", receipt.job_id)
            finally:
                self._queue.task_done()

    async def _check(self, receipt: miner_pb2.CreditReceipt) -> None:
        try:
            credit = verify_credit(
                entry=receipt.entry,
                index=receipt.index,
                tree_size=receipt.tree_size,
                inclusion_proof=list(receipt.inclusion_proof),
                checkpoint=receipt.checkpoint,
                verifier=self._verifier,
                origin=self._origin,
                miner_id=self._witness.miner_id,
            )
            if not self._witness.references_ok(receipt.job_id, credit.entry.reference):
                raise WitnessError(f"entry {receipt.index} does not reference the job's receipt")
        except WitnessError as error:
            await self._alarm(
                f"credit receipt for job {receipt.job_id} rejected: {error}",
                old=self._store.pinned.note if self._store.pinned else b"",
                new=receipt.checkpoint,
            )
            return
        record = ReceiptRecord(
            job_id=receipt.job_id,
            index=receipt.index,
            amount=credit.entry.amount,
            tree_size=receipt.tree_size,
            entry=receipt.entry,
            inclusion_proof=tuple(receipt.inclusion_proof),
            checkpoint=receipt.checkpoint,
            origin=self._origin,
            verifier_key=self._vkey,
            received_at=time.time(),
        )
        if await asyncio.to_thread(self._store.add_receipt, record):
            logger.info(
                "credit verified: job %s, %d micro-units, entry %d under checkpoint %d",
                receipt.job_id,
                credit.entry.amount,
                receipt.index,
                receipt.tree_size,
            )
        await self._advance(credit.checkpoint, receipt.checkpoint)

    async def _advance(self, new: Checkpoint, note: bytes) -> None:
        """Proves ``new`` consistent with the pinned checkpoint; pins it when it is newer."""
        pinned = self._store.pinned
        trusted = self._store.trusted_keys
        if pinned is None:
            if not trusted or self._vkey in trusted:
                await asyncio.to_thread(self._store.pin, new, note=note, verifier_key=self._vkey)
            return
        old = pinned.checkpoint
        if new.size == old.size:
            if new.root_hash != old.root_hash:
                await self._alarm(
                    f"two signed checkpoints of size {new.size} with different roots",
                    old=pinned.note,
                    new=note,
                )
            return
        small, large = (old, new) if old.size < new.size else (new, old)
        proof = await self._ask(small.size, large.size)
        if proof is None:
            return
        problem = self._proof_problem(proof, small, large)
        if problem is not None:
            await self._alarm(problem, old=pinned.note, new=note)
        elif new.size > old.size and self._vkey in trusted:
            await asyncio.to_thread(self._store.pin, new, note=note, verifier_key=self._vkey)
            logger.debug("checkpoint %d proven consistent with %d", new.size, old.size)

    def _proof_problem(
        self, proof: miner_pb2.ConsistencyProof, small: Checkpoint, large: Checkpoint
    ) -> str | None:
        if proof.error:
            return f"the coordinator cannot prove {small.size} -> {large.size}: {proof.error}"
        if not verify_consistency(
            small.size, large.size, list(proof.hashes), small.root_hash, large.root_hash
        ):
            return f"the checkpoint of size {large.size} does not extend the one of {small.size}"
        if proof.checkpoint:
            try:
                signed = parse_signed_checkpoint(proof.checkpoint, self._verifier)
            except CheckpointError as error:
                return f"the proof's checkpoint does not verify: {error}"
            if (signed.origin, signed.size, signed.root_hash) != (
                large.origin,
                large.size,
                large.root_hash,
            ):
                return f"the coordinator signed two different checkpoints of size {large.size}"
        return None

    async def _ask(self, old_size: int, new_size: int) -> miner_pb2.ConsistencyProof | None:
        key = (old_size, new_size)
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[key] = waiter
        request = miner_pb2.ConsistencyRequest(old_size=old_size, new_size=new_size)
        self._send(miner_pb2.MinerMessage(consistency_request=request))
        try:
            return await asyncio.wait_for(waiter, self._witness.proof_timeout_s)
        except TimeoutError:
            logger.warning(
                "no consistency proof %d -> %d within %.0f s; asking again with the next receipt",
                old_size,
                new_size,
                self._witness.proof_timeout_s,
            )
            return None
        finally:
            self._waiting.pop(key, None)

    async def _alarm(self, message: str, *, old: bytes, new: bytes) -> None:
        logger.critical("ledger fork or tampering: %s", message)
        alarm = miner_pb2.WitnessAlarm(
            message=message[:_MAX_ALARM_CHARS],
            old_checkpoint=old[:_MAX_ALARM_NOTE_BYTES],
            new_checkpoint=new[:_MAX_ALARM_NOTE_BYTES],
        )
        self._send(miner_pb2.MinerMessage(witness_alarm=alarm))
        try:
            await asyncio.to_thread(
                self._store.add_alarm, message, old_checkpoint=old, new_checkpoint=new
            )
        except OSError:
            logger.exception("could not store the alarm in %s", self._store.alarms_path)
