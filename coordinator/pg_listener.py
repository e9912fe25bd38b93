"""A PostgreSQL LISTEN that survives its connection: one pool connection held out of the pool.

The pool hands connections back without a session reset (``ledger/database.py``), so a listener
must UNLISTEN before it gives its connection back, or drop the connection instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

_Connection: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"
_AnyConnection: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"

logger = logging.getLogger(__name__)

PING_TIMEOUT_S = 5.0  # a listening connection that cannot answer SELECT 1 in this is lost
_CLOSE_TIMEOUT_S = 5.0  # UNLISTEN at shutdown; past it the connection is dropped instead


class ChannelListener:
    """One pool connection held out of the pool, LISTENing on one channel."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        connection: _Connection,
        *,
        channel: str,
        on_notify: Callable[[str], None],
    ) -> None:
        self._pool = pool
        self._connection = connection
        self._channel = channel
        self._on_notify = on_notify  # called with the payload of each notification
        self._lost = asyncio.Event()

    @classmethod
    async def open(
        cls, pool: asyncpg.Pool, *, channel: str, on_notify: Callable[[str], None]
    ) -> ChannelListener:
        connection: _Connection = await pool.acquire(timeout=PING_TIMEOUT_S)
        listener = cls(pool, connection, channel=channel, on_notify=on_notify)
        try:
            connection.add_termination_listener(listener._terminated)
            await connection.add_listener(channel, listener._notified)
        except BaseException:
            await listener.close(healthy=False)
            raise
        return listener

    async def until_lost(self, *, ping_interval_s: float) -> str:
        """Returns, with the reason, once the connection is gone or stops answering."""
        while True:
            try:
                await asyncio.wait_for(self._lost.wait(), ping_interval_s)
                return "connection closed"
            except TimeoutError:
                pass
            try:
                await asyncio.wait_for(self._connection.fetchval("SELECT 1"), PING_TIMEOUT_S)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                return repr(error)

    async def close(self, *, healthy: bool) -> None:
        """Gives the connection back without a LISTEN on it (the pool does not reset sessions):
        one that is lost, will not UNLISTEN or is interrupted doing it is dropped instead."""
        connection = self._connection
        clean = False
        try:
            if healthy and not self._lost.is_set():
                await asyncio.wait_for(
                    connection.remove_listener(self._channel, self._notified), _CLOSE_TIMEOUT_S
                )
                connection.remove_termination_listener(self._terminated)
                clean = True
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pass  # dropped below
        finally:
            if not clean and not self._lost.is_set():
                # InterfaceError: already back in the pool (asyncpg frees a connection that died)
                with suppress(asyncpg.InterfaceError):
                    connection.terminate()
            await self._pool.release(connection, timeout=_CLOSE_TIMEOUT_S)

    def _notified(
        self, _connection: _AnyConnection, _pid: int, _channel: str, payload: object
    ) -> None:
        self._on_notify(str(payload))

    def _terminated(self, _connection: _AnyConnection) -> None:
        self._lost.set()


async def follow(
    pool: asyncpg.Pool,
    *,
    channel: str,
    reload: Callable[[frozenset[str] | None], Awaitable[object]],
    refresh_s: float,
    what: str,
    on_reload_failure: Callable[[Exception], None],
) -> None:
    """Keeps a cache current until cancelled: LISTENs on ``channel`` and calls ``reload`` with
    the payloads announced since its last call, or with None every ``refresh_s`` without one
    (the backstop for a listener that is down). A reload that fails is told to
    ``on_reload_failure`` and drops the listener, which is opened again on the next round."""
    announced: set[str] = set()
    wake = asyncio.Event()

    def notified(payload: str) -> None:
        announced.add(payload)
        wake.set()

    listener: ChannelListener | None = None
    try:
        while True:
            if listener is None:
                try:
                    listener = await ChannelListener.open(pool, channel=channel, on_notify=notified)
                except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                    logger.warning(
                        "cannot listen for %s (%r); reloading every %g s", what, e, refresh_s
                    )
            with suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), refresh_s)
            wake.clear()
            payloads = frozenset(announced) or None
            announced.clear()
            try:
                await reload(payloads)
            except Exception as error:  # the database is gone, or a bug: the caller decides
                on_reload_failure(error)
                if listener is not None:
                    await listener.close(healthy=False)
                    listener = None
    finally:
        if listener is not None:
            await listener.close(healthy=True)
