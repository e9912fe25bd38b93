"""Connects to the ledger's PostgreSQL: the operator's server, or an embedded one in the data dir.

Either way the caller gets an asyncpg pool and runs the same SQL; only where the server comes
from differs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from ledger.embedded import EmbeddedPostgres
from ledger.interface import LedgerError

logger = logging.getLogger(__name__)


class DatabaseUnreachableError(LedgerError, OSError):
    """PostgreSQL at the given URL cannot be reached, or refuses the connection."""


EMBEDDED_SUBDIR = "postgres"  # the embedded server's PGDATA, relative to the data dir
_CLOSE_TIMEOUT_S = 10.0  # how long closing waits for borrowed connections before cutting them


@asynccontextmanager
async def connect(
    *,
    database_url: str | None,
    data_dir: Path,
    min_size: int = 1,
    max_size: int = 10,
    connect_timeout: float = 10.0,
) -> AsyncIterator[asyncpg.Pool[asyncpg.Record]]:
    """Yields a pool on ``database_url``, or on an embedded server in ``data_dir/postgres``.

    The embedded server is started on entry (``data_dir`` is created if missing) and released
    on exit; it keeps running while another process still uses it.
    """
    async with AsyncExitStack() as stack:
        url = database_url
        if url is None:
            embedded = EmbeddedPostgres(data_dir / EMBEDDED_SUBDIR)
            url = (await stack.enter_async_context(embedded)).url
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=min_size,
                max_size=max_size,
                timeout=connect_timeout,
                reset=_keep_session,
            )
        except (OSError, TimeoutError, asyncpg.PostgresError) as error:
            raise DatabaseUnreachableError(
                f"cannot reach PostgreSQL at {_redacted(url)}: {error or type(error).__name__}"
            ) from error
        stack.push_async_callback(_close, pool)
        yield pool


async def _keep_session(connection: asyncpg.Connection[asyncpg.Record]) -> None:
    """Returns a connection to the pool as it is.

    asyncpg's default sends a reset query (unlock advisory locks, UNLISTEN, RESET ALL) on every
    release: one more round trip per pooled query, a tenth of a request's database time. Our
    code keeps no session state on pooled connections (only transaction-scoped advisory locks,
    listeners on connections of their own), so there is nothing to reset; an open transaction
    is still rolled back by the pool itself.
    """


async def _close(pool: asyncpg.Pool[asyncpg.Record]) -> None:
    try:
        await asyncio.wait_for(pool.close(), _CLOSE_TIMEOUT_S)
    except TimeoutError:
        logger.warning("connections still in use after %.0f s; closing them", _CLOSE_TIMEOUT_S)
        pool.terminate()


def _redacted(url: str) -> str:
    """``url`` without its password, for an error message."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
