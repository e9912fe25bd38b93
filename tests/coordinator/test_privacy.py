"""Vetted miners live in PostgreSQL; a serving coordinator's memory follows every change."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from coordinator import cli
from coordinator.dispatch.privacy import VettedMiners
from tests.coordinator.test_queue import until


async def test_vetting_is_stored_and_reported_once(db_pool: asyncpg.Pool[asyncpg.Record]) -> None:
    store = await VettedMiners.create(db_pool)
    assert await store.vet("aa" * 32) is True
    assert await store.vet("aa" * 32) is False  # already vetted
    assert await store.load() == frozenset({"aa" * 32})
    assert store.is_vetted("aa" * 32) and not store.is_vetted("bb" * 32)
    assert await store.unvet("aa" * 32) is True
    assert await store.unvet("aa" * 32) is False
    assert await store.load() == frozenset()


async def test_a_watching_coordinator_sees_another_process_vet_and_unvet_at_once(
    db_pool: asyncpg.Pool[asyncpg.Record],
) -> None:
    # A long backstop period: only the NOTIFY can bring the change within the wait.
    serving = await VettedMiners.create(db_pool, refresh_s=3600)
    operator = await VettedMiners.create(db_pool)  # the `miners vet` CLI
    miner = "cc" * 32
    async with serving.watching():
        assert not serving.is_vetted(miner)
        await asyncio.sleep(0.1)  # the watcher is listening
        await operator.vet(miner)
        await until(lambda: serving.is_vetted(miner))
        await operator.unvet(miner)
        await until(lambda: not serving.is_vetted(miner))


def test_vetting_a_malformed_miner_id_is_refused_before_any_database(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data = ["--data-dir", str(tmp_path / "never-created")]
    assert cli.main(["miners", "vet", "alice", *data]) == 2
    assert "needs a MINER_ID of 64 hex digits" in capsys.readouterr().err
    assert cli.main(["miners", "unvet", *data]) == 2
    assert cli.main(["miners", "list", "ab" * 32, *data]) == 2
    assert "takes no MINER_ID" in capsys.readouterr().err
    assert not (tmp_path / "never-created").exists()


class _FlakyPool:
    """A pool whose reads start failing on demand, and that cannot lend a listening connection."""

    def __init__(self, vetted: str) -> None:
        self.vetted = vetted
        self.broken = False

    async def fetch(self, query: str) -> list[dict[str, str]]:
        if self.broken:
            raise ConnectionResetError("the database went away")
        return [{"miner_id": self.vetted}]

    async def acquire(self, **options: object) -> None:
        raise OSError("no connection to listen on in this test")


async def test_a_reload_that_fails_treats_nobody_as_vetted() -> None:
    miner = "dd" * 32
    pool = _FlakyPool(miner)
    store = VettedMiners(pool, refresh_s=0.01)  # type: ignore[arg-type]
    async with store.watching():
        assert store.is_vetted(miner)
        pool.broken = True  # an unvetting might now go unseen: nobody counts as vetted
        await until(lambda: not store.is_vetted(miner))
        pool.broken = False
        await until(lambda: store.is_vetted(miner))
