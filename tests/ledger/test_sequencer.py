"""The sequencer role across processes, against a real PostgreSQL: a standby replica waits, takes
over within seconds of the sequencer's lock connection dying (or its process being killed), the
deposed sequencer is fenced by the epoch, and every checkpoint before and after verifies, is
consistent with the others and covers every entry appended from either replica meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, TypeAlias

import asyncpg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger.checkpoint import Checkpoint, CheckpointSigner, parse_signed_checkpoint
from ledger.checkpointer import (
    Checkpointer,
    CheckpointerConfig,
    LogForkError,
    SequencerFencedError,
    SigningKeyChangedError,
)
from ledger.interface import AccountKind, AccountRef
from ledger.log_reader import Head, LogReader
from ledger.merkle import leaf_hash, root, verify_consistency
from ledger.postgres import PostgresLedger
from ledger.sequencer_lock import SEQUENCER_LOCK_KEY

if TYPE_CHECKING:
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]

ORIGIN = "sequencer.example/ledger"
SEED = hashlib.sha256(b"meshmint sequencer test key").digest()
SIGNER = CheckpointSigner(ORIGIN, Ed25519PrivateKey.from_private_bytes(SEED))
OTHER_SIGNER = CheckpointSigner(ORIGIN, Ed25519PrivateKey.generate())
BUYERS = [AccountRef(AccountKind.BUYER, f"replica-{i}") for i in range(2)]
HOUR = 3600.0
FAST = CheckpointerConfig(ORIGIN, interval_s=0.05, lock_poll_s=0.1)
# Signs only when the test asks, and never looks at its lock connection by itself: a sequencer
# whose loop has not noticed yet that it was deposed.
ASLEEP = CheckpointerConfig(ORIGIN, interval_s=HOUR, lock_poll_s=HOUR)
TAKEOVER_S = 10.0  # the promise: a new sequencer signs within this of the old one's death

# Who holds the sequencer lock in this database (advisory locks are per database).
HOLDER_SQL = (
    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND classid = ($1::bigint >> 32)::oid AND objid = ($1::bigint & 4294967295)::oid"
)


@pytest.fixture
async def pools(database_url: str) -> AsyncIterator[tuple[Pool, Pool]]:
    """Two replicas' pools on one database (schema created), and nothing else shared."""
    first = await asyncpg.create_pool(database_url, min_size=1, max_size=6)
    second = await asyncpg.create_pool(database_url, min_size=1, max_size=6)
    try:
        ledger = await PostgresLedger.create(first)
        for buyer in BUYERS:
            await ledger.open_account(buyer)
        await ledger.aclose()
        yield first, second
    finally:
        await second.close()
        await first.close()


@pytest.fixture
async def admin(database_url: str) -> AsyncIterator[asyncpg.Connection[asyncpg.Record]]:
    """A connection of the test's own: the operator with psql."""
    connection = await asyncpg.connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]], what: str, *, within: float = 10.0
) -> float:
    """Polls ``condition`` until true; returns how long that took, fails after ``within`` s."""
    start = time.monotonic()
    while True:
        result = condition()
        if result if isinstance(result, bool) else await result:
            return time.monotonic() - start
        if time.monotonic() - start > within:
            pytest.fail(f"not within {within} s: {what}")
        await asyncio.sleep(0.02)


async def lock_holder(connection: asyncpg.Connection[asyncpg.Record]) -> int | None:
    pid: int | None = await connection.fetchval(HOLDER_SQL, SEQUENCER_LOCK_KEY)
    return pid


async def stored_checkpoints(pool: Pool) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT size, root, note, epoch FROM ledger_checkpoints ORDER BY size")


async def head_size(pool: Pool) -> int:
    return (await LogReader(pool).head()).size


async def covered(pool: Pool) -> bool:
    """Whether the newest stored checkpoint covers the whole log."""
    latest = await LogReader(pool).latest_checkpoint()
    return latest is not None and latest.size == await head_size(pool)


async def assert_log_and_checkpoints_verify(pool: Pool, signer: CheckpointSigner) -> None:
    """Every entry present, gap-free; every stored checkpoint signed, with the root the entries
    give (recomputed here from the leaves), and consistent with the next one."""
    leaves = await pool.fetch("SELECT seq, leaf, leaf_hash FROM ledger_entries ORDER BY seq")
    assert [row["seq"] for row in leaves] == list(range(len(leaves)))
    hashes = [leaf_hash(row["leaf"]) for row in leaves]
    assert hashes == [row["leaf_hash"] for row in leaves]
    rows = await stored_checkpoints(pool)
    assert rows, "no checkpoint stored"
    reader = LogReader(pool)
    previous = None
    for row in rows:
        checkpoint = parse_signed_checkpoint(row["note"], signer.verifier, origin=ORIGIN)
        assert (checkpoint.size, checkpoint.root_hash) == (row["size"], row["root"])
        assert checkpoint.root_hash == root(hashes[: checkpoint.size])
        if previous is not None:
            proof = await reader.consistency_proof(previous.size, checkpoint.size)
            assert verify_consistency(
                previous.size, checkpoint.size, proof, previous.root_hash, checkpoint.root_hash
            )
        previous = checkpoint


class Appender:
    """Appends mints through one replica's ledger until stopped; counts the acknowledged."""

    def __init__(self, pool: Pool, buyer: AccountRef) -> None:
        self._ledger = PostgresLedger(pool, max_batch=4)
        self._buyer = buyer
        self.acknowledged = 0
        self._stopping = False
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stopping:  # not cancelled: a cancelled mint may still commit
            await self._ledger.mint(self._buyer, 1, memo="during the switch")
            self.acknowledged += 1
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        self._stopping = True
        await self._task  # an append that failed fails the test
        await self._ledger.aclose()


# --- one sequencer at a time ------------------------------------------------------------------


async def test_without_standby_a_second_sequencer_refuses_to_start(
    pools: tuple[Pool, Pool],
) -> None:
    first, second = pools
    async with Checkpointer.running(first, SIGNER, FAST) as sequencer:
        assert sequencer.is_sequencer and sequencer.epoch == 1
        with pytest.raises(SequencerFencedError, match="already the ledger sequencer"):
            async with Checkpointer.running(second, SIGNER, FAST):
                pytest.fail("a second sequencer started")
        assert sequencer.is_sequencer
        assert await first.fetchval("SELECT epoch FROM ledger_sequencer") == 1


async def test_a_standby_waits_while_the_sequencer_signs_and_reads_its_checkpoints(
    pools: tuple[Pool, Pool],
) -> None:
    first, second = pools
    replica = PostgresLedger(second)
    async with (
        Checkpointer.running(first, SIGNER, FAST) as sequencer,
        Checkpointer.running(second, SIGNER, FAST, standby=True) as standby,
    ):
        assert not standby.is_sequencer and standby.epoch is None
        await replica.mint(BUYERS[1], 7)  # a standby's replica appends like any other
        await eventually(lambda: covered(first), "the sequencer signs the standby's append")
        size = await head_size(first)
        await eventually(
            lambda: standby.latest is not None and standby.latest.size == size,
            "the standby reads the sequencer's latest checkpoint",
        )
        assert not standby.is_sequencer
        assert {row["epoch"] for row in await stored_checkpoints(first)} == {sequencer.epoch}
        with pytest.raises(SequencerFencedError, match="not the ledger sequencer"):
            await standby.checkpoint()
    await replica.aclose()


# --- takeover and fencing ---------------------------------------------------------------------


async def test_a_standby_takes_over_when_the_sequencer_lock_dies_and_the_old_one_is_fenced(
    pools: tuple[Pool, Pool], admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    first, second = pools
    async with contextlib.AsyncExitStack() as stack:
        old = await stack.enter_async_context(Checkpointer.running(first, SIGNER, ASLEEP))
        new = await stack.enter_async_context(
            Checkpointer.running(second, SIGNER, FAST, standby=True)
        )
        appenders = [Appender(first, BUYERS[0]), Appender(second, BUYERS[1])]
        await eventually(lambda: all(a.acknowledged >= 5 for a in appenders), "appends")
        assert await old.checkpoint() is not None  # the sequencer signs; the standby waits
        await asyncio.sleep(FAST.lock_poll_s * 3)  # several of the standby's tries
        assert old.is_sequencer and not new.is_sequencer
        assert {row["epoch"] for row in await stored_checkpoints(first)} == {1}

        pid = await lock_holder(admin)
        assert pid is not None
        assert pid == await admin.fetchval("SELECT backend_pid FROM ledger_sequencer")
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        took = await eventually(lambda: new.is_sequencer, "the standby takes over", within=30)
        assert took < TAKEOVER_S
        assert new.epoch == 2
        assert await lock_holder(admin) not in (None, pid)
        await eventually(lambda: covered(second), "the new sequencer signs")

        # The deposed sequencer's loop has not noticed, and it still has its pool: it stores
        # nothing more, and steps down.
        assert old.is_sequencer
        before = await stored_checkpoints(first)
        with pytest.raises(SequencerFencedError, match=r"took over .*epoch 2, ours 1"):
            await old.checkpoint()
        assert not old.is_sequencer and old.epoch is None
        after = await stored_checkpoints(first)
        assert [r for r in after if r["epoch"] == 1] == [r for r in before if r["epoch"] == 1]
        with pytest.raises(SequencerFencedError, match="not the ledger sequencer"):
            await old.checkpoint()

        for appender in appenders:
            await appender.stop()
        await eventually(lambda: covered(second), "the last entries signed")

    # Nothing acknowledged was lost, and the epochs never interleave: every checkpoint of the
    # new epoch is at least as large as every one of the old.
    acknowledged = sum(a.acknowledged for a in appenders)
    assert await head_size(first) == acknowledged
    rows = await stored_checkpoints(first)
    assert rows[-1]["size"] == acknowledged
    assert [row["epoch"] for row in rows] == sorted(row["epoch"] for row in rows)
    assert {row["epoch"] for row in rows} == {1, 2}
    await assert_log_and_checkpoints_verify(first, SIGNER)


CHILD = """
import asyncio, sys
import asyncpg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from ledger.checkpoint import CheckpointSigner
from ledger.checkpointer import Checkpointer, CheckpointerConfig

async def main(url, origin, seed):
    pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
    signer = CheckpointSigner(origin, Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed)))
    config = CheckpointerConfig(origin, interval_s=0.05)
    async with Checkpointer.running(pool, signer, config) as checkpointer:
        print("sequencer", checkpointer.epoch, flush=True)
        await asyncio.Event().wait()

asyncio.run(main(*sys.argv[1:]))
"""


async def test_a_standby_takes_over_within_seconds_of_the_sequencer_process_being_killed(
    pools: tuple[Pool, Pool], database_url: str
) -> None:
    first, second = pools
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        database_url,
        ORIGIN,
        SEED.hex(),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), 60)
        assert line == b"sequencer 1\n"
        replica = PostgresLedger(second)
        async with Checkpointer.running(second, SIGNER, FAST, standby=True) as standby:
            await replica.mint(BUYERS[1], 3)
            await eventually(lambda: covered(first), "the other process signs")
            assert not standby.is_sequencer

            child.send_signal(signal.SIGKILL)
            await child.wait()
            took = await eventually(lambda: standby.is_sequencer, "takeover", within=30)
            assert took < TAKEOVER_S
            await replica.mint(BUYERS[1], 4)
            await eventually(lambda: covered(first), "the new sequencer signs")
        await replica.aclose()
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    rows = await stored_checkpoints(first)
    assert rows[-1]["epoch"] == 2 and rows[-1]["size"] == 2
    await assert_log_and_checkpoints_verify(first, SIGNER)


@pytest.mark.parametrize("standby", [False, True])
async def test_a_sequencer_whose_lock_connection_dies_takes_the_free_lock_again(
    db_pool: Pool,
    admin: asyncpg.Connection[asyncpg.Record],
    standby: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ledger = await PostgresLedger.create(db_pool)
    await ledger.open_account(BUYERS[0])
    caplog.set_level(logging.INFO, logger="ledger.checkpointer")
    async with Checkpointer.running(db_pool, SIGNER, FAST, standby=standby) as checkpointer:
        pid = await lock_holder(admin)
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
        await eventually(lambda: checkpointer.epoch == 2, "the lock taken again")
        assert "its lock connection was lost" in caplog.text
        assert await lock_holder(admin) not in (None, pid)
        await ledger.mint(BUYERS[0], 1)
        await eventually(lambda: covered(db_pool), "signing goes on")
    assert [row["epoch"] for row in await stored_checkpoints(db_pool)][-1] == 2
    await ledger.aclose()


async def test_without_standby_a_sequencer_that_lost_the_lock_to_another_stops_signing(
    db_pool: Pool, admin: asyncpg.Connection[asyncpg.Record], caplog: pytest.LogCaptureFixture
) -> None:
    ledger = await PostgresLedger.create(db_pool)
    await ledger.open_account(BUYERS[0])
    config = CheckpointerConfig(ORIGIN, interval_s=HOUR, lock_poll_s=0.5)
    with pytest.raises(SequencerFencedError, match="took the ledger sequencer lock"):
        async with Checkpointer.running(db_pool, SIGNER, config) as checkpointer:
            await admin.execute("SELECT pg_terminate_backend($1)", await lock_holder(admin))
            # Another process takes the lock before this one notices.
            await eventually(
                lambda: admin.fetchval("SELECT pg_try_advisory_lock($1)", SEQUENCER_LOCK_KEY),
                "the freed lock",
            )
            await eventually(lambda: "stopped signing" in caplog.text, "giving up")
            assert not checkpointer.is_sequencer
            await ledger.mint(BUYERS[0], 1)
            await asyncio.sleep(0.2)  # it would have signed
    assert await stored_checkpoints(db_pool) != [] and not await covered(db_pool)
    await ledger.aclose()


@pytest.mark.parametrize("standby", [False, True])
async def test_a_sequencer_whose_epoch_was_superseded_steps_down(
    db_pool: Pool,
    admin: asyncpg.Connection[asyncpg.Record],
    standby: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ledger = await PostgresLedger.create(db_pool)
    await ledger.open_account(BUYERS[0])
    with contextlib.ExitStack() as expect:
        if not standby:
            expect.enter_context(pytest.raises(SequencerFencedError, match="took over"))
        async with Checkpointer.running(db_pool, SIGNER, FAST, standby=standby) as checkpointer:
            assert checkpointer.epoch == 1
            await admin.execute("UPDATE ledger_sequencer SET epoch = epoch + 1")  # by hand
            await ledger.mint(BUYERS[0], 1)  # something to sign: the write is fenced
            if standby:  # it lets the lock go, finds it free and takes it again
                await eventually(lambda: checkpointer.epoch == 3, "the lock taken again")
                await eventually(lambda: covered(db_pool), "signing goes on")
            else:  # it stops signing, for running() to raise when the block ends
                await eventually(lambda: "stopped signing" in caplog.text, "giving up")
                assert not checkpointer.is_sequencer
    assert ("stepped down" if standby else "stopped signing") in caplog.text
    epochs = {row["epoch"] for row in await stored_checkpoints(db_pool)}
    assert epochs == ({1, 3} if standby else {1})
    await ledger.aclose()


# --- what gets signed -------------------------------------------------------------------------


async def test_of_two_checkpoints_of_one_size_the_first_stored_is_the_latest(
    db_pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = await PostgresLedger.create(db_pool)
    await ledger.open_account(BUYERS[0])
    other = Checkpointer(db_pool, OTHER_SIGNER, CheckpointerConfig(ORIGIN))  # unfenced, no lock
    async with Checkpointer.running(db_pool, SIGNER, ASLEEP) as checkpointer:
        await ledger.mint(BUYERS[0], 1)
        reader = checkpointer._reader
        real_head = reader.head

        async def head_raced_by_another_signer() -> Head:
            head = await real_head()
            assert await other.checkpoint() is not None  # stores this very size first
            return head

        monkeypatch.setattr(reader, "head", head_raced_by_another_signer)
        latest = await checkpointer.checkpoint()
        assert latest is not None and other.latest is not None
        assert latest == checkpointer.latest == other.latest  # what is stored, not what it signed
        parse_signed_checkpoint(latest.note, OTHER_SIGNER.verifier)
        rows = [r for r in await stored_checkpoints(db_pool) if r["size"] == latest.size]
        assert [(r["note"], r["epoch"]) for r in rows] == [(latest.note, 0)]

        # One of the same size but another root: a fork, never signed over.
        await ledger.mint(BUYERS[0], 1)

        async def head_raced_by_a_forger() -> Head:
            head = await real_head()
            await db_pool.execute(
                "INSERT INTO ledger_checkpoints (size, root, note) VALUES ($1, $2, 'forged')",
                head.size,
                bytes(32),
            )
            return head

        monkeypatch.setattr(reader, "head", head_raced_by_a_forger)
        with pytest.raises(LogForkError, match="different root"):
            await checkpointer.checkpoint()
        monkeypatch.undo()
        await db_pool.execute("DELETE FROM ledger_checkpoints WHERE note = 'forged'")
    await ledger.aclose()


async def test_a_takeover_between_reading_the_log_and_storing_fences_the_write(
    db_pool: Pool, admin: asyncpg.Connection[asyncpg.Record], monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = await PostgresLedger.create(db_pool)
    await ledger.open_account(BUYERS[0])
    async with Checkpointer.running(db_pool, SIGNER, ASLEEP) as checkpointer:
        await ledger.mint(BUYERS[0], 1)
        reader = checkpointer._reader
        real_head = reader.head

        async def head_then_a_takeover() -> Head:
            head = await real_head()  # the epoch was still ours when checkpoint() began
            await admin.execute("UPDATE ledger_sequencer SET epoch = epoch + 1")
            return head

        monkeypatch.setattr(reader, "head", head_then_a_takeover)
        with pytest.raises(SequencerFencedError, match="size 1 was not stored"):
            await checkpointer.checkpoint()
        assert not checkpointer.is_sequencer
        assert [row["size"] for row in await stored_checkpoints(db_pool)] == [0]
    await ledger.aclose()


async def test_consistency_is_checked_from_the_stored_latest_checkpoint(db_pool: Pool) -> None:
    ledger = await PostgresLedger.create(db_pool)
    await ledger.open_account(BUYERS[0])
    async with Checkpointer.running(db_pool, SIGNER, ASLEEP) as checkpointer:
        for _ in range(3):
            await ledger.mint(BUYERS[0], 1)
        size = await head_size(db_pool)
        # Another signer stored a checkpoint this one never saw, of a tree that is not this log.
        forged = Checkpoint(ORIGIN, size - 1, hashlib.sha256(b"another tree").digest())
        await db_pool.execute(
            "INSERT INTO ledger_checkpoints (size, root, note) VALUES ($1, $2, $3)",
            forged.size,
            forged.root_hash,
            OTHER_SIGNER.sign(forged),
        )
        assert checkpointer.latest is not None and checkpointer.latest.size < forged.size
        with pytest.raises(LogForkError, match=f"checkpoint of size {forged.size}"):
            await checkpointer.checkpoint()
        assert not await covered(db_pool)
        await db_pool.execute("DELETE FROM ledger_checkpoints WHERE size = $1", forged.size)
    await ledger.aclose()


# --- the signing key --------------------------------------------------------------------------


@pytest.mark.parametrize("standby", [False, True])
async def test_a_key_that_does_not_verify_the_last_checkpoint_is_refused_at_start(
    pools: tuple[Pool, Pool], standby: bool
) -> None:
    first, second = pools
    async with Checkpointer.running(first, SIGNER, FAST):
        pass  # it signed, and stopped
    with pytest.raises(SigningKeyChangedError, match="does not verify"):
        async with Checkpointer.running(second, OTHER_SIGNER, FAST, standby=standby):
            pytest.fail("started with another key")
    async with Checkpointer.running(first, SIGNER, FAST) as sequencer:  # the lock was let go
        assert sequencer.is_sequencer
        # While another is the sequencer, single mode refuses for that, as it always did; a
        # standby checks its key at once rather than when it takes over.
        with pytest.raises(SigningKeyChangedError if standby else SequencerFencedError):
            async with Checkpointer.running(second, OTHER_SIGNER, FAST, standby=standby):
                pytest.fail("started with another key")


async def test_a_standby_taking_over_with_a_key_that_does_not_verify_stands_aside(
    pools: tuple[Pool, Pool],
    admin: asyncpg.Connection[asyncpg.Record],
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second = pools
    # Another process holds the role and has signed nothing yet, so the key check at start
    # passes; it then signs with its key, and dies.
    assert await admin.fetchval("SELECT pg_try_advisory_lock($1)", SEQUENCER_LOCK_KEY)
    async with Checkpointer.running(second, OTHER_SIGNER, FAST, standby=True) as misfit:
        assert not misfit.is_sequencer
        assert await Checkpointer(first, SIGNER, FAST).checkpoint() is not None
        await admin.execute("SELECT pg_advisory_unlock($1)", SEQUENCER_LOCK_KEY)
        await eventually(lambda: "will not sign checkpoints" in caplog.text, "CRITICAL logged")
        assert any(r.levelno == logging.CRITICAL for r in caplog.records)
        assert not misfit.is_sequencer
        # It let the lock go: a replica with the right key takes over at once.
        await eventually(lambda: lock_holder_is_none(admin), "the lock released")
        async with Checkpointer.running(first, SIGNER, FAST, standby=True) as rightful:
            assert rightful.is_sequencer
            await asyncio.sleep(FAST.lock_poll_s * 3)
            assert not misfit.is_sequencer
    for row in await stored_checkpoints(first):
        parse_signed_checkpoint(row["note"], SIGNER.verifier)  # nothing signed with the other key
    assert (
        await first.fetchval(
            "SELECT count(*) FROM ledger_signers WHERE verifier_key = $1", OTHER_SIGNER.verifier_key
        )
        == 0
    )


async def lock_holder_is_none(connection: asyncpg.Connection[asyncpg.Record]) -> bool:
    return await lock_holder(connection) is None


# --- the schema -------------------------------------------------------------------------------


async def test_a_database_from_before_epochs_is_upgraded(db_pool: Pool) -> None:
    ledger = await PostgresLedger.create(db_pool)
    await ledger.open_account(BUYERS[0])
    await ledger.mint(BUYERS[0], 1)
    await Checkpointer(db_pool, SIGNER, CheckpointerConfig(ORIGIN)).checkpoint()
    await db_pool.execute(
        "DROP TABLE ledger_sequencer; ALTER TABLE ledger_checkpoints DROP COLUMN epoch"
    )
    await PostgresLedger.create(db_pool)  # a restart with this version
    await PostgresLedger.create(db_pool)  # and another: nothing to do
    assert [row["epoch"] for row in await stored_checkpoints(db_pool)] == [0]
    async with Checkpointer.running(db_pool, SIGNER, FAST) as checkpointer:
        assert checkpointer.epoch == 1
        await ledger.mint(BUYERS[0], 1)
        await eventually(lambda: covered(db_pool), "signing")
    assert [row["epoch"] for row in await stored_checkpoints(db_pool)] == [0, 1]
    await ledger.aclose()
