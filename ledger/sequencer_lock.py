"""The sequencer lock: the session advisory lock that makes one process the ledger's signer.

Held on one pool connection kept out of the pool for as long as the process is the sequencer
(``ledger/checkpointer.py`` decides when to take it, check it and give it up).
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import TYPE_CHECKING, TypeAlias

import asyncpg

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    _Connection: TypeAlias = PoolConnectionProxy[asyncpg.Record]

# pg_try_advisory_lock key held for the lifetime of the sequencer ("mmseqncr").
SEQUENCER_LOCK_KEY = 0x6D6D7365716E6372

# A lock connection that cannot answer in this long is lost; also bounds taking the lock.
_LOCK_TIMEOUT_S = 5.0
# Errors that mean "the database cannot be reached or answered badly now": retried.
DB_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

# On the lock connection, server side: if the sequencer's host vanishes without closing its
# socket, PostgreSQL drops the session, and with it the lock, after about 3 + 3 x 1 s instead of
# the system's default of hours. Ignored on Unix-domain sockets. Reset before the connection goes
# back to the pool, which does not reset sessions (ledger/database.py), with the lock released.
_KEEPALIVE_SQL = (
    "SET tcp_keepalives_idle = 3; SET tcp_keepalives_interval = 1; SET tcp_keepalives_count = 3"
)
_RELEASE_SQL = (
    "SELECT pg_advisory_unlock_all(); RESET tcp_keepalives_idle;"
    " RESET tcp_keepalives_interval; RESET tcp_keepalives_count"
)
# Run on the lock connection once the lock is held: the new epoch, and who holds it.
_BUMP_EPOCH_SQL = (
    "INSERT INTO ledger_sequencer (epoch, holder, backend_pid) VALUES (1, $1, pg_backend_pid())"
    " ON CONFLICT (singleton) DO UPDATE SET epoch = ledger_sequencer.epoch + 1,"
    " holder = EXCLUDED.holder, backend_pid = EXCLUDED.backend_pid, since = now()"
    " RETURNING epoch"
)


class SequencerLock:
    """The sequencer lock: a session advisory lock on one pool connection held out of the pool.

    The pool hands connections back without a session reset (ledger/database.py), so the
    connection goes back only after the lock was released on it; when that cannot be confirmed
    it is dropped instead, which releases the lock on the server too.
    """

    def __init__(self, pool: asyncpg.Pool[asyncpg.Record]) -> None:
        self._pool = pool
        self._connection: _Connection | None = None

    async def try_lock(self) -> bool:
        """Takes the lock if it is free; connects first if needed. Raises ``DB_ERRORS``."""
        try:
            if self._connection is None:
                self._connection = await self._pool.acquire(timeout=_LOCK_TIMEOUT_S)
                await self._connection.execute(_KEEPALIVE_SQL, timeout=_LOCK_TIMEOUT_S)
            return bool(
                await self._connection.fetchval(
                    "SELECT pg_try_advisory_lock($1)", SEQUENCER_LOCK_KEY, timeout=_LOCK_TIMEOUT_S
                )
            )
        except BaseException:
            await self.close()  # whether the lock was taken is unknown: drop the connection
            raise

    async def alive(self) -> bool:
        """Whether the lock connection still answers (its session, and so the lock, lives)."""
        if self._connection is None:
            return False
        try:
            await self._connection.fetchval("SELECT 1", timeout=_LOCK_TIMEOUT_S)
        except DB_ERRORS:
            return False
        return True

    async def bump_epoch(self) -> int:
        """A new sequencer epoch, recorded with who holds it; call with the lock held."""
        holder = f"{socket.gethostname()} pid {os.getpid()}"
        epoch = await self._held().fetchval(_BUMP_EPOCH_SQL, holder, timeout=_LOCK_TIMEOUT_S)
        return int(epoch)

    async def execute(self, query: str, *args: object) -> None:
        await self._held().execute(query, *args, timeout=_LOCK_TIMEOUT_S)

    def _held(self) -> _Connection:
        if self._connection is None:
            raise asyncpg.InterfaceError("the sequencer lock connection is closed")
        return self._connection

    async def close(self) -> None:
        """Releases the lock, if held, and the connection."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        released = False
        try:
            await connection.execute(_RELEASE_SQL, timeout=_LOCK_TIMEOUT_S)
            released = True
        except DB_ERRORS:
            pass  # dropped below (as it is when cancelled, before the cancel goes on)
        finally:
            if not released:
                # InterfaceError: already back in the pool (asyncpg frees a connection that died)
                with contextlib.suppress(asyncpg.InterfaceError):
                    connection.terminate()
            await self._pool.release(connection, timeout=_LOCK_TIMEOUT_S)
