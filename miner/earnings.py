"""``meshmint-miner earnings``: what this miner was credited, every receipt verified again offline.

Each stored receipt (``miner/witness_store.py``) is checked from scratch: the checkpoint's
signature with the key stored beside it, the origin, the entry crediting this miner, and the
inclusion proof against the checkpoint's root. Nothing is fetched from the coordinator.

Slash notices the miner received (``miner/slashes.py``) are listed after the credits and
subtracted from the total. They are the coordinator's word, not proofs: nothing verifies them.

Every credit is shown as pending. Credits mature after a verification window in which a spot
check of the job can still slash them; this report does not track maturity, so nothing is
shown as matured.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledger.money import format_credits
from miner.slashes import SLASHES_FILE, SlashRecord, read_slashes
from miner.witness import WitnessError, verify_record
from miner.witness_store import PinnedCheckpoint, WitnessStore

logger = logging.getLogger(__name__)

PENDING_NOTE = (
    "All credits are shown as pending: credits mature after a verification window in which "
    "spot checks can still slash them, and this report does not track maturity."
)


@dataclass(frozen=True)
class CheckedReceipt:
    """One stored receipt and the outcome of verifying it again."""

    job_id: str  # "" when the stored line could not be read at all
    index: int | None  # the settle entry's index in the log
    amount: int  # micro-units credited; 0 when the receipt does not verify
    tree_size: int | None  # the checkpoint the proof is for
    problem: str | None  # None when every check passed

    @property
    def verified(self) -> bool:
        return self.problem is None


@dataclass(frozen=True)
class Earnings:
    """Everything ``meshmint-miner earnings`` shows."""

    miner_id: str  # hex public key: the credited account's owner
    directory: Path  # the witness directory read
    receipts: tuple[CheckedReceipt, ...]  # in the order they were stored
    pinned: PinnedCheckpoint | None  # the newest checkpoint proven consistent, if any
    trusted_keys: tuple[str, ...]  # the ledger verifier keys this miner trusts
    state_problem: str | None  # why the pinned checkpoint could not be read, if it could not
    alarms: int  # failed proofs recorded in alarms.jsonl
    slashes: tuple[SlashRecord, ...] = ()  # slash notices received, in the order stored
    slash_problems: tuple[str, ...] = ()  # lines of slashes.jsonl that could not be read

    @property
    def total(self) -> int:
        """Micro-units credited by receipts that verify."""
        return sum(receipt.amount for receipt in self.receipts if receipt.verified)

    @property
    def slashed(self) -> int:
        """Micro-units taken back by slash notices."""
        return sum(slash.amount for slash in self.slashes)

    @property
    def net(self) -> int:
        """Verified credits less slashes (negative when slashes exceed the stored credits)."""
        return self.total - self.slashed

    @property
    def banned(self) -> bool:
        """Whether a slash notice said the coordinator refuses this key from now on."""
        return any(slash.banned for slash in self.slashes)

    @property
    def jobs(self) -> int:
        """Jobs with a verified credit."""
        return sum(1 for receipt in self.receipts if receipt.verified)

    @property
    def all_verified(self) -> bool:
        return all(receipt.verified for receipt in self.receipts) and self.state_problem is None


def read_earnings(directory: Path, *, miner_id: str) -> Earnings:
    """Reads and re-verifies every receipt in the witness ``directory`` of ``miner_id``."""
    state_problem: str | None = None
    try:
        store = WitnessStore.open(directory)
    except WitnessError as error:
        state_problem = str(error)
        store = WitnessStore(directory)
    checked: list[CheckedReceipt] = []
    seen: set[int] = set()
    for record in store.records():
        if isinstance(record, str):
            checked.append(CheckedReceipt("", None, 0, None, record))
            continue
        problem: str | None = None
        if record.index in seen:
            problem = f"a second receipt for entry {record.index}"
        else:
            try:
                verify_record(record, miner_id=miner_id)
            except WitnessError as error:
                problem = str(error)
        seen.add(record.index)
        amount = record.amount if problem is None else 0
        checked.append(
            CheckedReceipt(record.job_id, record.index, amount, record.tree_size, problem)
        )
    slashes: list[SlashRecord] = []
    slash_problems: list[str] = []
    for slash in read_slashes(store.directory):
        if isinstance(slash, str):
            slash_problems.append(slash)
        else:
            slashes.append(slash)
    return Earnings(
        miner_id=miner_id,
        directory=store.directory,
        receipts=tuple(checked),
        pinned=store.pinned,
        trusted_keys=store.trusted_keys,
        state_problem=state_problem,
        alarms=store.alarm_count(),
        slashes=tuple(slashes),
        slash_problems=tuple(slash_problems),
    )


def as_json(earnings: Earnings) -> str:
    pinned = earnings.pinned
    document: dict[str, Any] = {
        "miner_id": earnings.miner_id,
        "directory": str(earnings.directory),
        "total_credited": earnings.total,
        "slashed": earnings.slashed,
        "net": earnings.net,
        "pending": earnings.net,
        "matured": 0,
        "jobs": earnings.jobs,
        "verified": earnings.all_verified,
        "alarms": earnings.alarms,
        "checkpoint": None
        if pinned is None
        else {
            "origin": pinned.checkpoint.origin,
            "size": pinned.checkpoint.size,
            "root": pinned.checkpoint.root_hash.hex(),
        },
        "trusted_keys": list(earnings.trusted_keys),
        "state_problem": earnings.state_problem,
        "receipts": [
            {
                "job_id": receipt.job_id,
                "index": receipt.index,
                "amount": receipt.amount,
                "tree_size": receipt.tree_size,
                "status": "pending",
                "verified": receipt.verified,
                "problem": receipt.problem,
            }
            for receipt in earnings.receipts
        ],
        "slashes": [
            {
                "job_id": slash.job_id,
                "amount": slash.amount,
                "reason": slash.reason,
                "banned": slash.banned,
                "received_at": slash.received_at,
            }
            for slash in earnings.slashes
        ],
        "slash_problems": list(earnings.slash_problems),
        "banned": earnings.banned,
        "note": PENDING_NOTE,
    }
    return json.dumps(document, indent=2) + "\n"


def as_text(earnings: Earnings) -> str:
    lines = [f"miner {earnings.miner_id}", f"receipts in {earnings.directory}"]
    pinned = earnings.pinned
    if pinned is not None:
        lines.append(
            f"ledger {pinned.checkpoint.origin}: checkpoint of size {pinned.checkpoint.size}, "
            f"root {pinned.checkpoint.root_hash.hex()}"
        )
    for key in earnings.trusted_keys:
        lines.append(f"trusted ledger key {key}")
    if earnings.state_problem is not None:
        lines.append(f"PROBLEM: {earnings.state_problem}")
    if earnings.receipts:
        lines.append("")
        lines.append(f"{'job':<40} {'entry':>8} {'credits':>14} {'tree':>8}  status")
        for receipt in earnings.receipts:
            status = "pending, proof verified" if receipt.verified else f"FAILED: {receipt.problem}"
            index = "-" if receipt.index is None else str(receipt.index)
            tree = "-" if receipt.tree_size is None else str(receipt.tree_size)
            lines.append(
                f"{receipt.job_id or '?':<40} {index:>8} {format_credits(receipt.amount):>14} "
                f"{tree:>8}  {status}"
            )
    lines.extend(_slash_lines(earnings))
    lines.append("")
    failed = sum(1 for receipt in earnings.receipts if not receipt.verified)
    verdict = "all proofs verified" if failed == 0 else f"{failed} receipts FAILED verification"
    lines.append(
        f"credited {format_credits(earnings.total)} credits for {earnings.jobs} jobs; {verdict}"
    )
    if earnings.slashes:
        lines.append(
            f"slashed {format_credits(earnings.slashed)} credits for "
            f"{len(earnings.slashes)} failed spot checks"
        )
        lines.append(f"total {format_credits(earnings.net)} credits after slashes")
    lines.append(f"pending {format_credits(earnings.net)}, matured {format_credits(0)}")
    lines.append(PENDING_NOTE)
    if earnings.banned:
        lines.append("BANNED: the coordinator refuses this key after a repeated failed check")
    if earnings.alarms:
        lines.append(
            f"WARNING: {earnings.alarms} ledger alarms recorded in "
            f"{earnings.directory / 'alarms.jsonl'}"
        )
    return "\n".join(lines) + "\n"


def _slash_lines(earnings: Earnings) -> list[str]:
    """The table of slashes shown after the credits; nothing when there are none."""
    lines: list[str] = []
    if earnings.slashes:
        lines.append("")
        lines.append(f"{'slashed job':<40} {'credits':>14}  reason")
        for slash in earnings.slashes:
            lines.append(
                f"{slash.job_id or '?':<40} {'-' + format_credits(slash.amount):>14}  "
                f"{slash.reason or '-'}"
            )
    for problem in earnings.slash_problems:
        lines.append(f"WARNING: {problem} (in {earnings.directory / SLASHES_FILE})")
    return lines
