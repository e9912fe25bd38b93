"""Trust records across replicas: a key one process bans is refused by the others at once."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, TypeAlias

import asyncpg

from coordinator.verification.trust import TrustStore

if TYPE_CHECKING:
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]

WAIT_S = 5.0


async def eventually_banned(store: TrustStore, miner_id: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not store.is_banned(miner_id):
        assert asyncio.get_running_loop().time() < deadline, f"{miner_id} not banned in time"
        await asyncio.sleep(0.02)


async def test_a_ban_saved_by_one_store_reaches_a_watching_store(db_pool: Pool) -> None:
    deciding = await TrustStore.create(db_pool)
    other = await TrustStore.create(db_pool)
    async with other.watching(refresh_s=60.0):  # long backstop: only the notification can do it
        await asyncio.sleep(0.2)  # the listener is up
        record = deciding.get("miner-1")
        record.confirmed_failures, record.banned = 2, True
        await deciding.save(record)
        await eventually_banned(other, "miner-1")
        assert other.get("miner-1").confirmed_failures == 2
        assert not other.is_banned("miner-2")


async def test_without_the_listener_the_backstop_reload_still_catches_up(db_pool: Pool) -> None:
    deciding = await TrustStore.create(db_pool)
    other = await TrustStore.create(db_pool)
    record = deciding.get("miner-3")
    record.banned = True
    await deciding.save(record)  # before the other watches: no notification reaches it
    assert not other.is_banned("miner-3")
    async with other.watching(refresh_s=0.1):
        await eventually_banned(other, "miner-3")


async def test_a_stale_copy_saved_later_cannot_take_a_ban_back(db_pool: Pool) -> None:
    deciding = await TrustStore.create(db_pool)
    stale = await TrustStore.create(db_pool)
    stale_record = stale.get("miner-4")  # read before the ban
    record = deciding.get("miner-4")
    record.confirmed_failures, record.banned = 2, True
    await deciding.save(record)
    stale_record.checks_passed += 1  # another replica's passing check, on its old copy
    await stale.save(stale_record)
    fresh = await TrustStore.create(db_pool)
    assert fresh.is_banned("miner-4")
    assert fresh.get("miner-4").confirmed_failures == 2
    assert fresh.get("miner-4").checks_passed == 1
