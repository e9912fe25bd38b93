"""An embedded PostgreSQL server in a local data directory, for operators who run no database.

Wraps the ``pgserver`` package, which ships PostgreSQL binaries, runs ``initdb`` on first use and
listens on a unix socket only. Several processes may share one data directory (the coordinator
and ``meshmint-ledger balance`` at the same time): pgserver records every process holding a
handle in ``PGDATA/.handle_pids.json`` under an inter-process lock and stops the server only when
the last one lets go. Within one process, handles on one directory share one pgserver instance,
counted here. Two gaps in pgserver 0.1.4 are closed here: holders that died without letting go
are dropped from that list, and a released handle is not reused (see the helpers below).

When the data directory is too long for a unix socket path (about 107 bytes), pgserver puts the
socket in a short per-user runtime directory instead; the URL names wherever it ended up.
Run as root, pgserver runs PostgreSQL as a system user ``pgserver`` (created if missing) and
makes every ancestor of the data directory world-traversable (o+rx) so that user can reach it.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import threading
import warnings
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Self

logger = logging.getLogger(__name__)

# pgserver's get_server and its handle file are not safe across threads of one process; every
# start and stop in this process goes through this lock and the count of handles below.
_registry_lock = threading.Lock()
_registry: dict[Path, tuple[Any, int]] = {}  # resolved PGDATA -> (pgserver handle, holders here)


class EmbeddedPostgres:
    """A PostgreSQL server running from ``data_dir``, started on entry and released on exit.

    Usable as ``async with`` (start and stop run in a worker thread) or plain ``with``. Leaving
    does not stop a server that another handle, in this process or another, still uses.
    """

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir.expanduser().resolve()
        self._url: str | None = None

    @property
    def data_dir(self) -> Path:
        """The PGDATA directory (absolute)."""
        return self._data_dir

    @property
    def url(self) -> str:
        """A ``postgresql://`` URL for the ``postgres`` database over the server's unix socket."""
        if self._url is None:
            raise RuntimeError("EmbeddedPostgres is not started")
        return self._url

    def start(self) -> None:
        """Starts the server, or joins the one already running on this directory. Blocks."""
        if self._url is not None:
            raise RuntimeError("EmbeddedPostgres is already started")
        pgserver = _import_pgserver()
        self._data_dir.parent.mkdir(parents=True, exist_ok=True)
        with _registry_lock:
            server, holders = _registry.get(self._data_dir, (None, 0))
            if server is None:
                logger.info("starting embedded PostgreSQL in %s", self._data_dir)
                server = pgserver.get_server(self._data_dir, cleanup_mode="stop")
            _registry[self._data_dir] = (server, holders + 1)
        self._url = str(server.get_uri())
        logger.debug("embedded PostgreSQL at %s", self._url)

    def stop(self) -> None:
        """Releases this handle; stops the server if no process uses it any more. Blocks."""
        if self._url is None:
            return
        self._url = None
        with _registry_lock:
            server, holders = _registry[self._data_dir]
            if holders > 1:
                _registry[self._data_dir] = (server, holders - 1)
                return
            del _registry[self._data_dir]
            _forget_dead_holders(server)
            server.cleanup()
            _forget_handle(server)
        logger.info("released embedded PostgreSQL in %s", self._data_dir)

    async def __aenter__(self) -> Self:
        starting = asyncio.ensure_future(asyncio.to_thread(self.start))
        try:
            await asyncio.shield(starting)
        except asyncio.CancelledError:
            # The thread cannot be interrupted: wait for it, then give back what it started.
            await asyncio.wait([starting])
            if not starting.cancelled() and starting.exception() is None:
                await asyncio.to_thread(self.stop)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _import_pgserver() -> ModuleType:
    # Importing pgserver evaluates platformdirs.user_runtime_path, which warns when
    # XDG_RUNTIME_DIR is unset (containers, cron, root shells) although its /tmp fallback works.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        import pgserver

    return pgserver


def _forget_dead_holders(server: Any) -> None:
    """Drops processes that died without letting go from pgserver's handle list.

    pgserver stops the server only when the exiting process is the last one listed, so one
    killed holder (kill -9, out of memory) would otherwise leave the server running forever.
    Best effort: the file format is pgserver's own.
    """
    handles = Path(server.pgdata) / ".handle_pids.json"
    try:
        with type(server)._lock:
            pids = json.loads(handles.read_text()) if handles.exists() else []
            alive = [pid for pid in pids if isinstance(pid, int) and _process_exists(pid)]
            if alive != pids:
                logger.info(
                    "forgetting dead holders of %s: %s", server.pgdata, set(pids) - set(alive)
                )
                handles.write_text(json.dumps(alive))
    except (OSError, ValueError, AttributeError) as exc:
        logger.debug("could not check pgserver handles in %s: %s", server.pgdata, exc)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, alive
    return True


def _forget_handle(server: Any) -> None:
    """Drops pgserver's in-process references to a released handle.

    When other processes still hold the server, pgserver's cleanup leaves the handle cached, and
    its get_server would hand that stale handle back on our next start without listing this
    process as a holder again: the other process leaving would then stop the server under us.
    """
    instances: dict[Path, Any] = getattr(type(server), "_instances", {})
    pgdata = server.pgdata
    if instances.get(pgdata) is server:
        del instances[pgdata]
    # pgserver registers an exit hook per handle; this one is done.
    cleanup = getattr(server, "_cleanup", None)
    if cleanup is not None:
        atexit.unregister(cleanup)
