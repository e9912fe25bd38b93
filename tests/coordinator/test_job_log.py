"""JobLog: every finished job gets its row; jobs that finish together share one insert."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg
import pytest

from coordinator.billing.job_log import JobLog, JobRecord

if TYPE_CHECKING:
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]


def record(n: int, *, key_id: str = "key_a", cost: int = 10) -> JobRecord:
    return JobRecord(
        job_id=f"job-{n}",
        key_id=key_id,
        miner_id="miner",
        model="tiny",
        prompt_tokens=3,
        completion_tokens=n,
        cost=cost,
        finish_reason="stop" if n % 2 else None,
        receipt=bytes([n % 256]) * 4 if n % 3 else None,
        receipt_signature=None,
    )


class CountingPool:
    """The pool, counting the INSERT statements that reach it."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self.inserts = 0

    async def execute(self, query: str, *args: Any) -> str:
        if query.startswith("INSERT"):
            self.inserts += 1
        return await self._pool.execute(query, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


async def test_jobs_that_finish_together_share_an_insert(db_pool: Pool) -> None:
    await JobLog.create(db_pool)
    counting = CountingPool(db_pool)
    log = JobLog(counting)  # type: ignore[arg-type]
    await asyncio.gather(*(log.record(record(n)) for n in range(1, 51)))
    await log.aclose()
    assert counting.inserts < 50  # the first goes alone, the others wait and go together
    rows = await db_pool.fetch(
        "SELECT job_id, completion_tokens, finish_reason, receipt FROM coordinator_jobs"
    )
    stored = {row["job_id"]: row for row in rows}
    assert len(stored) == 50
    for n in range(1, 51):
        expected = record(n)
        row = stored[expected.job_id]
        assert row["completion_tokens"] == n
        assert row["finish_reason"] == expected.finish_reason
        assert row["receipt"] == expected.receipt
    assert await log.spent("key_a") == 500


async def test_a_bad_row_fails_alone(db_pool: Pool) -> None:
    log = await JobLog.create(db_pool)
    await log.record(record(1))
    results = await asyncio.gather(
        log.record(record(2)),
        log.record(record(1)),  # the same job id again: refused by the primary key
        log.record(record(3)),
        return_exceptions=True,
    )
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], asyncpg.UniqueViolationError)
    totals = await log.totals("key_a")
    assert totals.requests == 3 and totals.completion_tokens == 1 + 2 + 3


async def test_aclose_waits_for_the_jobs_in_flight(db_pool: Pool) -> None:
    log = await JobLog.create(db_pool)
    pending = [asyncio.ensure_future(log.record(record(n))) for n in range(1, 6)]
    await asyncio.sleep(0)  # handed over, not yet written
    await log.aclose()
    assert (await log.totals("key_a")).requests == 5  # written before aclose returned
    await asyncio.wait_for(asyncio.gather(*pending), 1)


@pytest.mark.parametrize("count", [1, 2])
async def test_history_sees_what_was_recorded(db_pool: Pool, count: int) -> None:
    log = await JobLog.create(db_pool)
    for n in range(1, count + 1):
        await log.record(record(n, key_id="key_b", cost=7))
    history = await log.history("key_b", limit=10)
    assert sorted(job.job_id for job in history) == [f"job-{n}" for n in range(1, count + 1)]
    assert await log.spent("key_b") == 7 * count
