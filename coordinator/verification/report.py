"""The operator's view of spot checks: ``meshmint-coordinator checks``."""

from __future__ import annotations

import asyncpg

from coordinator.verification.policy import VerificationConfig, check_rate
from coordinator.verification.trust import list_identities, recent_checks
from ledger.money import format_credits


async def checks_report(
    pool: asyncpg.Pool[asyncpg.Record],
    *,
    miner_id: str | None = None,
    recent: int = 20,
    config: VerificationConfig | None = None,
) -> str:
    """A table of every identity's checks, then the newest checks (of ``miner_id`` or of all)."""
    config = config or VerificationConfig()
    identities = await list_identities(pool)
    lines = [
        f"{'miner':<16} {'run':>6} {'passed':>6} {'failed':>6} {'confirmed':>9} "
        f"{'scored':>6} {'outvoted':>8} {'rate':>6}  status"
    ]
    for record in identities:
        status = "banned" if record.banned else "active"
        if record.last_failure:
            status += f"; last failure: {record.last_failure}"
        lines.append(
            f"{record.miner_id[:16]:<16} {record.checks_run:>6} {record.checks_passed:>6} "
            f"{record.checks_failed:>6} {record.confirmed_failures:>9} {record.scorings:>6} "
            f"{record.contradicted:>8} {check_rate(record.consecutive_valid, config):>6.1%}  "
            f"{status}"
        )
    if not identities:
        lines.append("(no miner has been checked yet)")
    checks = await recent_checks(pool, miner_id=miner_id, limit=recent)
    if checks:
        lines += ["", f"{'when':<19} {'job':<36} {'miner':<16} {'outcome':<12} slashed  refunded"]
    for check in checks:
        when = check.created_at.strftime("%Y-%m-%d %H:%M:%S") if check.created_at else ""
        lines.append(
            f"{when:<19} {check.job_id:<36} {check.miner_id[:16]:<16} {check.outcome:<12} "
            f"{format_credits(check.slashed):>7}  {format_credits(check.refunded):>8}"
        )
        if check.reasons:
            lines.append(f"    {check.reasons}")
    return "\n".join(lines) + "\n"
