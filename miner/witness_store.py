"""What a miner keeps as a witness of the ledger, in one directory next to its identity key.

- ``receipts.jsonl``: every credit receipt that verified, one JSON object a line, with all it
  takes to verify it again offline (entry, inclusion proof, signed checkpoint, verifier key).
- ``checkpoint.txt``: the newest checkpoint proven consistent with every one before it, as the
  signed note the coordinator sent (C2SP format, readable by any checkpoint tool).
- ``verifier-key.txt``: the ledger keys this miner trusts, one C2SP verifier key a line. It may
  be written beforehand with the key the operator publishes; otherwise the first receipt's key
  is pinned. A coordinator that announces any other key raises an alarm on every connection;
  once the operator has announced a rotation, add the new key as a line of its own (the old one
  stays: it verifies the stored checkpoint, and the new tree must still extend it).
- ``alarms.jsonl``: every proof that failed, with the checkpoints involved: the evidence.

Receipts and alarms only ever grow; the checkpoint and the key are replaced atomically.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledger.checkpoint import (
    Checkpoint,
    CheckpointError,
    parse_signed_checkpoint,
    parse_verifier_key,
)
from ledger.keyfile import write_atomically
from miner.errors import MinerError

logger = logging.getLogger(__name__)

RECEIPTS_FILE = "receipts.jsonl"
CHECKPOINT_FILE = "checkpoint.txt"
VERIFIER_KEY_FILE = "verifier-key.txt"
ALARMS_FILE = "alarms.jsonl"


class WitnessError(MinerError):
    """A credit receipt, checkpoint or consistency proof does not verify, or the stored state
    is unreadable."""


@dataclass(frozen=True)
class ReceiptRecord:
    """One verified credit receipt as stored (and as ``meshmint-miner earnings`` reads it)."""

    job_id: str  # the job the credit paid for
    index: int  # the settle entry's index in the log
    amount: int  # micro-units credited (also inside ``entry``)
    tree_size: int  # size of the tree the proof is for
    entry: bytes  # canonical entry bytes: the Merkle leaf
    inclusion_proof: tuple[bytes, ...]  # RFC 9162 path, leaf upward
    checkpoint: bytes  # the signed note of tree_size
    origin: str  # the log's name, as the coordinator announced it
    verifier_key: str  # the C2SP verifier key that verified the checkpoint
    received_at: float  # unix time the miner verified it

    def to_json(self) -> str:
        return json.dumps(
            {
                "job_id": self.job_id,
                "index": self.index,
                "amount": self.amount,
                "tree_size": self.tree_size,
                "entry": _b64(self.entry),
                "inclusion_proof": [_b64(h) for h in self.inclusion_proof],
                "checkpoint": self.checkpoint.decode("utf-8"),
                "origin": self.origin,
                "verifier_key": self.verifier_key,
                "received_at": self.received_at,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, line: str) -> ReceiptRecord:
        """Raises ValueError (or KeyError/TypeError) for anything but a record's JSON."""
        data: dict[str, Any] = json.loads(line)
        return cls(
            job_id=str(data["job_id"]),
            index=int(data["index"]),
            amount=int(data["amount"]),
            tree_size=int(data["tree_size"]),
            entry=base64.b64decode(data["entry"], validate=True),
            inclusion_proof=tuple(
                base64.b64decode(h, validate=True) for h in data["inclusion_proof"]
            ),
            checkpoint=str(data["checkpoint"]).encode("utf-8"),
            origin=str(data["origin"]),
            verifier_key=str(data["verifier_key"]),
            received_at=float(data["received_at"]),
        )


@dataclass(frozen=True)
class PinnedCheckpoint:
    """The newest checkpoint this witness holds."""

    checkpoint: Checkpoint  # its parsed body
    note: bytes  # the signed note, as received (verified by one of the trusted keys)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class WitnessStore:
    """The witness directory. Files are created on first write; ``open`` only reads."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory).expanduser()
        self.pinned: PinnedCheckpoint | None = None
        self.trusted_keys: tuple[str, ...] = ()  # verifier-key.txt; empty until first pinned
        self._indices: set[int] = set()

    @classmethod
    def open(cls, directory: Path) -> WitnessStore:
        """Reads the trusted keys, the pinned checkpoint and the stored receipts' indices.

        Raises WitnessError when a key is malformed or the stored checkpoint does not verify
        with the trusted keys: the state was damaged or tampered with, and trusting it either
        way would be wrong.
        """
        store = cls(directory)
        store.trusted_keys = store._read_keys()
        store.pinned = store._read_pinned()
        for line in store._lines(RECEIPTS_FILE):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                store._indices.add(ReceiptRecord.from_json(line).index)
        return store

    @property
    def receipts_path(self) -> Path:
        return self.directory / RECEIPTS_FILE

    @property
    def alarms_path(self) -> Path:
        return self.directory / ALARMS_FILE

    def has_receipt(self, index: int) -> bool:
        """Whether a receipt for the entry at ``index`` is stored already."""
        return index in self._indices

    def add_receipt(self, record: ReceiptRecord) -> bool:
        """Appends ``record`` unless its entry is stored already; True when it was added."""
        if record.index in self._indices:
            return False
        self._append(RECEIPTS_FILE, record.to_json())
        self._indices.add(record.index)
        return True

    def add_alarm(self, message: str, *, old_checkpoint: bytes, new_checkpoint: bytes) -> None:
        line = json.dumps(
            {
                "at": time.time(),
                "message": message,
                "old_checkpoint": old_checkpoint.decode("utf-8", errors="replace"),
                "new_checkpoint": new_checkpoint.decode("utf-8", errors="replace"),
            },
            separators=(",", ":"),
        )
        self._append(ALARMS_FILE, line)

    def pin(self, checkpoint: Checkpoint, *, note: bytes, verifier_key: str) -> None:
        """Makes ``note`` the stored checkpoint; ``verifier_key`` verified it.

        With no trusted key yet, ``verifier_key`` becomes the one; otherwise it must be one of
        them: trusting another key is a person's decision (see the module docstring).
        """
        if self.trusted_keys and verifier_key not in self.trusted_keys:
            raise ValueError("a key is trusted only by adding it to verifier-key.txt")
        self._ensure_directory()
        if not self.trusted_keys:
            # Key first: a crash before the note leaves no checkpoint, which reads as unpinned.
            write_atomically(
                self.directory / VERIFIER_KEY_FILE, verifier_key.encode("utf-8") + b"\n"
            )
            self.trusted_keys = (verifier_key,)
        write_atomically(self.directory / CHECKPOINT_FILE, note)
        self.pinned = PinnedCheckpoint(checkpoint, note)

    def records(self) -> Iterator[ReceiptRecord | str]:
        """Every stored receipt in order; a line that is not a record yields its problem."""
        for number, line in enumerate(self._lines(RECEIPTS_FILE), start=1):
            try:
                yield ReceiptRecord.from_json(line)
            except (ValueError, KeyError, TypeError) as error:
                yield f"line {number} of {RECEIPTS_FILE} is not a receipt: {error!r}"

    def alarm_count(self) -> int:
        return sum(1 for _ in self._lines(ALARMS_FILE))

    def _read_keys(self) -> tuple[str, ...]:
        try:
            keys = tuple(line.strip() for line in self._lines(VERIFIER_KEY_FILE, strict=True))
            for key in keys:
                parse_verifier_key(key)
        except (OSError, UnicodeDecodeError, CheckpointError) as error:
            raise self._unusable(error) from error
        return keys

    def _read_pinned(self) -> PinnedCheckpoint | None:
        note_path = self.directory / CHECKPOINT_FILE
        if not note_path.exists():
            return None
        try:
            note = note_path.read_bytes()
            verifiers = [parse_verifier_key(key) for key in self.trusted_keys]
            checkpoint = parse_signed_checkpoint(note, verifiers)
        except (OSError, CheckpointError) as error:
            raise self._unusable(error) from error
        return PinnedCheckpoint(checkpoint, note)

    def _unusable(self, error: Exception) -> WitnessError:
        return WitnessError(
            f"the witness state in {self.directory} is unusable ({error}); move "
            f"{CHECKPOINT_FILE} and {VERIFIER_KEY_FILE} away to start witnessing afresh"
        )

    def _lines(self, name: str, *, strict: bool = False) -> Iterator[str]:
        errors = "strict" if strict else "replace"
        try:
            with (self.directory / name).open(encoding="utf-8", errors=errors) as handle:
                for line in handle:
                    if line.strip():
                        yield line
        except FileNotFoundError:
            return

    def _ensure_directory(self) -> None:
        if not self.directory.exists():
            self.directory.mkdir(parents=True, mode=0o700)
            self.directory.chmod(0o700)  # mkdir's mode is filtered by the umask

    def _append(self, name: str, line: str) -> None:
        self._ensure_directory()
        with (self.directory / name).open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
