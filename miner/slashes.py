"""Slash notices: a confirmed failed spot check took this miner's unmatured credits.

The coordinator sends a ``SlashNotice``. The miner logs it at ERROR (the person running it must
see it) and, when it keeps a state directory, appends it to ``slashes.jsonl`` beside the
witness's receipts (``miner/witness_store.py``), one JSON object a line, so that
``meshmint-miner earnings`` can subtract it. A notice is the coordinator's word: unlike a credit
it comes without a ledger proof, so it is recorded, not verified.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledger.money import format_credits
from proto import miner_pb2

logger = logging.getLogger(__name__)

SLASHES_FILE = "slashes.jsonl"


@dataclass(frozen=True)
class SlashRecord:
    """One slash notice as stored (and as ``meshmint-miner earnings`` reads it)."""

    job_id: str  # the job whose spot check failed
    amount: int  # micro-units taken from this miner, the buyer's refund included
    reason: str  # what the checks found, in the coordinator's words
    banned: bool  # True when the coordinator refuses this key from now on
    received_at: float  # unix time the miner received the notice

    @classmethod
    def from_notice(cls, notice: miner_pb2.SlashNotice, *, received_at: float) -> SlashRecord:
        return cls(
            job_id=notice.job_id,
            amount=notice.amount,
            reason=notice.reason,
            banned=notice.banned,
            received_at=received_at,
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "job_id": self.job_id,
                "amount": self.amount,
                "reason": self.reason,
                "banned": self.banned,
                "received_at": self.received_at,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, line: str) -> SlashRecord:
        """Raises ValueError (or KeyError/TypeError) for anything but a record's JSON."""
        data: dict[str, Any] = json.loads(line)
        amount = data["amount"]
        if not isinstance(amount, int) or isinstance(amount, bool) or amount < 0:
            raise ValueError(f"amount must be a non-negative integer, got {amount!r}")
        banned = data["banned"]
        if not isinstance(banned, bool):
            raise ValueError(f"banned must be true or false, got {banned!r}")
        return cls(
            job_id=str(data["job_id"]),
            amount=amount,
            reason=str(data["reason"]),
            banned=banned,
            received_at=float(data["received_at"]),
        )


def record_slash(notice: miner_pb2.SlashNotice, *, directory: Path | None) -> SlashRecord:
    """Logs ``notice`` and appends it to ``directory``/slashes.jsonl (None: only logs).

    Never raises for an unwritable directory: the notice is logged either way, and a miner that
    keeps serving is worth more than a file.
    """
    record = SlashRecord.from_notice(notice, received_at=time.time())
    logger.error(
        "spot check failed: job %s slashed %s credits (reason: %s); key banned: %s",
        record.job_id,
        format_credits(record.amount),
        record.reason or "none given",
        "yes, the coordinator refuses this key from now on" if record.banned else "no",
    )
    if directory is None:
        return record
    try:
        _append(Path(directory).expanduser(), record.to_json())
    except OSError:
        logger.exception("could not record the slash of job %s", record.job_id)
    return record


def read_slashes(directory: Path) -> Iterator[SlashRecord | str]:
    """Every stored slash in order; a line that is not a record yields its problem."""
    path = Path(directory).expanduser() / SLASHES_FILE
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            lines = [line for line in handle if line.strip()]
    except FileNotFoundError:
        return
    for number, line in enumerate(lines, start=1):
        try:
            yield SlashRecord.from_json(line)
        except (ValueError, KeyError, TypeError) as error:
            yield f"line {number} of {SLASHES_FILE} is not a slash: {error!r}"


def _append(directory: Path, line: str) -> None:
    if not directory.exists():
        # Same rule as the witness store: the miner's state is nobody else's business.
        directory.mkdir(parents=True, mode=0o700)
        directory.chmod(0o700)  # mkdir's mode is filtered by the umask
    with (directory / SLASHES_FILE).open("a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())
