"""The connected miners, written to PostgreSQL every few seconds for the `miners` command.

Miner workers live in the coordinator's memory; the operator's commands talk to the database
(like ``keys`` and ``checks``), so each coordinator replica publishes a snapshot of its registry
into ``coordinator_miners``: one row per connected miner with its models, hardware, load and
measured speed, tagged with the replica's id. A replica rewrites and deletes only its own rows;
those of a replica that died are deleted by the sweep that cleans up after it
(:func:`delete_replica_miners`, ``coordinator.replicas.lease``), and until then they age: rows
older than a few intervals belong to a coordinator that stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from coordinator.dispatch.registry import MinerRegistry
from coordinator.worker import Worker

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS coordinator_miners (
    replica_id       text NOT NULL DEFAULT '',
    miner_id         text NOT NULL,
    models           text[] NOT NULL,
    device           text NOT NULL,
    active_jobs      integer NOT NULL,
    max_concurrency  integer NOT NULL,
    draining         boolean NOT NULL,
    ttft_ms          double precision,
    tokens_per_s     double precision,
    connected_at     timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (replica_id, miner_id)
);
-- A table made before replicas (keyed by miner_id alone) gets the replica column and key. Its
-- rows are a snapshot that is rewritten every few seconds, so nothing in it needs keeping.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_attribute
        WHERE attrelid = 'coordinator_miners'::regclass AND attname = 'replica_id'
            AND NOT attisdropped
    ) THEN
        ALTER TABLE coordinator_miners ADD COLUMN replica_id text NOT NULL DEFAULT '';
        ALTER TABLE coordinator_miners DROP CONSTRAINT coordinator_miners_pkey;
        ALTER TABLE coordinator_miners ADD PRIMARY KEY (replica_id, miner_id);
    END IF;
END
$$;
"""

# pg_advisory_xact_lock key serialising the schema: replicas starting together must not collide
# in the catalog ("mmminers").
_SCHEMA_LOCK_KEY = 0x6D6D6D696E657273


@dataclass(frozen=True)
class MinerRow:
    """One connected miner as last published."""

    replica_id: str  # the coordinator replica it is connected to ('' for a lone coordinator)
    miner_id: str  # hex public key
    models: list[str]  # catalog names it serves
    device: str  # announced hardware
    active_jobs: int  # jobs in flight
    max_concurrency: int  # its slots
    draining: bool  # shutting down: takes no new jobs
    ttft_ms: float | None  # moving average time to first token; None before any job
    tokens_per_s: float | None  # moving average decode speed; None before any job
    connected_at: datetime  # when its worker began
    updated_at: datetime  # when this row was written


def _speed(worker: Worker) -> tuple[float | None, float | None]:
    ttft = worker.speed.ttft_s
    return (ttft * 1000 if ttft is not None else None), worker.speed.tokens_per_s


async def _create_schema(pool: asyncpg.Pool[asyncpg.Record]) -> None:
    async with pool.acquire() as connection, connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK_KEY)
        await connection.execute(_SCHEMA)


class MinerSnapshots:
    """Publishes the registry every ``interval_s`` seconds while running, as the rows of
    replica ``replica_id`` ('' for a coordinator that runs alone)."""

    def __init__(
        self,
        pool: asyncpg.Pool[asyncpg.Record],
        *,
        registry: MinerRegistry,
        interval_s: float,
        replica_id: str = "",
    ) -> None:
        self._pool = pool
        self._registry = registry
        self._interval_s = interval_s
        self._replica_id = replica_id

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        await _create_schema(self._pool)
        task = asyncio.create_task(self._publish_forever(), name="miner-snapshots")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(Exception):  # best effort: the rows say when they were written
                await delete_replica_miners(self._pool, self._replica_id)

    async def publish(self) -> None:
        now_monotonic = time.monotonic()
        rows = []
        for worker in self._registry.workers():
            if worker.closed_reason is not None or not worker.is_local:
                continue
            ttft_ms, tokens_per_s = _speed(worker)
            age_s = max(0.0, now_monotonic - worker.connected_at)
            rows.append(
                (
                    self._replica_id,
                    worker.miner_id,
                    sorted(worker.models),
                    worker.device_name or worker.accelerator,
                    worker.active_jobs,
                    worker.max_concurrency,
                    worker.draining,
                    ttft_ms,
                    tokens_per_s,
                    age_s,
                )
            )
        async with self._pool.acquire() as connection, connection.transaction():
            await connection.execute(
                "DELETE FROM coordinator_miners WHERE replica_id = $1", self._replica_id
            )
            await connection.executemany(
                "INSERT INTO coordinator_miners (replica_id, miner_id, models, device, "
                "active_jobs, max_concurrency, draining, ttft_ms, tokens_per_s, connected_at) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, now() - make_interval(secs => $10))",
                rows,
            )

    async def _publish_forever(self) -> None:
        while True:
            try:
                await self.publish()
            except (OSError, asyncpg.PostgresError) as error:
                logger.warning("could not publish the miner snapshot: %s", error)
            await asyncio.sleep(self._interval_s)


async def delete_replica_miners(pool: asyncpg.Pool[asyncpg.Record], replica_id: str) -> int:
    """Deletes replica ``replica_id``'s rows; returns how many. A cleanup of
    ``coordinator.replicas.lease.ReplicaLease`` (for a replica that is gone); idempotent."""
    try:
        status = await pool.execute(
            "DELETE FROM coordinator_miners WHERE replica_id = $1", replica_id
        )
    except asyncpg.UndefinedTableError:
        return 0  # no snapshot was ever published in this database
    return int(status.split()[-1])


async def connected_miners(
    pool: asyncpg.Pool[asyncpg.Record], *, fresh_within_s: float
) -> list[MinerRow]:
    """Miners in the latest snapshots of every replica, when recent enough to describe a live
    coordinator. A miner that just moved between replicas may be listed by both for a moment."""
    await _create_schema(pool)
    rows = await pool.fetch(
        "SELECT * FROM coordinator_miners "
        "WHERE updated_at > now() - make_interval(secs => $1) ORDER BY miner_id, replica_id",
        fresh_within_s,
    )
    return [MinerRow(**dict(row)) for row in rows]
