"""The connected miners, written to PostgreSQL every few seconds for the `miners` command.

Miner workers live in the coordinator's memory; the operator's commands talk to the database
(like ``keys`` and ``checks``), so the coordinator publishes a snapshot of its registry into
``coordinator_miners``: one row per connected miner with its models, hardware, load and measured
speed. Rows older than a few intervals belong to a coordinator that stopped.
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
    miner_id         text PRIMARY KEY,
    models           text[] NOT NULL,
    device           text NOT NULL,
    active_jobs      integer NOT NULL,
    max_concurrency  integer NOT NULL,
    draining         boolean NOT NULL,
    ttft_ms          double precision,
    tokens_per_s     double precision,
    connected_at     timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
"""


@dataclass(frozen=True)
class MinerRow:
    """One connected miner as last published."""

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


class MinerSnapshots:
    """Publishes the registry every ``interval_s`` seconds while running."""

    def __init__(
        self, pool: asyncpg.Pool[asyncpg.Record], *, registry: MinerRegistry, interval_s: float
    ) -> None:
        self._pool = pool
        self._registry = registry
        self._interval_s = interval_s

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with self._pool.acquire() as connection:
            await connection.execute(_SCHEMA)
        task = asyncio.create_task(self._publish_forever(), name="miner-snapshots")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(Exception):  # best effort: the rows say when they were written
                await self._pool.execute("DELETE FROM coordinator_miners")

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
            await connection.execute("DELETE FROM coordinator_miners")
            await connection.executemany(
                "INSERT INTO coordinator_miners (miner_id, models, device, active_jobs, "
                "max_concurrency, draining, ttft_ms, tokens_per_s, connected_at) VALUES "
                "($1, $2, $3, $4, $5, $6, $7, $8, now() - make_interval(secs => $9))",
                rows,
            )

    async def _publish_forever(self) -> None:
        while True:
            try:
                await self.publish()
            except (OSError, asyncpg.PostgresError) as error:
                logger.warning("could not publish the miner snapshot: %s", error)
            await asyncio.sleep(self._interval_s)


async def connected_miners(
    pool: asyncpg.Pool[asyncpg.Record], *, fresh_within_s: float
) -> list[MinerRow]:
    """Miners in the latest snapshot, when it is recent enough to describe a live coordinator."""
    async with pool.acquire() as connection:
        await connection.execute(_SCHEMA)
        rows = await connection.fetch(
            "SELECT * FROM coordinator_miners "
            "WHERE updated_at > now() - make_interval(secs => $1) ORDER BY miner_id",
            fresh_within_s,
        )
    return [MinerRow(**dict(row)) for row in rows]
