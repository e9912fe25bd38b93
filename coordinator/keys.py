"""Buyers' API keys. Only a SHA-256 of each secret is stored; the secret is shown once.

Secrets are 256-bit random, so a plain hash is enough (no slow KDF needed: there is nothing
to brute-force). A key's public id names its ledger account.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from coordinator.api import Buyer
from coordinator.errors import AuthenticationError

_SECRET_PREFIX = "mm-"

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


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


class KeyStore:
    """API keys in the coordinator's database."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def create(cls, pool: asyncpg.Pool) -> KeyStore:
        async with pool.acquire() as connection:
            await connection.execute(_SCHEMA)
        return cls(pool)

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
        status = await self._pool.execute(
            "UPDATE coordinator_api_keys SET revoked_at = now() "
            "WHERE key_id = $1 AND revoked_at IS NULL",
            key_id,
        )
        return bool(status.endswith(" 1"))

    async def set_spend_limit(self, key_id: str, spend_limit: int | None) -> bool:
        """Sets or (with None) lifts a key's spend limit; False when there is no such key."""
        status = await self._pool.execute(
            "UPDATE coordinator_api_keys SET spend_limit = $2 WHERE key_id = $1",
            key_id,
            spend_limit,
        )
        return bool(status.endswith(" 1"))

    async def spend_limit(self, key_id: str) -> int | None:
        """Micro-units the key may spend in all; None when unlimited or unknown."""
        value = await self._pool.fetchval(
            "SELECT spend_limit FROM coordinator_api_keys WHERE key_id = $1", key_id
        )
        return int(value) if value is not None else None

    async def authenticate(self, secret: str) -> Buyer:
        if not secret.startswith(_SECRET_PREFIX) or len(secret) > 256:
            raise AuthenticationError("invalid API key")
        row = await self._pool.fetchrow(
            "SELECT key_id, name FROM coordinator_api_keys "
            "WHERE secret_sha256 = $1 AND revoked_at IS NULL",
            _digest(secret),
        )
        if row is None:
            raise AuthenticationError("invalid API key")
        return Buyer(key_id=row["key_id"], name=row["name"])
