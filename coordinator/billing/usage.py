"""A buyer's own view of its key: balance, spend, limits, and the history of its requests.

Served as ``GET /v1/key`` and ``GET /v1/usage`` (coordinator/http/usage_routes.py). Amounts are
reported in credits (floats, like OpenRouter's ``usage``) and in exact micro-units.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from coordinator.api import Buyer
from coordinator.billing.job_log import JobLog, LoggedJob, UsageTotals
from coordinator.billing.keys import KeyStore
from ledger.interface import AccountKind, AccountRef, Ledger, UnknownAccountError

MAX_HISTORY = 100


@dataclass(frozen=True)
class KeyUsage:
    """The key's standing."""

    key_id: str  # public id of the key
    name: str  # the operator's label for it
    balance: int  # micro-units available now (holds of requests in flight excluded)
    spend_limit: int | None  # micro-units it may spend in all; None: no limit
    totals: UsageTotals  # everything it was charged, over all its requests
    refunded: int  # micro-units given back after failed spot checks of its requests


@dataclass(frozen=True)
class UsageEntry:
    """One request in the key's history."""

    job: LoggedJob  # what was served and charged
    refunded: int  # micro-units given back when a spot check confirmed the miner cheated


class UsageService:
    """Reads a buyer's standing and history from the job log, the key store and the ledger."""

    def __init__(
        self, pool: asyncpg.Pool[asyncpg.Record], *, keys: KeyStore, ledger: Ledger, jobs: JobLog
    ) -> None:
        self._pool = pool
        self._keys = keys
        self._ledger = ledger
        self._jobs = jobs

    async def key_usage(self, buyer: Buyer) -> KeyUsage:
        try:
            balance = await self._ledger.balance(AccountRef(AccountKind.BUYER, buyer.key_id))
        except UnknownAccountError:
            balance = 0
        refunded = await self._refunds(buyer.key_id, None)
        return KeyUsage(
            key_id=buyer.key_id,
            name=buyer.name,
            balance=balance,
            spend_limit=await self._keys.spend_limit(buyer.key_id),
            totals=await self._jobs.totals(buyer.key_id),
            refunded=sum(refunded.values()),
        )

    async def history(
        self, buyer: Buyer, *, limit: int, before: datetime | None = None
    ) -> list[UsageEntry]:
        """The newest requests first, older than ``before``; ``limit`` is capped just above
        ``MAX_HISTORY`` (a page and one more, to tell whether there is a next page)."""
        jobs = await self._jobs.history(
            buyer.key_id, limit=max(1, min(limit, MAX_HISTORY + 1)), before=before
        )
        refunded = await self._refunds(buyer.key_id, [job.job_id for job in jobs])
        return [UsageEntry(job=job, refunded=refunded.get(job.job_id, 0)) for job in jobs]

    async def _refunds(self, key_id: str, job_ids: list[str] | None) -> dict[str, int]:
        """Refunds of confirmed failed spot checks of the key's jobs, by job id."""
        rows = await self._pool.fetch(
            "SELECT c.job_id, sum(c.refunded) AS refunded FROM verification_checks c "
            "JOIN coordinator_jobs j ON j.job_id = c.job_id "
            "WHERE j.key_id = $1 AND c.outcome = 'confirmed' "
            "AND ($2::text[] IS NULL OR c.job_id = ANY($2)) GROUP BY c.job_id",
            key_id,
            job_ids,
        )
        return {row["job_id"]: int(row["refunded"]) for row in rows}
