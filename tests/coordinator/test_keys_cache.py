"""The key store's cache of authentications on a real PostgreSQL: served from memory while a
watcher listens, emptied by NOTIFY when another process (the ``keys`` CLI) revokes a key or
changes its limit, off without a watcher or after a lost connection, bounded, and torn down.

The cache's clock is frozen unless a test moves it, so the TTL backstop never explains a change
that NOTIFY should have brought. Rows edited with plain SQL send no notification: a test that
edits one behind the store's back sees what the cache serves.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import asyncpg
import pytest

from coordinator.api import Buyer
from coordinator.billing.keys import KeyCacheConfig, KeyStore
from coordinator.cli import main
from coordinator.errors import AuthenticationError
from ledger.database import connect

if TYPE_CHECKING:
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]

WAIT_S = 10.0  # upper bound on waiting for a notification; tests poll, they never sleep it out
TTL_S = 5.0


class FrozenClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"not within {WAIT_S} s: {what}")
        await asyncio.sleep(0.01)


async def refused(keys: KeyStore, secret: str) -> bool:
    try:
        await keys.authenticate(secret)
    except AuthenticationError:
        return True
    return False


def store(pool: Pool, clock: FrozenClock, **config: Any) -> KeyStore:
    return KeyStore(pool, cache=KeyCacheConfig(ttl_s=TTL_S, **config), clock=clock)


@pytest.fixture
async def keys(db_pool: Pool) -> KeyStore:
    await KeyStore.create(db_pool)  # the schema
    return store(db_pool, FrozenClock())


@pytest.fixture
async def other(database_url: str) -> AsyncIterator[KeyStore]:
    """The same keys as another process sees them: a pool and a KeyStore of its own."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        yield await KeyStore.create(pool)
    finally:
        await pool.close()


async def behind_its_back(pool: Pool, sql: str, key_id: str) -> None:
    """Changes a key row with no notification (as a hand edit in psql would)."""
    assert (await pool.execute(sql, key_id)).endswith(" 1")


async def test_a_bare_store_caches_nothing(db_pool: Pool, keys: KeyStore) -> None:
    key = await keys.issue("alice")
    assert (await keys.authenticate(key.secret)).key_id == key.key_id
    assert not keys.caching and keys.cached_entries == 0
    await behind_its_back(db_pool, "DELETE FROM coordinator_api_keys WHERE key_id = $1", key.key_id)
    with pytest.raises(AuthenticationError):
        await keys.authenticate(key.secret)


async def test_a_second_authentication_is_served_from_memory_until_the_ttl(
    db_pool: Pool,
) -> None:
    await KeyStore.create(db_pool)
    clock = FrozenClock()
    keys = store(db_pool, clock)
    key = await keys.issue("alice", spend_limit=7_000)
    async with keys.watching():
        assert keys.caching
        first = await keys.authenticate(key.secret)
        assert first == Buyer(key_id=key.key_id, name="alice", spend_limit=7_000)
        assert keys.cached_entries == 1
        await behind_its_back(
            db_pool, "DELETE FROM coordinator_api_keys WHERE key_id = $1", key.key_id
        )
        assert await keys.authenticate(key.secret) == first  # no database read: the row is gone
        clock.now += TTL_S  # the backstop: past the TTL the database is read again
        with pytest.raises(AuthenticationError):
            await keys.authenticate(key.secret)
        assert keys.cached_entries == 0


async def test_a_revocation_by_the_cli_is_refused_by_a_running_coordinator(
    keys: KeyStore, database_url: str, tmp_path: Path
) -> None:
    key = await keys.issue("alice")
    async with keys.watching():
        await keys.authenticate(key.secret)
        assert keys.cached_entries == 1
        storage = ["--database-url", database_url, "--data-dir", str(tmp_path)]
        assert await asyncio.to_thread(main, ["keys", "revoke", key.key_id, *storage]) == 0
        await eventually(lambda: refused(keys, key.secret), "the revoked key is refused")
        assert keys.caching and keys.cached_entries == 0


async def test_a_revocation_by_another_store_is_refused(keys: KeyStore, other: KeyStore) -> None:
    kept, revoked = await keys.issue("kept"), await keys.issue("revoked")
    async with keys.watching():
        await keys.authenticate(kept.secret)
        await keys.authenticate(revoked.secret)
        assert await other.revoke(revoked.key_id)
        await eventually(lambda: refused(keys, revoked.secret), "the revoked key is refused")
        assert keys.cached_entries == 1  # only that key was dropped
        assert (await keys.authenticate(kept.secret)).key_id == kept.key_id


async def test_a_spend_limit_change_reaches_the_cache(keys: KeyStore, other: KeyStore) -> None:
    key = await keys.issue("alice")
    async with keys.watching():
        assert (await keys.authenticate(key.secret)).spend_limit is None

        async def limit_is(expected: int | None) -> bool:
            return (await keys.authenticate(key.secret)).spend_limit == expected

        assert await other.set_spend_limit(key.key_id, 1_500)
        await eventually(lambda: limit_is(1_500), "the new limit is seen")
        assert await other.set_spend_limit(key.key_id, None)
        await eventually(lambda: limit_is(None), "the lifted limit is seen")


async def test_the_watching_store_forgets_its_own_changes_at_once(keys: KeyStore) -> None:
    key = await keys.issue("alice")
    async with keys.watching():
        await keys.authenticate(key.secret)
        assert await keys.set_spend_limit(key.key_id, 10)
        assert (await keys.authenticate(key.secret)).spend_limit == 10
        assert await keys.revoke(key.key_id)
        with pytest.raises(AuthenticationError):
            await keys.authenticate(key.secret)


async def test_failures_are_not_cached(db_pool: Pool, keys: KeyStore) -> None:
    key = await keys.issue("alice")
    assert await keys.revoke(key.key_id)
    async with keys.watching():
        for _ in range(50):  # an attacker's random secrets take no room
            with pytest.raises(AuthenticationError):
                await keys.authenticate("mm-" + secrets.token_urlsafe(32))
        with pytest.raises(AuthenticationError):
            await keys.authenticate(key.secret)
        assert keys.cached_entries == 0
        await behind_its_back(
            db_pool,
            "UPDATE coordinator_api_keys SET revoked_at = NULL WHERE key_id = $1",
            key.key_id,
        )
        assert (await keys.authenticate(key.secret)).key_id == key.key_id  # read, not remembered


async def test_the_cache_keeps_at_most_max_entries_dropping_the_oldest(db_pool: Pool) -> None:
    await KeyStore.create(db_pool)
    keys = store(db_pool, FrozenClock(), max_entries=3)
    issued = [await keys.issue(f"buyer {n}") for n in range(5)]
    async with keys.watching():
        for key in issued:
            await keys.authenticate(key.secret)
        assert keys.cached_entries == 3
        await db_pool.execute("DELETE FROM coordinator_api_keys")
        for key in issued[:2]:  # evicted: read again, and gone
            with pytest.raises(AuthenticationError):
                await keys.authenticate(key.secret)
        for key in issued[2:]:  # still remembered
            assert (await keys.authenticate(key.secret)).key_id == key.key_id


class GatedReads:
    """A pool whose next ``fetchrow`` returns only once ``go`` is set."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self.read = asyncio.Event()  # the gated read has its row
        self.go = asyncio.Event()

    async def fetchrow(self, *args: Any) -> Any:
        row = await self._pool.fetchrow(*args)
        if not self.read.is_set():
            self.read.set()
            await self.go.wait()
        return row

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


async def test_a_read_that_a_revocation_overtook_is_not_cached(db_pool: Pool) -> None:
    await KeyStore.create(db_pool)
    gated = GatedReads(db_pool)
    keys = KeyStore(cast("asyncpg.Pool", gated), cache=KeyCacheConfig(), clock=FrozenClock())
    key = await keys.issue("alice")
    async with keys.watching():
        reading = asyncio.create_task(keys.authenticate(key.secret))
        await asyncio.wait_for(gated.read.wait(), WAIT_S)  # it read the key while still active
        assert await keys.revoke(key.key_id)
        gated.go.set()
        assert (await reading).key_id == key.key_id  # as if it had finished before the revoke
        with pytest.raises(AuthenticationError):
            await keys.authenticate(key.secret)
        assert keys.cached_entries == 0


async def test_a_lost_listening_connection_empties_the_cache_and_listens_again(
    db_pool: Pool, other: KeyStore, caplog: pytest.LogCaptureFixture
) -> None:
    await KeyStore.create(db_pool)
    keys = store(db_pool, FrozenClock(), relisten_delay_s=0.05, ping_interval_s=60.0)
    deleted, revoked = await keys.issue("deleted"), await keys.issue("revoked")
    async with keys.watching():
        await keys.authenticate(deleted.secret)
        await behind_its_back(
            db_pool, "DELETE FROM coordinator_api_keys WHERE key_id = $1", deleted.key_id
        )
        assert (await keys.authenticate(deleted.secret)).key_id == deleted.key_id  # cached
        with caplog.at_level(logging.WARNING, logger="coordinator.billing.keys"):
            killed = await db_pool.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND query LIKE 'LISTEN%'"
            )
            assert killed == 1

            async def warned() -> bool:
                return any("lost the connection" in r.getMessage() for r in caplog.records)

            await eventually(warned, "a WARNING about the lost connection")
        with pytest.raises(AuthenticationError):  # the cache was emptied
            await keys.authenticate(deleted.secret)

        async def caching() -> bool:
            return keys.caching

        await eventually(caching, "listening again")
        await keys.authenticate(revoked.secret)
        assert keys.cached_entries == 1
        assert await other.revoke(revoked.key_id)
        await eventually(lambda: refused(keys, revoked.secret), "the new listener hears it")


async def test_the_watcher_tears_down(database_url: str, tmp_path: Path, other: KeyStore) -> None:
    # The coordinator's own pool: it returns connections without resetting their session, so a
    # LISTEN left behind would stay on a pooled connection.
    async with connect(database_url=database_url, data_dir=tmp_path, max_size=3) as pool:
        keys = KeyStore(pool, cache=KeyCacheConfig(), clock=FrozenClock())
        key = await keys.issue("alice")
        async with keys.watching():
            with pytest.raises(RuntimeError, match="already watching"):
                async with keys.watching():
                    pytest.fail("a second watcher started")
            await keys.authenticate(key.secret)
            assert keys.cached_entries == 1 and pool.get_idle_size() < pool.get_size()
        assert not keys.caching and keys.cached_entries == 0
        assert pool.get_idle_size() == pool.get_size()  # the listening connection is back
        async with AsyncExitStack() as stack:
            connections = [
                await stack.enter_async_context(pool.acquire()) for _ in range(pool.get_size())
            ]
            for connection in connections:
                assert await connection.fetch("SELECT pg_listening_channels()") == []
        assert await other.set_spend_limit(key.key_id, 5)
        assert (await keys.authenticate(key.secret)).spend_limit == 5  # no cache: read at once
        async with keys.watching():  # and it can watch again, even for no time at all
            assert keys.caching
        assert pool.get_idle_size() == pool.get_size()
