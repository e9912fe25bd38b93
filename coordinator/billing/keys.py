"""Buyers' API keys. Only a SHA-256 of each secret is stored; the secret is shown once.

Secrets are 256-bit random, so a plain hash is enough (no slow KDF needed: there is nothing
to brute-force). A key's public id names its ledger account.

While :meth:`KeyStore.watching` runs (the coordinator's ``serve``), successful authentications
are kept in memory, so a busy key costs no database round trip per request. Changes reach that
cache at once: :meth:`KeyStore.revoke` and :meth:`KeyStore.set_spend_limit` send
``pg_notify('meshmint_keys', key_id)`` in their UPDATE, whichever process runs them (the
``keys`` CLI does), and the watcher LISTENs on a connection of its own and drops the key. Without
a listening connection (none yet, or it was lost) nothing is cached, so a bare KeyStore (the CLI,
most tests) reads the database every time.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from coordinator.api import Buyer
from coordinator.errors import AuthenticationError
from coordinator.pg_listener import ChannelListener

logger = logging.getLogger(__name__)


_SECRET_PREFIX = "mm-"

CHANNEL = "meshmint_keys"
"""Where key changes are announced; the payload is the key id."""

CACHE_TTL_S = 5.0
"""Longest a cached authentication is served without reading the database again.

Only a backstop: revocations and limit changes made through KeyStore arrive by NOTIFY at once.
It bounds how long a change that sends no notification goes unseen (a row edited by hand, or a
listening connection dead without its socket noticing), while a busy key still costs one SELECT
per TTL at most."""

_MAX_RELISTEN_DELAY_S = 30.0  # cap of the doubling wait between attempts to listen again

_SCHEMA = """
CREATE TABLE IF NOT EXISTS coordinator_api_keys (
    key_id        text PRIMARY KEY,
    name          text NOT NULL,
    secret_sha256 bytea NOT NULL UNIQUE,
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz
);
-- Micro-units the key may spend in all (the sum of its jobs' costs); NULL: no limit.
ALTER TABLE coordinator_api_keys ADD COLUMN IF NOT EXISTS spend_limit bigint;
"""


@dataclass(frozen=True)
class NewKey:
    key_id: str  # public id; names the buyer's ledger account
    secret: str  # the bearer token; shown once, never stored


@dataclass(frozen=True)
class KeyInfo:
    """A key as the operator sees it (never its secret)."""

    key_id: str  # public id
    name: str  # the operator's label
    created_at: datetime  # when it was issued
    revoked_at: datetime | None  # when it was revoked; None while active
    spend_limit: int | None  # micro-units it may spend in all; None: no limit


@dataclass(frozen=True)
class KeyCacheConfig:
    """The cache of authentications that :meth:`KeyStore.watching` turns on."""

    max_entries: int = 10_000  # keys remembered at once; past it the oldest entry is dropped
    ttl_s: float = CACHE_TTL_S  # backstop; see CACHE_TTL_S
    ping_interval_s: float = 10.0  # how often the listening connection is checked when quiet
    relisten_delay_s: float = 1.0  # first wait before listening again; doubles up to 30 s


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


class KeyStore:
    """API keys in the coordinator's database."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        cache: KeyCacheConfig = KeyCacheConfig(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._config = cache
        self._clock = clock
        # secret digest -> (buyer, clock reading when it expires); oldest first
        self._cache: OrderedDict[bytes, tuple[Buyer, float]] = OrderedDict()
        self._digests: dict[str, set[bytes]] = {}  # key id -> its digests in the cache
        self._caching = False  # True only while a connection LISTENs for changes
        # Bumped by every invalidation: a read that started before one must not be cached.
        self._generation = 0
        self._watcher: asyncio.Task[None] | None = None  # set while watching() runs
        self._listener: ChannelListener | None = None  # the connection listening now, if any

    @classmethod
    async def create(
        cls, pool: asyncpg.Pool, *, cache: KeyCacheConfig = KeyCacheConfig()
    ) -> KeyStore:
        async with pool.acquire() as connection:
            await connection.execute(_SCHEMA)
        return cls(pool, cache=cache)

    @property
    def caching(self) -> bool:
        """Whether authentications are served from memory now (a watcher is listening)."""
        return self._caching

    @property
    def cached_entries(self) -> int:
        """Authentications held in memory now."""
        return len(self._cache)

    async def issue(self, name: str, *, spend_limit: int | None = None) -> NewKey:
        key = NewKey(
            key_id=f"key_{secrets.token_hex(8)}",
            secret=_SECRET_PREFIX + secrets.token_urlsafe(32),
        )
        await self._pool.execute(
            "INSERT INTO coordinator_api_keys (key_id, name, secret_sha256, spend_limit) "
            "VALUES ($1, $2, $3, $4)",
            key.key_id,
            name,
            _digest(key.secret),
            spend_limit,
        )
        return key

    async def list_keys(self) -> list[KeyInfo]:
        """Every key, newest first."""
        rows = await self._pool.fetch(
            "SELECT key_id, name, created_at, revoked_at, spend_limit FROM coordinator_api_keys "
            "ORDER BY created_at DESC, key_id"
        )
        return [KeyInfo(**dict(row)) for row in rows]

    async def revoke(self, key_id: str) -> bool:
        # The notification is part of the UPDATE, so it is sent exactly when the change commits.
        rows = await self._pool.fetch(
            "UPDATE coordinator_api_keys SET revoked_at = now() "
            "WHERE key_id = $1 AND revoked_at IS NULL "
            f"RETURNING pg_notify('{CHANNEL}', key_id)",
            key_id,
        )
        self._forget(key_id)
        return len(rows) == 1

    async def set_spend_limit(self, key_id: str, spend_limit: int | None) -> bool:
        """Sets or (with None) lifts a key's spend limit; False when there is no such key."""
        rows = await self._pool.fetch(
            "UPDATE coordinator_api_keys SET spend_limit = $2 WHERE key_id = $1 "
            f"RETURNING pg_notify('{CHANNEL}', key_id)",
            key_id,
            spend_limit,
        )
        self._forget(key_id)
        return len(rows) == 1

    async def spend_limit(self, key_id: str) -> int | None:
        """Micro-units the key may spend in all; None when unlimited or unknown."""
        value = await self._pool.fetchval(
            "SELECT spend_limit FROM coordinator_api_keys WHERE key_id = $1", key_id
        )
        return int(value) if value is not None else None

    async def authenticate(self, secret: str) -> Buyer:
        """The active key whose secret this is, with its spend limit.

        Served from memory while a watcher listens; failures are never cached (anyone can send
        random secrets, and they must not push real keys out)."""
        if not secret.startswith(_SECRET_PREFIX) or len(secret) > 256:
            raise AuthenticationError("invalid API key")
        digest = _digest(secret)
        if self._caching:
            cached = self._cache.get(digest)
            if cached is not None:
                if self._clock() < cached[1]:
                    return cached[0]
                self._drop(digest, cached[0].key_id)
        generation = self._generation
        row = await self._pool.fetchrow(
            "SELECT key_id, name, spend_limit FROM coordinator_api_keys "
            "WHERE secret_sha256 = $1 AND revoked_at IS NULL",
            digest,
        )
        if row is None:
            raise AuthenticationError("invalid API key")
        limit = row["spend_limit"]
        buyer = Buyer(
            key_id=row["key_id"],
            name=row["name"],
            spend_limit=int(limit) if limit is not None else None,
        )
        if self._caching and generation == self._generation:
            self._remember(digest, buyer)
        return buyer

    @asynccontextmanager
    async def watching(self) -> AsyncIterator[None]:
        """Caches authentications while the block runs, listening for key changes.

        The first LISTEN happens before the block starts; if it fails, or the connection is lost
        later, a WARNING is logged, the cache is emptied and stays off, and the watcher tries
        again in the background. Nothing it meets ends the block."""
        if self._watcher is not None:
            raise RuntimeError("this KeyStore is already watching")
        self._listener = await self._try_listen()
        self._watcher = asyncio.create_task(self._watch(), name="meshmint-keys-watcher")
        try:
            yield
        finally:
            watcher, self._watcher = self._watcher, None
            watcher.cancel()
            await asyncio.wait([watcher])  # not "await watcher": a cancel of ours must propagate
            # Also when the watcher was cancelled before it ever ran.
            await self._drop_listener(healthy=True)

    async def _watch(self) -> None:
        try:
            await self._keep_listening()
        except Exception:  # a bug here must cost the cache, never the coordinator
            logger.exception("the API key watcher failed; authenticating from the database")
            self._stop_caching()

    async def _keep_listening(self) -> None:
        delay = self._config.relisten_delay_s
        while True:
            if self._listener is None:
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_RELISTEN_DELAY_S)
                self._listener = await self._try_listen()
                continue
            delay = self._config.relisten_delay_s
            reason = await self._listener.until_lost(ping_interval_s=self._config.ping_interval_s)
            logger.warning(
                "lost the connection listening for API key changes (%s); "
                "authenticating from the database until it is back",
                reason,
            )
            await self._drop_listener(healthy=False)

    async def _drop_listener(self, *, healthy: bool) -> None:
        self._stop_caching()
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.close(healthy=healthy)

    async def _try_listen(self) -> ChannelListener | None:
        try:
            listener = await ChannelListener.open(
                self._pool, channel=CHANNEL, on_notify=self._on_change
            )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            logger.warning(
                "cannot listen for API key changes (%r); authenticating from the database", error
            )
            return None
        # Whatever changed while nobody listened went unannounced: start from nothing.
        self._clear()
        self._caching = True
        return listener

    def _on_change(self, key_id: str) -> None:
        logger.debug("API key %s changed", key_id)
        self._forget(key_id)

    def _remember(self, digest: bytes, buyer: Buyer) -> None:
        self._cache.pop(digest, None)
        while len(self._cache) >= max(1, self._config.max_entries):
            oldest, (evicted, _) = next(iter(self._cache.items()))
            self._drop(oldest, evicted.key_id)
        self._cache[digest] = (buyer, self._clock() + self._config.ttl_s)
        self._digests.setdefault(buyer.key_id, set()).add(digest)

    def _drop(self, digest: bytes, key_id: str) -> None:
        self._cache.pop(digest, None)
        digests = self._digests.get(key_id)
        if digests is not None:
            digests.discard(digest)
            if not digests:
                del self._digests[key_id]

    def _forget(self, key_id: str) -> None:
        self._generation += 1
        for digest in self._digests.pop(key_id, set()):
            self._cache.pop(digest, None)

    def _clear(self) -> None:
        self._generation += 1
        self._cache.clear()
        self._digests.clear()

    def _stop_caching(self) -> None:
        self._caching = False
        self._clear()
