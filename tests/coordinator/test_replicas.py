"""Several coordinator replicas over one PostgreSQL, each "replica" an asyncpg pool of its own in
this process: spend limits exact under concurrent admissions from all of them, rate limits
shared, and the leases that let a live replica clean up after a dead one, and never after a
live one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, TypeAlias

import asyncpg
import pytest

from coordinator.api import Buyer
from coordinator.billing.job_log import JobLog, JobRecord
from coordinator.billing.limits import (
    LimitsConfig,
    SpendGuard,
    SpendHold,
    drop_spend_reservations,
)
from coordinator.billing.shared_limits import SharedRateLimits
from coordinator.dispatch.registry import MinerRegistry
from coordinator.errors import RateLimitedError, SpendLimitError
from coordinator.ops.admin_report import miners_report
from coordinator.ops.miner_snapshot import MinerSnapshots, connected_miners, delete_replica_miners
from coordinator.replicas.lease import LeaseConfig, ReplicaIdTakenError, ReplicaLease
from ledger.interface import AccountKind, AccountRef, Hold
from ledger.postgres import PostgresLedger
from tests.coordinator.core_fakes import MODEL, bare_session

if TYPE_CHECKING:
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]

BUYER = AccountRef(AccountKind.BUYER, "key_buyer")
WAIT_S = 10.0


@pytest.fixture
async def pools(database_url: str) -> AsyncIterator[list[Pool]]:
    """Three replicas' pools on one database."""
    opened = [await asyncpg.create_pool(database_url, min_size=1, max_size=8) for _ in range(3)]
    try:
        yield opened
    finally:
        for pool in opened:
            await pool.close()


async def eventually(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await condition():
        assert time.monotonic() < deadline, f"not within {WAIT_S} s: {what}"
        await asyncio.sleep(0.05)


def job(n: int, key_id: str, cost: int, *, job_id: str | None = None) -> JobRecord:
    return JobRecord(
        job_id=job_id or f"job-{key_id}-{n}",
        key_id=key_id,
        miner_id="miner",
        model=MODEL,
        prompt_tokens=1,
        completion_tokens=1,
        cost=cost,
        finish_reason="stop",
        receipt=None,
        receipt_signature=None,
    )


async def spend_row(pool: Pool, key_id: str) -> tuple[int, int]:
    row = await pool.fetchrow(
        "SELECT spent, held FROM coordinator_key_spend WHERE key_id = $1", key_id
    )
    assert row is not None
    return row["spent"], row["held"]


async def logged(pool: Pool, key_id: str) -> int:
    return int(
        await pool.fetchval(
            "SELECT COALESCE(sum(cost), 0) FROM coordinator_jobs WHERE key_id = $1", key_id
        )
    )


# --- spend limits --------------------------------------------------------------------------------


async def test_a_spend_limit_hammered_through_three_replicas_admits_exactly_what_fits(
    pools: list[Pool],
) -> None:
    logs = await asyncio.gather(*(JobLog.create(pool) for pool in pools))  # schemas race too
    guards = [SpendGuard(job_log=log, replica_id=f"r{n}") for n, log in enumerate(logs)]
    await logs[0].record(job(0, "key_h", cost=300))  # spent before any limit was checked
    buyer = Buyer("key_h", "hammer", spend_limit=1_000)
    sums: list[int] = []
    hammering = True

    async def watch() -> None:
        while hammering:
            row = await pools[0].fetchrow(
                "SELECT spent, held FROM coordinator_key_spend WHERE key_id = 'key_h'"
            )
            if row is not None:
                sums.append(row["spent"] + row["held"])
            await asyncio.sleep(0)

    jobs = iter(range(1, 1_000))  # job 0 is the one logged before

    async def admit(guard: SpendGuard) -> SpendHold | None:
        try:
            return await guard.admit(buyer, 70, job_id=f"job-key_h-{next(jobs)}")
        except SpendLimitError:
            return None

    watcher = asyncio.create_task(watch())
    results = await asyncio.gather(*(admit(guard) for guard in guards for _ in range(20)))
    admitted = [hold for hold in results if hold is not None]
    assert len(admitted) == (1_000 - 300) // 70  # exactly what fits: 10 of 60
    assert await spend_row(pools[1], "key_h") == (300, 700)
    per_replica = dict(
        await pools[2].fetch(
            "SELECT replica_id, sum(amount) FROM coordinator_spend_reservations GROUP BY 1"
        )
    )
    assert sum(per_replica.values()) == 700

    # Finishing (each logged at cost 20) races more admissions: still never past the limit.
    async def finish(n: int, hold: SpendHold) -> None:
        row = await pools[n % 3].fetchrow(
            "SELECT job_id FROM coordinator_spend_reservations WHERE reservation_id = $1",
            hold.reservation_id,
        )
        assert row is not None
        await logs[n % 3].record(job(0, "key_h", cost=20, job_id=row["job_id"]))
        await guards[n % 3].finished(hold)

    more = await asyncio.gather(
        *(finish(n, hold) for n, hold in enumerate(admitted)),
        *(admit(guard) for guard in guards for _ in range(10)),
    )
    hammering = False
    await watcher
    again = [hold for hold in more if isinstance(hold, SpendHold)]
    spent, held = await spend_row(pools[0], "key_h")
    assert spent == 300 + 20 * len(admitted) == await logged(pools[0], "key_h")
    assert held == 70 * len(again)
    assert sums and max(sums) <= 1_000
    # What is left is admitted exactly, wherever it is asked for.
    last = [await admit(guards[n % 3]) for n in range(10)]
    assert sum(hold is not None for hold in last) == (1_000 - spent - held) // 70
    spent, held = await spend_row(pools[0], "key_h")
    assert spent + held <= 1_000 < spent + held + 70


async def test_finishing_moves_held_to_spent_exactly_once(pools: list[Pool]) -> None:
    log = await JobLog.create(pools[0])
    guard = SpendGuard(job_log=log, replica_id="r0")
    buyer = Buyer("key_f", "f", spend_limit=1_000)
    hold = await guard.admit(buyer, 500, job_id="job-key_f-1")
    assert hold is not None
    assert await spend_row(pools[0], "key_f") == (0, 500)
    await log.record(job(1, "key_f", cost=120))  # logging the job moves it, in one statement
    assert await spend_row(pools[0], "key_f") == (120, 0)
    await guard.finished(hold)  # then the saga's finished changes nothing
    await guard.finished(hold)  # nor does a second time
    assert await drop_spend_reservations(pools[1], "r0") == 0  # nor a sweep after it
    assert await spend_row(pools[0], "key_f") == (120, 0)
    with pytest.raises(SpendLimitError, match=r"0\.000120 spent and 0\.000000 held"):
        await guard.admit(buyer, 881)
    # Admitted without its job id: its cost counts twice from the job's logging to finished().
    hold = await guard.admit(buyer, 500)
    assert hold is not None
    await log.record(job(2, "key_f", cost=80))
    assert await spend_row(pools[0], "key_f") == (200, 500)  # both for a moment, never zero
    await guard.finished(hold)
    assert await spend_row(pools[0], "key_f") == (200, 0)
    # A request that logged no job (no miner took it) gives everything back.
    hold = await guard.admit(buyer, 800, job_id="job-never-logged")
    assert hold is not None
    await guard.finished(hold)
    last = await guard.admit(buyer, 800)  # exactly what is left
    assert last is not None
    assert await guard.admit(Buyer("key_f", "f", spend_limit=None), 10**6) is None  # no query
    assert await guard.admit(buyer, 0) is None


async def test_spent_agrees_with_the_job_log_under_concurrent_writers(pools: list[Pool]) -> None:
    logs = await asyncio.gather(*(JobLog.create(pool) for pool in pools))
    guards = [SpendGuard(job_log=log, replica_id=f"r{n}") for n, log in enumerate(logs)]
    await logs[0].record(job(0, "key_old", cost=7))
    await pools[0].execute("DELETE FROM coordinator_key_spend")  # as before this version
    keys = ["key_old", "key_x", "key_y"]
    # Every replica logs jobs of every key while spend checks make the keys' rows: each cost
    # lands in spent once, whichever came first.
    await asyncio.gather(
        *(logs[n % 3].record(job(n + 1, keys[n % 3], cost=n + 1)) for n in range(90)),
        *(
            guards[n % 3].admit(Buyer(keys[n // 3 % 3], "k", spend_limit=10**9), 1)
            for n in range(30)
        ),
    )
    admitted = {key_id: sum(keys[n // 3 % 3] == key_id for n in range(30)) for key_id in keys}
    for key_id in keys:
        spent, held = await spend_row(pools[1], key_id)
        assert spent == await logged(pools[1], key_id)
        assert held == admitted[key_id]
    # A dead replica's reservations go, and what they held with them, key by key.
    assert await drop_spend_reservations(pools[2], "r0") == 10
    assert await drop_spend_reservations(pools[2], "r0") == 0
    left = dict(
        await pools[0].fetch(
            "SELECT key_id, count(*) FROM coordinator_spend_reservations GROUP BY 1"
        )
    )
    assert sum(left.values()) == 20 and "r0" not in await reservations(pools[0])
    for key_id in keys:
        assert await spend_row(pools[0], key_id) == (await logged(pools[0], key_id), left[key_id])


async def test_a_request_cancelled_while_admitted_leaves_no_reservation(db_pool: Pool) -> None:
    guard = SpendGuard(job_log=await JobLog.create(db_pool), replica_id="r0")
    buyer = Buyer("key_c", "c", spend_limit=100)
    await guard.admit(buyer, 1)  # the key's row exists: the next admission is one statement
    admitting = asyncio.create_task(guard.admit(buyer, 50))
    await asyncio.sleep(0)  # the statement is on its way
    admitting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await admitting
    await eventually(
        lambda: _equals(spend_row(db_pool, "key_c"), (0, 1)), "the cancelled admission undone"
    )


async def _equals(value: Awaitable[object], expected: object) -> bool:
    return await value == expected


# --- rate limits ---------------------------------------------------------------------------------


async def test_shared_rate_limits_refuse_across_replicas(pools: list[Pool]) -> None:
    config = LimitsConfig(requests_per_minute=10, tokens_per_minute=1_000)
    limits = await asyncio.gather(*(SharedRateLimits.create(pool, config) for pool in pools))
    results = await asyncio.gather(
        *(limits[n % 3].check("key_r", tokens=50) for n in range(30)), return_exceptions=True
    )
    passed = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, RateLimitedError)]
    assert len(passed) == 10 and len(refused) == 20  # the minute's 10 requests, all replicas
    assert sorted(r.states["requests"].remaining for r in passed) == list(range(10))
    assert sorted(r.states["tokens"].remaining for r in passed) == pytest.approx(
        list(range(500, 1000, 50)), abs=30
    )
    error = refused[0]
    assert error.limit_kind == "requests" and error.limit == 10 and error.remaining == 0
    assert error.retry_after_s == pytest.approx(6.0, abs=0.5)  # one request per 6 s
    assert error.states["tokens"].remaining == pytest.approx(500, abs=30)  # and what refilled

    await limits[1].cancel(passed[0])  # never reached a miner: the request and tokens come back
    await limits[1].cancel(passed[0])  # once
    back = await limits[2].check("key_r", tokens=0)
    with pytest.raises(RateLimitedError):
        await limits[0].check("key_r", tokens=0)
    assert await limits[0].check("other", tokens=0) is not None  # keys do not share
    # Tokens: a request used 10 of the 50 it reserved; 40 come back on whichever replica.
    await limits[2].record_usage(passed[1], tokens=10)
    await limits[2].record_usage(passed[1], tokens=0)  # only the first correction counts
    level = await pools[0].fetchval(
        "SELECT tokens FROM coordinator_rate_buckets WHERE key_id = 'key_r'"
    )
    assert level == pytest.approx(500 + 50 + 40, abs=30)  # plus what refilled meanwhile
    assert back.states["requests"].remaining == 0


async def test_shared_token_limits_and_idle_keys_expire(db_pool: Pool) -> None:
    limits = await SharedRateLimits.create(
        db_pool, LimitsConfig(requests_per_minute=0, tokens_per_minute=600)
    )
    first = await limits.check("key_t", tokens=500)
    assert first.states["tokens"].remaining == 100 and "requests" not in first.states
    with pytest.raises(RateLimitedError) as raised:
        await limits.check("key_t", tokens=200)
    assert raised.value.limit_kind == "tokens"
    assert raised.value.retry_after_s == pytest.approx(10.0, abs=0.5)  # 100 missing, 10/s
    await limits.check("key_big", tokens=5_000)  # larger than a minute: runs on a full bucket
    with pytest.raises(RateLimitedError) as debt:
        await limits.check("key_big", tokens=1)
    assert debt.value.states["tokens"].reset_s == pytest.approx(500, abs=1)  # 5000 at 10/s

    assert await limits.expire() == 0  # both were used just now
    await db_pool.execute(
        "UPDATE coordinator_rate_buckets SET updated_at = updated_at - interval '61 seconds'"
        " WHERE key_id = 'key_t'"
    )
    assert await limits.expire() == 1
    assert await db_pool.fetchval("SELECT array_agg(key_id) FROM coordinator_rate_buckets") == [
        "key_big"
    ]
    await limits.record_usage(first, tokens=0)  # a forgotten key is full already: no row made
    assert await db_pool.fetchval("SELECT count(*) FROM coordinator_rate_buckets") == 1
    fresh = await limits.check("key_t", tokens=600)
    assert fresh.states["tokens"].remaining == 0
    unlimited = await SharedRateLimits.create(db_pool, LimitsConfig(0, 0))
    assert (await unlimited.check("key_t", tokens=10**9)).states == {}


# --- leases --------------------------------------------------------------------------------------

FAST = LeaseConfig(renew_interval_s=0.1, lease_s=1.0, sweep_interval_s=0.1)
NEVER_RENEWS = LeaseConfig(renew_interval_s=1_000.0, lease_s=2_000.0, sweep_interval_s=1_000.0)


class Replica:
    """What one coordinator replica keeps in the database, on a pool of its own."""

    def __init__(self, pool: Pool, ledger: PostgresLedger, lease: ReplicaLease) -> None:
        self.pool = pool
        self.ledger = ledger
        self.lease = lease
        self.id = lease.replica_id
        self.guard = SpendGuard(job_log=JobLog(pool), replica_id=self.id)
        registry = MinerRegistry()
        registry.add(bare_session(miner_id=f"miner-of-{self.id}"))
        registry.add(bare_session(miner_id="miner-on-both"))
        self.snapshots = MinerSnapshots(pool, registry=registry, interval_s=60, replica_id=self.id)

    @classmethod
    def of(
        cls, pool: Pool, ledger: PostgresLedger, config: LeaseConfig, calls: list[str]
    ) -> Replica:
        lease = ReplicaLease(pool, config)
        replica = cls(pool, ledger, lease)

        async def release_holds(replica_id: str) -> None:
            calls.append(replica_id)
            await ledger.release_open_holds(holder=replica_id)

        lease.add_cleanup("ledger holds", release_holds)
        lease.add_cleanup("miner snapshot", lambda rid: delete_replica_miners(pool, rid))
        lease.add_cleanup("spend reservations", lambda rid: drop_spend_reservations(pool, rid))
        return replica

    async def place_things(self) -> tuple[Hold, SpendHold]:
        hold = await self.ledger.hold(BUYER, 100, reference=self.id.encode(), holder=self.id)
        reservation = await self.guard.admit(Buyer("key_l", "l", spend_limit=10_000), 100)
        assert reservation is not None
        await self.snapshots.publish()
        return hold, reservation


async def hold_status(pool: Pool, hold: Hold) -> str:
    status: str = await pool.fetchval("SELECT status FROM ledger_holds WHERE id = $1", hold.hold_id)
    return status


async def miner_rows(pool: Pool) -> set[tuple[str, str]]:
    rows = await pool.fetch("SELECT replica_id, miner_id FROM coordinator_miners")
    return {(row["replica_id"], row["miner_id"]) for row in rows}


async def reservations(pool: Pool) -> dict[str, int]:
    rows = await pool.fetch(
        "SELECT replica_id, sum(amount) FROM coordinator_spend_reservations GROUP BY 1"
    )
    return {row[0]: row[1] for row in rows}


async def registered(pool: Pool) -> set[str]:
    return {row[0] for row in await pool.fetch("SELECT replica_id FROM coordinator_replicas")}


async def test_a_dead_replica_is_cleaned_up_once_by_a_live_one_and_the_live_ones_never(
    pools: list[Pool],
) -> None:
    ledgers = await asyncio.gather(*(PostgresLedger.create(pool) for pool in pools))
    await JobLog.create(pools[0])
    assert await connected_miners(pools[0], fresh_within_s=60) == []  # and makes the table
    await ledgers[0].open_account(BUYER)
    await ledgers[0].mint(BUYER, 10_000)
    calls: list[str] = []
    dead = Replica.of(pools[0], ledgers[0], NEVER_RENEWS, calls)
    live = [Replica.of(pools[n], ledgers[n], FAST, calls) for n in (1, 2)]
    async with AsyncExitStack() as stack:
        for replica in (dead, *live):
            await stack.enter_async_context(replica.lease)
        assert await registered(pools[0]) == {dead.id, live[0].id, live[1].id}
        dead_hold, _ = await dead.place_things()
        live_things = [await replica.place_things() for replica in live]
        nobodys = await ledgers[1].hold(BUYER, 100, reference=b"legacy")  # no holder
        assert await spend_row(pools[0], "key_l") == (0, 300)

        # The dead replica stops renewing; within its lease plus a sweep, one live replica
        # sweeps it, and nothing of the live ones is touched.
        await eventually(lambda: _gone(pools[1], dead.id), "the dead replica swept")
        assert calls == [dead.id]  # its cleanups ran once, by one of the two sweepers
        assert await hold_status(pools[1], dead_hold) == "released"
        for hold, _ in live_things:
            assert await hold_status(pools[1], hold) == "open"
        assert await hold_status(pools[1], nobodys) == "open"
        expected = {(replica.id, f"miner-of-{replica.id}") for replica in live} | {
            (replica.id, "miner-on-both") for replica in live
        }
        assert await miner_rows(pools[2]) == expected
        assert await reservations(pools[2]) == {live[0].id: 100, live[1].id: 100}
        assert await spend_row(pools[2], "key_l") == (0, 200)
        assert await registered(pools[2]) == {live[0].id, live[1].id}
        # Every live replica's miners are listed, one line per replica and miner.
        report = await miners_report(pools[0])
        assert len([line for line in report.splitlines() if "miner-on-both"[:16] in line]) == 2
        assert {row.replica_id for row in await connected_miners(pools[0], fresh_within_s=60)} == {
            replica.id for replica in live
        }

        # Back from its pause, the dead replica learns it lost its lease, and registers again,
        # so that what it places from now on is covered.
        assert not dead.lease.lost.is_set()
        assert await dead.lease.renew() is False
        assert dead.lease.lost.is_set()
        assert dead.id in await registered(pools[0])
        late, _ = await dead.place_things()
        await asyncio.sleep(3 * FAST.sweep_interval_s)
        assert calls == [dead.id]  # not dead now: renewed just then (its lease: the sweeper's)
        await stack.aclose()  # each replica, exiting, cleans up after itself
    assert await hold_status(pools[0], late) == "released"
    for hold, _ in live_things:
        assert await hold_status(pools[0], hold) == "released"
    assert await miner_rows(pools[0]) == set()
    assert await reservations(pools[0]) == {}
    assert await spend_row(pools[0], "key_l") == (0, 0)
    assert await registered(pools[0]) == set()
    assert await ledgers[0].balance(BUYER) == 10_000 - 100  # only the legacy hold stays


async def _gone(pool: Pool, replica_id: str) -> bool:
    return replica_id not in await registered(pool)


async def test_a_sweep_whose_cleanup_fails_is_retried(pools: list[Pool]) -> None:
    async with ReplicaLease(pools[0], NEVER_RENEWS) as dead:
        sweeper = ReplicaLease(pools[1], FAST)
        attempts: list[str] = []

        async def flaky(replica_id: str) -> None:
            attempts.append(replica_id)
            if len(attempts) == 1:
                raise OSError("the database went away")

        sweeper.add_cleanup("flaky", flaky)
        await pools[0].execute(
            "UPDATE coordinator_replicas SET renewed_at = now() - interval '1 hour'"
        )
        async with sweeper:  # its first sweep fails, the row stays; the next one succeeds
            await eventually(lambda: _gone(pools[1], dead.replica_id), "swept on the retry")
            assert attempts[:2] == [dead.replica_id, dead.replica_id]
            assert sweeper.replica_id in await registered(pools[1])


async def test_a_replica_id_in_use_is_refused_and_a_fenced_start_sweeps_everyone(
    pools: list[Pool],
) -> None:
    ledger = await PostgresLedger.create(pools[0])
    await ledger.open_account(BUYER)
    await ledger.mint(BUYER, 100)
    async with ReplicaLease(pools[0], FAST, replica_id="fixed") as lease:
        with pytest.raises(ReplicaIdTakenError, match="'fixed' is registered"):
            async with ReplicaLease(pools[1], FAST, replica_id="fixed"):
                pytest.fail("registered twice")
        assert await registered(pools[0]) == {"fixed"}
        assert not lease.lost.is_set()
    # A previous run that crashed a moment ago: its lease has not run out yet.
    await pools[0].execute(
        "INSERT INTO coordinator_replicas (replica_id, host, pid) VALUES ('crashed', 'h', 1)"
    )
    hold = await ledger.hold(BUYER, 60, reference=b"r", holder="crashed")
    lease = ReplicaLease(pools[1], LeaseConfig())
    lease.add_cleanup("holds", lambda rid: ledger.release_open_holds(holder=rid))
    async with lease:
        assert await hold_status(pools[0], hold) == "open"  # alive as far as leases tell
        assert await lease.sweep() == []
        # Single-process mode: the sequencer fence says nobody else runs.
        assert await lease.sweep(everyone_else=True) == ["crashed"]
        assert await hold_status(pools[0], hold) == "released"
        assert await registered(pools[0]) == {lease.replica_id}


async def test_a_lease_must_outlast_two_renewals() -> None:
    with pytest.raises(ValueError, match="at least two renewals"):
        LeaseConfig(renew_interval_s=6.0, lease_s=10.0)
