"""A record of every completed job: who asked, who served, what was billed, and the receipt.

Spot checks re-score jobs from here, buyers' usage history reads it, and the receipt hash in
each row is the reference of the job's ledger settlement. ``receipt`` holds the exact bytes the
miner signed (``proto.signing.receipt_message``), so anyone with the miner's public key can check
``receipt_signature`` without protobuf (rows written before 2026-12-08 hold the receipt's
protobuf serialization instead; the signed layout starts with ``meshmint/v1/receipt``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from coordinator.api import Buyer
from coordinator.completion import RunningCompletion
from proto.signing import receipt_message

_SCHEMA = """
CREATE TABLE IF NOT EXISTS coordinator_jobs (
    job_id            text PRIMARY KEY,
    key_id            text NOT NULL,
    miner_id          text NOT NULL,
    model             text NOT NULL,
    prompt_tokens     integer NOT NULL,
    completion_tokens integer NOT NULL,
    cost              bigint NOT NULL,
    finish_reason     text,
    receipt           bytea,
    receipt_signature bytea,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS coordinator_jobs_key ON coordinator_jobs (key_id, created_at);
-- Per key, what its logged jobs cost in all (``spent``: the sum of its coordinator_jobs.cost,
-- kept so by the trigger below; a key's row is made with its first job, or by a spend limit's
-- first check) and what its admitted requests in flight may still
-- cost (``held``: the sum of its reservations below). Spend limits (billing/limits.py).
CREATE TABLE IF NOT EXISTS coordinator_key_spend (
    key_id text PRIMARY KEY,
    spent  bigint NOT NULL CHECK (spent >= 0),
    held   bigint NOT NULL DEFAULT 0 CHECK (held >= 0)
);
-- One row per admitted request of a key with a spend limit, until its job is logged (the
-- trigger below moves its amount out of held) or it finishes without one; tagged with the
-- coordinator replica that admitted it, so that a dead replica's are dropped (replicas/lease.py).
CREATE TABLE IF NOT EXISTS coordinator_spend_reservations (
    reservation_id bigserial PRIMARY KEY,
    key_id         text NOT NULL,
    replica_id     text NOT NULL,
    job_id         text,  -- the request's job, when the admission named it
    amount         bigint NOT NULL CHECK (amount > 0),
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS coordinator_spend_reservations_replica
    ON coordinator_spend_reservations (replica_id);
CREATE INDEX IF NOT EXISTS coordinator_spend_reservations_job
    ON coordinator_spend_reservations (job_id) WHERE job_id IS NOT NULL;

-- Every statement that logs jobs moves their keys' spend, in its own transaction: each job's
-- cost into spent, and its reservation (when admitted with its job id) out of held, so a job
-- is never counted twice or zero times, whoever inserts it. A key without a row gets one with
-- its whole history (which includes these jobs: an AFTER trigger sees them); a row another
-- transaction makes meanwhile is a conflict that adds just these jobs' moves. Keys in order,
-- so that concurrent inserts lock the rows of several keys in one order (no deadlock). A
-- trigger rather than more SQL in the insert: its statements take no parameters, so their
-- plans are cached once per connection (the combined statement was re-planned every time).
CREATE OR REPLACE FUNCTION coordinator_jobs_spend() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    WITH reserved AS (
        DELETE FROM coordinator_spend_reservations AS r USING logged AS l
        WHERE r.job_id = l.job_id
        RETURNING r.key_id, r.amount
    ), moves AS (
        SELECT key_id, sum(cost)::bigint AS cost, sum(amount)::bigint AS amount FROM (
            SELECT key_id, cost, 0 AS amount FROM logged
            UNION ALL SELECT key_id, 0, amount FROM reserved
        ) AS each_move GROUP BY key_id
    )
    INSERT INTO coordinator_key_spend AS s (key_id, spent)
    SELECT m.key_id, CASE
        WHEN k.key_id IS NOT NULL THEN m.cost
        ELSE (SELECT COALESCE(sum(j.cost), 0) FROM coordinator_jobs AS j WHERE j.key_id = m.key_id)
        END
    FROM moves AS m LEFT JOIN coordinator_key_spend AS k ON k.key_id = m.key_id
    ORDER BY m.key_id
    ON CONFLICT (key_id) DO UPDATE
    SET spent = s.spent + (SELECT m.cost FROM moves AS m WHERE m.key_id = excluded.key_id),
        held = s.held - (SELECT m.amount FROM moves AS m WHERE m.key_id = excluded.key_id);
    RETURN NULL;
END
$$;
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_trigger
        WHERE tgrelid = 'coordinator_jobs'::regclass AND tgname = 'coordinator_jobs_spend'
    ) THEN
        CREATE TRIGGER coordinator_jobs_spend AFTER INSERT ON coordinator_jobs
            REFERENCING NEW TABLE AS logged
            FOR EACH STATEMENT EXECUTE FUNCTION coordinator_jobs_spend();
    END IF;
END
$$;
"""

# pg_advisory_xact_lock key serialising the schema: replicas starting together must not collide
# in the catalog with concurrent CREATE ... IF NOT EXISTS ("mmjoblog").
_SCHEMA_LOCK_KEY = 0x6D6D6A6F626C6F67


@dataclass(frozen=True)
class JobRecord:
    job_id: str  # the coordinator's id of the job
    key_id: str  # the buyer's API key id
    miner_id: str  # hex public key of the miner that served it
    model: str  # catalog name
    prompt_tokens: int  # counted by the coordinator
    completion_tokens: int  # delivered to the buyer
    cost: int  # micro-units charged
    finish_reason: str | None  # "stop", "length", or None when the job did not finish
    receipt: bytes | None  # the receipt's signed bytes (receipt_message), when the job finished
    receipt_signature: bytes | None  # the miner's signature over it

    @classmethod
    def of(cls, buyer: Buyer, completion: RunningCompletion, *, cost: int) -> JobRecord:
        verified = completion.verified
        return cls(
            job_id=completion.run.job.job_id,
            key_id=buyer.key_id,
            miner_id=completion.run.worker.miner_id,
            model=completion.model,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=len(completion.delivered_ids),
            cost=cost,
            finish_reason=completion.finish_reason,
            receipt=receipt_message(verified.receipt) if verified else None,
            receipt_signature=verified.signature if verified else None,
        )


_INSERT_JOBS = (
    "INSERT INTO coordinator_jobs (job_id, key_id, miner_id, model, prompt_tokens, "
    "completion_tokens, cost, finish_reason, receipt, receipt_signature) "
    "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::integer[], "
    "$6::integer[], $7::bigint[], $8::text[], $9::bytea[], $10::bytea[])"
)


class JobLog:
    """The job table. Rows of jobs that finish while one insert is under way go in the next
    insert together (group commit, as the ledger does), so under load a request costs a share
    of a round trip instead of one; a lone job is written at once. A trigger of the table adds
    the jobs' cost to their keys' ``spent`` (``coordinator_key_spend``) and takes their spend
    reservations' amounts out of ``held`` in each insert's transaction, so spend limits read a
    key's total from one row, and no job counts there twice or not at all. Call :meth:`aclose`
    before the pool closes."""

    def __init__(self, pool: asyncpg.Pool, *, max_batch: int = 500) -> None:
        self.pool = pool  # also the spend guard's (billing/limits.py): it reads what this keeps
        self._max_batch = max_batch
        self._queue: list[tuple[JobRecord, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    @classmethod
    async def create(cls, pool: asyncpg.Pool) -> JobLog:
        async with pool.acquire() as connection, connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK_KEY)
            await connection.execute(_SCHEMA)
        return cls(pool)

    async def record(self, job: JobRecord) -> None:
        """Logs ``job``; returns once its row committed (raises what the insert raised)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((job, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())
        await asyncio.shield(future)

    async def aclose(self) -> None:
        """Waits until every job handed to :meth:`record` is written (or failed)."""
        while self._writer is not None and not self._writer.done():
            await self._writer

    async def _write(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
            try:
                await self._insert([job for job, _ in batch])
            except Exception:
                # One bad row must not fail the others: write them one by one.
                for job, future in batch:
                    await self._write_one(job, future)
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)

    async def _write_one(self, job: JobRecord, future: asyncio.Future[None]) -> None:
        try:
            await self._insert([job])
        except Exception as error:
            if not future.done():
                future.set_exception(error)
        else:
            if not future.done():
                future.set_result(None)

    async def _insert(self, jobs: list[JobRecord]) -> None:
        await self.pool.execute(
            _INSERT_JOBS,
            [job.job_id for job in jobs],
            [job.key_id for job in jobs],
            [job.miner_id for job in jobs],
            [job.model for job in jobs],
            [job.prompt_tokens for job in jobs],
            [job.completion_tokens for job in jobs],
            [job.cost for job in jobs],
            [job.finish_reason for job in jobs],
            [job.receipt for job in jobs],
            [job.receipt_signature for job in jobs],
        )

    async def spent(self, key_id: str) -> int:
        """Micro-units charged to the key over all its logged jobs."""
        value = await self.pool.fetchval(
            "SELECT COALESCE(sum(cost), 0) FROM coordinator_jobs WHERE key_id = $1", key_id
        )
        return int(value)

    async def history(
        self, key_id: str, *, limit: int, before: datetime | None = None
    ) -> list[LoggedJob]:
        """The key's newest jobs first, at most ``limit``, older than ``before`` when given."""
        rows = await self.pool.fetch(
            "SELECT job_id, model, prompt_tokens, completion_tokens, cost, finish_reason, "
            "created_at FROM coordinator_jobs WHERE key_id = $1 "
            "AND ($2::timestamptz IS NULL OR created_at < $2) "
            "ORDER BY created_at DESC, job_id DESC LIMIT $3",
            key_id,
            before,
            limit,
        )
        return [LoggedJob(**dict(row)) for row in rows]

    async def totals(self, key_id: str) -> UsageTotals:
        """What the key used over all its logged jobs."""
        row = await self.pool.fetchrow(
            "SELECT count(*) AS requests, COALESCE(sum(prompt_tokens), 0) AS prompt_tokens, "
            "COALESCE(sum(completion_tokens), 0) AS completion_tokens, "
            "COALESCE(sum(cost), 0) AS cost FROM coordinator_jobs WHERE key_id = $1",
            key_id,
        )
        assert row is not None
        return UsageTotals(**{name: int(value) for name, value in dict(row).items()})


@dataclass(frozen=True)
class LoggedJob:
    """One job as a buyer's usage history shows it."""

    job_id: str  # the coordinator's id; the completion id is "cmpl-" + the hex part
    model: str  # catalog name
    prompt_tokens: int  # counted by the coordinator
    completion_tokens: int  # delivered to the buyer
    cost: int  # micro-units charged
    finish_reason: str | None  # "stop", "length", or None when the job did not finish
    created_at: datetime  # when it was settled


@dataclass(frozen=True)
class UsageTotals:
    requests: int  # logged jobs (requests that were billed or finished)
    prompt_tokens: int  # their prompt tokens
    completion_tokens: int  # their delivered completion tokens
    cost: int  # micro-units charged in all
