"""What an audit found, and how it is shown: a report for people, JSON for scripts, a progress bar.

``AuditReport`` is produced by ``ledger.audit.audit``. ``render_text`` and ``report_json`` add what
the audit itself does not know: where the data came from and whose key verified it (an auditor
that took the key from the operator it audits should be told to pin it).

The JSON document (``report_json``), stable for scripts::

    {"ok": bool, "source": str, "origin": str,
     "verifier_key": str, "verifier_key_pinned": bool,
     "entries": int, "claimed_entries": int, "accounts": int,
     "tree": {"size": int, "root": base64},
     "latest_checkpoint": {"size": int, "root": base64} | null, "checkpoints_verified": int,
     "trusted_checkpoint": {"size": int, "root": base64} | null,
     "holds": {"open": int, "open_amount": int, "escrow_balance": int},   # micro-units
     "elapsed_s": float, "entries_per_s": float,
     "findings": [{"code": str, "message": str, "seq": int | null}, ...],
     "finding_counts": {code: int}, "findings_omitted": int,
     "notes": [str, ...]}
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from ledger.checkpoint import Checkpoint
from ledger.money import format_credits

BAR_WIDTH = 30  # characters between the brackets of the progress bar
_UNPINNED_NOTE = (
    "the verifier key was taken from the operator being audited; pin it with --verifier-key"
)


@dataclass(frozen=True, slots=True)
class Finding:
    """One broken promise."""

    code: str  # stable machine-readable kind, e.g. "entry.prev_hash"
    message: str  # what was found, for people
    seq: int | None = None  # position of the entry it concerns; None for log-wide findings


@dataclass(frozen=True)
class AuditReport:
    """Everything one audit found; ``ok`` when there is nothing to report."""

    entries: int  # entries read, well-formed or not: the replayed tree's size
    claimed_entries: int  # entries the operator said it would send
    root: bytes  # root of the replayed tree
    latest_checkpoint: Checkpoint | None  # the biggest checkpoint whose signature verified
    checkpoints_verified: int  # checkpoints whose signature verified
    trusted: Checkpoint | None  # the auditor's own earlier checkpoint, if one was given
    accounts: int  # distinct accounts in the entries
    open_holds: int  # holds in flight at the end of the log (fine, but counted)
    open_hold_amount: int  # micro-units those holds reserve
    escrow_balance: int  # the escrow account's replayed balance; must equal open_hold_amount
    elapsed_s: float  # wall time of the audit, downloading included
    findings: tuple[Finding, ...]  # the first ones, in the order found (see omitted)
    finding_counts: Mapping[str, int] = field(default_factory=dict)  # by code, all of them
    omitted: int = 0  # findings counted in finding_counts but not kept in findings

    @property
    def ok(self) -> bool:
        return not self.finding_counts

    @property
    def tree_size(self) -> int:
        return self.entries

    @property
    def entries_per_s(self) -> float:
        return self.entries / self.elapsed_s if self.elapsed_s > 0 else 0.0


def _head(checkpoint: Checkpoint | None) -> dict[str, object] | None:
    if checkpoint is None:
        return None
    return {"size": checkpoint.size, "root": _b64(checkpoint.root_hash)}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _notes(key_pinned: bool, notes: Sequence[str]) -> list[str]:
    return [*([] if key_pinned else [_UNPINNED_NOTE]), *notes]


def report_json(
    report: AuditReport,
    *,
    source: str,
    origin: str,
    verifier_key: str,
    key_pinned: bool,
    notes: Sequence[str] = (),
) -> dict[str, object]:
    """The report as the JSON document described in the module docstring."""
    return {
        "ok": report.ok,
        "source": source,
        "origin": origin,
        "verifier_key": verifier_key,
        "verifier_key_pinned": key_pinned,
        "entries": report.entries,
        "claimed_entries": report.claimed_entries,
        "accounts": report.accounts,
        "tree": {"size": report.tree_size, "root": _b64(report.root)},
        "latest_checkpoint": _head(report.latest_checkpoint),
        "checkpoints_verified": report.checkpoints_verified,
        "trusted_checkpoint": _head(report.trusted),
        "holds": {
            "open": report.open_holds,
            "open_amount": report.open_hold_amount,
            "escrow_balance": report.escrow_balance,
        },
        "elapsed_s": round(report.elapsed_s, 3),
        "entries_per_s": round(report.entries_per_s, 1),
        "findings": [{"code": f.code, "message": f.message, "seq": f.seq} for f in report.findings],
        "finding_counts": dict(sorted(report.finding_counts.items())),
        "findings_omitted": report.omitted,
        "notes": _notes(key_pinned, notes),
    }


def render_text(
    report: AuditReport,
    *,
    source: str,
    origin: str,
    verifier_key: str,
    key_pinned: bool,
    notes: Sequence[str] = (),
) -> str:
    """The report for people: a summary, then the findings (the first ones, if there are many)."""
    latest = report.latest_checkpoint
    trusted = report.trusted
    rows = [
        ("log", f"{origin} at {source}"),
        ("key", verifier_key + ("" if key_pinned else " (from the operator, not pinned)")),
        ("entries", f"{report.entries:,} (claimed {report.claimed_entries:,})"),
        ("accounts", f"{report.accounts:,}"),
        ("tree", f"size {report.tree_size:,}, root {_b64(report.root)}"),
        (
            "checkpoints",
            f"{report.checkpoints_verified:,} verified"
            + (f", latest size {latest.size:,}" if latest else ", none"),
        ),
        ("trusted", f"size {trusted.size:,}, root {_b64(trusted.root_hash)}" if trusted else "-"),
        (
            "holds",
            f"{report.open_holds:,} open for {format_credits(report.open_hold_amount)} credits;"
            f" escrow {format_credits(report.escrow_balance)}",
        ),
        (
            "speed",
            f"{report.elapsed_s:.2f} s, {report.entries_per_s:,.0f} entries/s",
        ),
    ]
    lines = [f"{name:<12} {value}" for name, value in rows]
    lines += [f"note: {note}" for note in _notes(key_pinned, notes)]
    lines.append("")
    if report.ok:
        lines.append("OK: no findings")
        return "\n".join(lines) + "\n"
    total = sum(report.finding_counts.values())
    lines.append(f"FAILED: {total:,} finding(s)")
    width = max(len(code) for code in report.finding_counts)
    lines += [
        f"  {code:<{width}}  {count:,}" for code, count in sorted(report.finding_counts.items())
    ]
    lines.append("")
    for finding in report.findings:
        where = "" if finding.seq is None else f" [entry {finding.seq}]"
        lines.append(f"{finding.code}{where}: {finding.message}")
    if report.omitted:
        lines.append(f"... and {report.omitted:,} more not listed (counted above)")
    return "\n".join(lines) + "\n"


class ProgressBar:
    """``\\r[#####     ] 52%  1.2M entries`` on a terminal; a ``progress`` callback for ``audit``.

    Redraws at most every ``interval_s`` so that a fast audit does not spend its time drawing.
    """

    def __init__(self, out: TextIO, *, interval_s: float = 0.1) -> None:
        self._out = out
        self._interval_s = interval_s
        self._drawn_at = float("-inf")
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._drawn_at < self._interval_s and done < total:
            return
        self._drawn_at = now
        fraction = min(done / total, 1.0) if total > 0 else 1.0
        filled = round(fraction * BAR_WIDTH)
        bar = "#" * filled + " " * (BAR_WIDTH - filled)
        self._out.write(f"\r[{bar}] {fraction:4.0%}  {_count(done)} entries")
        self._out.flush()
        self._drawn = True

    def close(self) -> None:
        """End the bar's line, if one was drawn, so that what follows starts on its own."""
        if self._drawn:
            self._out.write("\n")
            self._out.flush()
            self._drawn = False


def _count(n: int) -> str:
    """1234 -> "1234", 1_234_567 -> "1.2M"."""
    for at_least, unit, suffix in ((10**9, 10**9, "G"), (10**6, 10**6, "M"), (10**4, 10**3, "k")):
        if n >= at_least:
            return f"{n / unit:.1f}{suffix}"
    return str(n)
