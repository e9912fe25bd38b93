"""Tables for the operator's commands: ``meshmint-coordinator miners`` and ``keys list``."""

from __future__ import annotations

import asyncpg

from coordinator.billing.keys import KeyStore
from coordinator.ops.miner_snapshot import connected_miners
from coordinator.verification.policy import VerificationConfig, check_rate
from coordinator.verification.trust import list_identities
from ledger.interface import AccountKind, AccountRef, Ledger, UnknownAccountError
from ledger.money import format_credits


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


async def miners_report(
    pool: asyncpg.Pool[asyncpg.Record],
    *,
    vetted: frozenset[str] = frozenset(),
    fresh_within_s: float = 15.0,
) -> str:
    """Connected miners, on every coordinator replica (the first 8 characters of its id; '-'
    for a coordinator that runs alone), with their models, load, measured speed and spot-check
    record; a miner in ``vetted`` (``miners vet``) is marked so in its status."""
    miners = await connected_miners(pool, fresh_within_s=fresh_within_s)
    trust = {record.miner_id: record for record in await list_identities(pool)}
    config = VerificationConfig()
    lines = [
        f"{'miner':<16} {'replica':<8} {'models':<24} {'device':<20} {'load':>7} {'ttft ms':>8} "
        f"{'tok/s':>7} {'checks':>11} {'rate':>6}  status"
    ]
    for miner in miners:
        record = trust.get(miner.miner_id)
        checks = (
            f"{record.checks_passed}/{record.checks_run}"
            + (f" !{record.confirmed_failures}" if record.confirmed_failures else "")
            if record is not None
            else "0/0"
        )
        rate = check_rate(record.consecutive_valid if record else 0, config)
        status = ("draining" if miner.draining else "serving") + (
            ", vetted" if miner.miner_id in vetted else ""
        )
        lines.append(
            f"{miner.miner_id[:16]:<16} {miner.replica_id[:8] or '-':<8} "
            f"{','.join(miner.models)[:24]:<24} "
            f"{miner.device[:20]:<20} {f'{miner.active_jobs}/{miner.max_concurrency}':>7} "
            f"{_number(miner.ttft_ms, 1):>8} {_number(miner.tokens_per_s, 1):>7} "
            f"{checks:>11} {rate:>6.1%}  {status}"
        )
    if not miners:
        lines.append("(no miner connected, or the coordinator is not running)")
    lines.append("checks: passed/run, !N = confirmed failures; rate: share of jobs re-scored")
    return "\n".join(lines) + "\n"


async def keys_report(keys: KeyStore, ledger: Ledger) -> str:
    """Every API key with its state, spend limit and balance (never the secrets)."""
    lines = [
        f"{'key':<21} {'name':<20} {'created':<16} {'status':<8} {'limit':>12} {'balance':>14}"
    ]
    for key in await keys.list_keys():
        try:
            balance = format_credits(
                await ledger.balance(AccountRef(AccountKind.BUYER, key.key_id))
            )
        except UnknownAccountError:
            balance = "-"
        limit = format_credits(key.spend_limit) if key.spend_limit is not None else "none"
        status = "revoked" if key.revoked_at is not None else "active"
        lines.append(
            f"{key.key_id:<21} {key.name[:20]:<20} {key.created_at:%Y-%m-%d %H:%M} "
            f"{status:<8} {limit:>12} {balance:>14}"
        )
    return "\n".join(lines)
