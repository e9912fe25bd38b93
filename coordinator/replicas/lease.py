"""Replica leases: which coordinators are alive, and cleaning up after those that are not.

Every coordinator process is a replica with a row in ``coordinator_replicas``, renewed every
``renew_interval_s`` on the database clock (``now()``), so replicas on machines whose clocks
disagree still agree on who is late. A replica whose row was not renewed for ``lease_s`` is
dead; every live replica sweeps every ``sweep_interval_s``, and a sweep that finds a dead one
runs the registered cleanups for its id and deletes its row. The server registers three:
release the ledger holds it placed (``PostgresLedger.release_open_holds(holder=...)``), delete
its miner snapshot rows (``coordinator.ops.miner_snapshot.delete_replica_miners``) and drop its
spend reservations (``coordinator.billing.limits.drop_spend_reservations``). A live replica's
things are never touched: each is tagged with the id of the replica that made it.

**Exactly once.** A sweep locks a dead replica's row (``FOR UPDATE SKIP LOCKED``) in a
transaction, runs the cleanups, deletes the row and commits. A concurrent sweeper skips the
locked row; a sweeper that fails (or dies) half-way rolls back, the row is dead again and the
next sweep, by anyone, runs the cleanups again. So the cleanups run once when nothing fails,
and must be idempotent for when something does: releasing holds already closed, deleting rows
already gone and dropping reservations already dropped all do nothing.

**On exit** a replica locks its own row, runs the same cleanups for its own id (its requests
are over by then: exit the lease after the HTTP server stopped), and deletes its row. If that
fails (the database is gone), the row stays and runs out, and another replica (or this one's
next start, see :meth:`ReplicaLease.sweep`) cleans up.

**Losing the lease.** A replica paused for longer than ``lease_s`` (a frozen VM, a stop-the-
world pause, cut off from the database) is swept while it still runs: its holds are released
under its requests in flight. When its next renewal finds its row gone it logs an ERROR, sets
:attr:`ReplicaLease.lost` and registers again (so what it places from then on is covered by a
lease). The process should then stop, draining as on SIGTERM: the settlements of its requests in
flight fail (their holds are closed: nothing is billed for them, the miners are not credited),
and whatever it keeps in memory about other replicas' work is stale. A renewal that fails
(the database is unreachable) is retried; it does not count as lost until the row is known gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType

import asyncpg

from coordinator.errors import CoordinatorError

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS coordinator_replicas (
    replica_id  text PRIMARY KEY,
    host        text NOT NULL,
    pid         integer NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    renewed_at  timestamptz NOT NULL DEFAULT now()
);
"""

# pg_advisory_xact_lock key serialising the schema: concurrent CREATE ... IF NOT EXISTS
# statements of replicas starting together can still collide in the catalog ("mmreplic").
_SCHEMA_LOCK_KEY = 0x6D6D7265706C6963

# A dead replica's row: not renewed within the lease ($2 seconds), or any other replica when
# $3 (a fenced single coordinator starting up). $1 is the sweeper once registered, never swept
# by itself; NULL before (an earlier life of a given id is then dead like any other).
_DEAD = (
    "replica_id IS DISTINCT FROM $1"
    " AND ($3 OR renewed_at < now() - make_interval(secs => $2::float8))"
)

Cleanup = Callable[[str], Awaitable[object]]
"""Cleans up what the replica of the given id owns; idempotent (see the module docstring)."""


@dataclass(frozen=True)
class LeaseConfig:
    renew_interval_s: float = 2.0  # how often a replica renews its row
    lease_s: float = 10.0  # a row not renewed for this long (database clock) is a dead replica
    sweep_interval_s: float = 5.0  # how often each replica looks for dead ones
    statement_timeout_s: float = 5.0  # the longest a renewal waits before it is retried

    def __post_init__(self) -> None:
        if not 0 < 2 * self.renew_interval_s <= self.lease_s:
            raise ValueError(
                f"the lease ({self.lease_s} s) must last at least two renewals "
                f"({self.renew_interval_s} s each)"
            )
        if self.sweep_interval_s <= 0 or self.statement_timeout_s <= 0:
            raise ValueError("sweep_interval_s and statement_timeout_s must be positive")


class ReplicaIdTakenError(CoordinatorError):
    """Another live replica registered the replica id this one was given."""


class ReplicaLease:
    """This process's lease as one replica; an async context manager (module docstring).

    ``replica_id`` is known from construction (a given one, or a random UUID), so the server can
    hand it to what tags rows with it before the lease is entered. Register cleanups with
    :meth:`add_cleanup` before entering. Use from one event loop.
    """

    def __init__(
        self,
        pool: asyncpg.Pool[asyncpg.Record],
        config: LeaseConfig | None = None,
        *,
        replica_id: str | None = None,
    ) -> None:
        self.replica_id = replica_id if replica_id is not None else uuid.uuid4().hex
        # Set when a renewal found this replica's row swept: the process should stop.
        self.lost = asyncio.Event()
        self._pool = pool
        self._config = config if config is not None else LeaseConfig()
        self._cleanups: list[tuple[str, Cleanup]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._registered = False

    def add_cleanup(self, name: str, cleanup: Cleanup) -> None:
        """Runs ``cleanup(replica_id)`` for every dead replica, and for this one on exit, in
        the order added. ``name`` says which in the logs."""
        self._cleanups.append((name, cleanup))

    async def __aenter__(self) -> ReplicaLease:
        async with self._pool.acquire() as connection, connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK_KEY)
            await connection.execute(_SCHEMA)
        # Whoever died before we came; also an earlier life of a given id whose lease ran out.
        await self.sweep()
        registered = await self._pool.fetchval(
            "INSERT INTO coordinator_replicas (replica_id, host, pid) VALUES ($1, $2, $3)"
            " ON CONFLICT (replica_id) DO NOTHING RETURNING true",
            self.replica_id,
            socket.gethostname(),
            os.getpid(),
        )
        if not registered:
            raise ReplicaIdTakenError(
                f"replica id {self.replica_id!r} is registered and its lease has not run out: "
                f"another coordinator uses it, or stopped less than {self._config.lease_s:g} s ago"
            )
        self._registered = True
        self._tasks = [
            asyncio.create_task(self._renew_forever(), name="replica-lease-renew"),
            asyncio.create_task(self._sweep_forever(), name="replica-lease-sweep"),
        ]
        logger.info("replica %s registered", self.replica_id)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self._registered = False
        try:
            async with self._pool.acquire() as connection, connection.transaction():
                # Locked first, so that no sweeper runs the same cleanups meanwhile.
                await connection.execute(
                    "SELECT 1 FROM coordinator_replicas WHERE replica_id = $1 FOR UPDATE",
                    self.replica_id,
                )
                await self._clean_up(self.replica_id)
                await connection.execute(
                    "DELETE FROM coordinator_replicas WHERE replica_id = $1", self.replica_id
                )
        except Exception as error:
            logger.warning(
                "replica %s could not clean up after itself (%s); another replica will once its "
                "lease runs out",
                self.replica_id,
                error,
            )
        else:
            logger.info("replica %s cleaned up and unregistered", self.replica_id)

    async def renew(self) -> bool:
        """Renews the lease now. False when the row was gone: the lease was lost (``lost`` is
        set, an ERROR logged, and the replica registered again). Raises what the database
        raised (the next renewal tries again)."""
        renewed = await self._pool.fetchval(
            "UPDATE coordinator_replicas SET renewed_at = now() WHERE replica_id = $1"
            " RETURNING true",
            self.replica_id,
            timeout=self._config.statement_timeout_s,
        )
        if renewed:
            return True
        logger.error(
            "replica %s lost its lease: another replica found it expired and cleaned up after "
            "it (released its ledger holds, dropped its spend reservations), so its requests in "
            "flight cannot be billed; this process should stop",
            self.replica_id,
        )
        self.lost.set()
        await self._pool.execute(
            "INSERT INTO coordinator_replicas (replica_id, host, pid) VALUES ($1, $2, $3)"
            " ON CONFLICT (replica_id) DO NOTHING",
            self.replica_id,
            socket.gethostname(),
            os.getpid(),
            timeout=self._config.statement_timeout_s,
        )
        return False

    async def sweep(self, *, everyone_else: bool = False) -> list[str]:
        """Cleans up after every dead replica; returns the ids it swept (not those another
        sweeper took, or whose cleanup failed: those are logged and retried next sweep).

        ``everyone_else=True`` treats every other replica as dead, leases or not: only for a
        coordinator that knows it is the only one (the sequencer fence of single-process mode),
        at startup, to clean up after its previous run without waiting for its lease to run out.
        """
        candidates = await self._pool.fetch(
            f"SELECT replica_id FROM coordinator_replicas WHERE {_DEAD} ORDER BY renewed_at",
            self._sweeper,
            self._config.lease_s,
            everyone_else,
        )
        swept: list[str] = []
        for row in candidates:
            replica_id: str = row["replica_id"]
            try:
                if await self._sweep_one(replica_id, everyone_else=everyone_else):
                    swept.append(replica_id)
            except Exception as error:
                logger.warning(
                    "cleaning up after replica %s failed (%s); the next sweep tries again",
                    replica_id,
                    error,
                )
        return swept

    async def _sweep_one(self, replica_id: str, *, everyone_else: bool) -> bool:
        async with self._pool.acquire() as connection, connection.transaction():
            # Still dead (not renewed since), and nobody else sweeping it: it is ours until
            # commit, and its owner's renewal, if it comes back, waits and then finds it gone.
            dead = await connection.fetchval(
                f"SELECT true FROM coordinator_replicas WHERE replica_id = $4 AND {_DEAD}"
                " FOR UPDATE SKIP LOCKED",
                self._sweeper,
                self._config.lease_s,
                everyone_else,
                replica_id,
            )
            if not dead:
                return False
            logger.warning("replica %s is gone: cleaning up after it", replica_id)
            await self._clean_up(replica_id)
            await connection.execute(
                "DELETE FROM coordinator_replicas WHERE replica_id = $1", replica_id
            )
        return True

    @property
    def _sweeper(self) -> str | None:
        return self.replica_id if self._registered else None

    async def _clean_up(self, replica_id: str) -> None:
        for name, cleanup in self._cleanups:
            try:
                await cleanup(replica_id)
            except Exception:
                logger.warning("cleanup %r of replica %s failed", name, replica_id)
                raise

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._config.renew_interval_s)
            try:
                await self.renew()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
                logger.warning("replica %s could not renew its lease: %s", self.replica_id, error)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._config.sweep_interval_s)
            try:
                await self.sweep()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
                logger.warning("replica %s could not sweep: %s", self.replica_id, error)
