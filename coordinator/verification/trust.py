"""What the coordinator knows of each identity's honesty, kept in PostgreSQL.

One row per identity (a miner's public key, whether it served the checked job or scored it):
its run of consecutive valid checks (which sets its check rate), counters for operators, the
pooled statistics of its checked jobs per scorer, and whether its key is banned. Every check's
outcome is also appended to ``verification_checks``, which is what ``meshmint-coordinator
checks`` and a slashed miner's questions are answered from.

Replicas each cache the records; every save announces the identity on ``meshmint_trust``
(``pg_notify`` in the same statement), and :meth:`TrustStore.watching` reloads announced records,
so a key one replica banned is refused by every replica at once (a full reload every
``refresh_s`` is the backstop for a listener that is down).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from coordinator.pg_listener import follow
from coordinator.verification.judge import PooledStats

logger = logging.getLogger(__name__)

CHANNEL = "meshmint_trust"
"""Where saved records are announced; the payload is the miner id."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS verification_identities (
    miner_id           text PRIMARY KEY,
    consecutive_valid  integer NOT NULL DEFAULT 0,
    checks_run         bigint NOT NULL DEFAULT 0,
    checks_passed      bigint NOT NULL DEFAULT 0,
    checks_failed      bigint NOT NULL DEFAULT 0,
    confirmed_failures integer NOT NULL DEFAULT 0,
    scorings           bigint NOT NULL DEFAULT 0,
    contradicted       integer NOT NULL DEFAULT 0,
    banned             boolean NOT NULL DEFAULT false,
    last_failure       text NOT NULL DEFAULT '',
    pools              jsonb NOT NULL DEFAULT '{}',
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS verification_checks (
    id          bigserial PRIMARY KEY,
    job_id      text NOT NULL,
    miner_id    text NOT NULL,
    outcome     text NOT NULL,
    scorers     text[] NOT NULL,
    reasons     text NOT NULL DEFAULT '',
    slashed     bigint NOT NULL DEFAULT 0,
    refunded    bigint NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS verification_checks_miner ON verification_checks (miner_id, id);
"""

_COLUMNS = (
    "consecutive_valid",
    "checks_run",
    "checks_passed",
    "checks_failed",
    "confirmed_failures",
    "scorings",
    "contradicted",
    "banned",
    "last_failure",
)


@dataclass
class TrustRecord:
    """One identity's record. Mutated by the checker under the store's lock, then saved."""

    miner_id: str  # hex public key
    consecutive_valid: int = 0  # valid checks (of its jobs or its scores) since the last failure
    checks_run: int = 0  # its jobs that were scored
    checks_passed: int = 0  # ... and passed
    checks_failed: int = 0  # ... and a scorer failed
    confirmed_failures: int = 0  # failures two scorers agreed on (each one slashed)
    scorings: int = 0  # score jobs it answered for others
    contradicted: int = 0  # times it was outvoted as a scorer by two others
    banned: bool = False  # its key is refused
    last_failure: str = ""  # why it was last failed, for the operator and the miner
    pools: dict[str, PooledStats] = field(default_factory=dict)  # its checked jobs, per scorer


@dataclass(frozen=True)
class CheckRecord:
    """One row of ``verification_checks``."""

    job_id: str  # the checked job
    miner_id: str  # who ran it
    outcome: str  # passed, failed, confirmed, disputed, overturned, skipped
    scorers: tuple[str, ...]  # who scored it, in order
    reasons: str = ""  # the failing verdicts' reasons
    slashed: int = 0  # micro-units taken from the miner (refund included)
    refunded: int = 0  # micro-units given back to the buyer
    created_at: datetime | None = None  # set by the database


def _pools_to_json(pools: dict[str, PooledStats]) -> str:
    return json.dumps(
        {
            scorer: {
                "jobs": stats.jobs,
                "tokens": stats.tokens,
                "disagreeing": stats.disagreeing,
                "sum_abs_dlogprob": stats.sum_abs_dlogprob,
            }
            for scorer, stats in pools.items()
        },
        sort_keys=True,
    )


def _pools_from_json(text: str) -> dict[str, PooledStats]:
    return {
        scorer: PooledStats(
            jobs=int(value["jobs"]),
            tokens=int(value["tokens"]),
            disagreeing=int(value["disagreeing"]),
            sum_abs_dlogprob=float(value["sum_abs_dlogprob"]),
        )
        for scorer, value in json.loads(text).items()
    }


def _record(row: asyncpg.Record) -> TrustRecord:
    return TrustRecord(
        miner_id=row["miner_id"],
        **{column: row[column] for column in _COLUMNS},
        pools=_pools_from_json(row["pools"]),
    )


class TrustStore:
    """Identities' records, cached in memory and written through to PostgreSQL."""

    def __init__(self, pool: asyncpg.Pool[asyncpg.Record], records: dict[str, TrustRecord]) -> None:
        self._pool = pool
        self._records = records
        # Checks of the same identity may finish together; their updates are serialized.
        self.lock = asyncio.Lock()

    @classmethod
    async def create(cls, pool: asyncpg.Pool[asyncpg.Record]) -> TrustStore:
        async with pool.acquire() as connection:
            await connection.execute(_SCHEMA)
            rows = await connection.fetch("SELECT * FROM verification_identities")
        return cls(pool, {row["miner_id"]: _record(row) for row in rows})

    def get(self, miner_id: str) -> TrustRecord:
        """The identity's record (a fresh one for an identity never seen)."""
        record = self._records.get(miner_id)
        if record is None:
            record = self._records[miner_id] = TrustRecord(miner_id)
        return record

    def is_banned(self, miner_id: str) -> bool:
        record = self._records.get(miner_id)
        return record is not None and record.banned

    async def save(self, record: TrustRecord) -> None:
        columns = ", ".join(_COLUMNS)
        placeholders = ", ".join(f"${index}" for index in range(2, len(_COLUMNS) + 2))
        # A ban and the confirmed failures behind it only ever grow: a replica saving a stale
        # copy of the record must not take them back.
        sticky = {
            "banned": "verification_identities.banned OR EXCLUDED.banned",
            "confirmed_failures": "GREATEST(verification_identities.confirmed_failures, "
            "EXCLUDED.confirmed_failures)",
        }
        updates = ", ".join(
            f"{column} = {sticky.get(column, f'EXCLUDED.{column}')}" for column in _COLUMNS
        )
        await self._pool.execute(
            f"INSERT INTO verification_identities (miner_id, {columns}, pools) "
            f"VALUES ($1, {placeholders}, ${len(_COLUMNS) + 2}::jsonb) "
            f"ON CONFLICT (miner_id) DO UPDATE SET {updates}, pools = EXCLUDED.pools, "
            f"updated_at = now() RETURNING pg_notify('{CHANNEL}', miner_id)",
            record.miner_id,
            *(getattr(record, column) for column in _COLUMNS),
            _pools_to_json(record.pools),
        )

    @asynccontextmanager
    async def watching(self, *, refresh_s: float = 10.0) -> AsyncIterator[None]:
        """Keeps the cache current with other processes' saves while the block runs."""
        task = asyncio.create_task(
            follow(
                self._pool,
                channel=CHANNEL,
                reload=self._reload,  # the announced identities, or all for the backstop
                refresh_s=refresh_s,
                what="trust changes",
                on_reload_failure=lambda error: logger.warning(
                    "cannot reload trust records (%r); retrying", error
                ),
            ),
            name="meshmint-trust-watcher",
        )
        try:
            yield
        finally:
            task.cancel()
            await asyncio.wait([task])

    async def _reload(self, miner_ids: frozenset[str] | None) -> None:
        rows = await self._pool.fetch(
            "SELECT * FROM verification_identities WHERE $1::text[] IS NULL OR miner_id = ANY($1)",
            None if miner_ids is None else sorted(miner_ids),
        )
        async with self.lock:  # never swap a record this process is updating
            for row in rows:
                self._records[row["miner_id"]] = _record(row)

    async def record_check(self, check: CheckRecord) -> None:
        await self._pool.execute(
            "INSERT INTO verification_checks "
            "(job_id, miner_id, outcome, scorers, reasons, slashed, refunded) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7)",
            check.job_id,
            check.miner_id,
            check.outcome,
            list(check.scorers),
            check.reasons,
            check.slashed,
            check.refunded,
        )


async def list_identities(pool: asyncpg.Pool[asyncpg.Record]) -> list[TrustRecord]:
    """Every identity's record, most checked first (for the operator's command)."""
    async with pool.acquire() as connection:
        await connection.execute(_SCHEMA)
        rows = await connection.fetch(
            "SELECT * FROM verification_identities ORDER BY checks_run DESC, miner_id"
        )
    return [_record(row) for row in rows]


async def recent_checks(
    pool: asyncpg.Pool[asyncpg.Record], *, miner_id: str | None = None, limit: int = 20
) -> Sequence[CheckRecord]:
    """The newest check outcomes, of one identity or of all."""
    async with pool.acquire() as connection:
        await connection.execute(_SCHEMA)
        rows = await connection.fetch(
            "SELECT * FROM verification_checks WHERE $1::text IS NULL OR miner_id = $1 "
            "ORDER BY id DESC LIMIT $2",
            miner_id,
            limit,
        )
    return [
        CheckRecord(
            job_id=row["job_id"],
            miner_id=row["miner_id"],
            outcome=row["outcome"],
            scorers=tuple(row["scorers"]),
            reasons=row["reasons"],
            slashed=row["slashed"],
            refunded=row["refunded"],
            created_at=row["created_at"],
        )
        for row in rows
    ]
