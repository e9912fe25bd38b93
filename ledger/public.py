"""The read-only view of the ledger published to auditors and miners."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from ledger.interface import AccountKind, AccountRef
from ledger.log_reader import LogReader


@dataclass(frozen=True)
class BalanceSnapshot:
    """Every account's balance as of one log size (taken in one database snapshot)."""

    size: int  # entries in the log when the balances were read
    balances: dict[str, int]  # "kind" or "kind:owner" -> micro-units


class PublishedLedger:
    """Implements ``coordinator.api.PublicLedger`` on the ledger's tables."""

    def __init__(
        self, pool: asyncpg.Pool[asyncpg.Record], *, origin: str, verifier_key: str
    ) -> None:
        self.origin = origin
        self.verifier_key = verifier_key
        self._pool = pool
        self._reader = LogReader(pool)

    async def latest_checkpoint(self) -> bytes | None:
        latest = await self._reader.latest_checkpoint()
        return latest.note if latest else None

    async def checkpoints(self, start: int, limit: int) -> list[bytes]:
        return [stored.note for stored in await self._reader.checkpoints(start, limit)]

    async def entries(self, start: int, limit: int) -> list[bytes]:
        return await self._reader.entries(start, limit)

    async def balances(self) -> BalanceSnapshot:
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            head = await conn.fetchrow("SELECT size FROM ledger_head")
            rows = await conn.fetch("SELECT kind, owner, balance FROM ledger_accounts")
        # Labels are AccountRef's own spelling ("fee", "buyer:key_..."), as the auditor expects.
        balances = {
            str(AccountRef(AccountKind(row["kind"]), row["owner"])): row["balance"] for row in rows
        }
        return BalanceSnapshot(size=head["size"] if head else 0, balances=balances)

    async def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        return await self._reader.inclusion_proof(index, size)

    async def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        return await self._reader.consistency_proof(old_size, new_size)
