"""A small Merkle log built in memory with the ledger's own encoding, hashing and signing.

``MemoryLog`` plays the coordinator's ledger for unit tests of the miner's witness: it appends
real canonical entries, signs real C2SP checkpoints and hands out real RFC 9162 proofs, so a
test can forge exactly one thing (an entry byte, a proof hash, a key, a fork) and nothing else.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger.checkpoint import Checkpoint, CheckpointSigner
from ledger.entry import (
    ZERO_HASH,
    AccountCode,
    EncodedAccount,
    EntryKind,
    LedgerEntry,
    encode_entry,
)
from ledger.merkle import consistency_proof, inclusion_proof, leaf_hash, root
from proto import miner_pb2

ORIGIN = "witness.test/ledger"
ESCROW = EncodedAccount(AccountCode.ESCROW, "")


def job_reference(job_id: str) -> bytes:
    """The settle reference the coordinator uses when it has no verified job receipt."""
    return hashlib.sha256(job_id.encode()).digest()


@dataclass
class MemoryLog:
    signer: CheckpointSigner = field(
        default_factory=lambda: CheckpointSigner(ORIGIN, Ed25519PrivateKey.generate())
    )
    leaves: list[bytes] = field(default_factory=list)
    origin: str | None = None  # the origin line checkpoints carry; None: the key's name

    def fork(self, at: int) -> MemoryLog:
        """The same log, signed by the same key, with everything after ``at`` entries dropped."""
        return MemoryLog(self.signer, list(self.leaves[:at]))

    def append(
        self,
        *,
        credit: EncodedAccount,
        amount: int,
        kind: EntryKind = EntryKind.SETTLE,
        reference: bytes = ZERO_HASH,
        memo: str = "",
    ) -> int:
        seq = len(self.leaves)
        entry = LedgerEntry(
            kind=kind,
            seq=seq,
            timestamp_us=1_700_000_000_000_000 + seq,
            debit=ESCROW,
            credit=credit,
            amount=amount,
            hold_id=seq + 1,
            reference=reference,
            prev_leaf_hash=leaf_hash(self.leaves[-1]) if self.leaves else ZERO_HASH,
            memo=memo,
        )
        self.leaves.append(encode_entry(entry))
        return seq

    def credit(self, miner_id: str, amount: int, *, job_id: str) -> int:
        """Appends a settle entry paying ``miner_id`` for ``job_id``; returns its index."""
        return self.append(
            credit=EncodedAccount(AccountCode.MINER, miner_id),
            amount=amount,
            reference=job_reference(job_id),
        )

    def filler(self, count: int) -> None:
        """Entries that concern nobody in the test (a buyer's mints)."""
        for _ in range(count):
            self.append(
                credit=EncodedAccount(AccountCode.BUYER, "key_other"),
                amount=7,
                kind=EntryKind.MINT,
                memo=f"filler {len(self.leaves)}",
            )

    def hashes(self, size: int | None = None) -> list[bytes]:
        return [
            leaf_hash(leaf) for leaf in self.leaves[: len(self.leaves) if size is None else size]
        ]

    def note(self, size: int | None = None) -> bytes:
        hashes = self.hashes(size)
        origin = self.origin or self.signer.name
        return self.signer.sign(Checkpoint(origin, len(hashes), root(hashes)))

    def welcome(self) -> miner_pb2.Welcome:
        return miner_pb2.Welcome(
            miner_id="",
            heartbeat_interval_ms=1000,
            ledger_origin=self.signer.name,
            ledger_verifier_key=self.signer.verifier_key,
        )

    def receipt(self, job_id: str, index: int, size: int | None = None) -> miner_pb2.CreditReceipt:
        hashes = self.hashes(size)
        return miner_pb2.CreditReceipt(
            job_id=job_id,
            entry=self.leaves[index],
            index=index,
            tree_size=len(hashes),
            inclusion_proof=inclusion_proof(hashes, index),
            checkpoint=self.note(len(hashes)),
        )

    def consistency(self, old_size: int, new_size: int) -> miner_pb2.ConsistencyProof:
        return miner_pb2.ConsistencyProof(
            old_size=old_size,
            new_size=new_size,
            hashes=consistency_proof(self.hashes(new_size), old_size),
            checkpoint=self.note(new_size),
        )
