"""The log's sequencer role: signing checkpoints, held by one process at a time, and fenced.

Any process may append entries: each append transaction takes the log lock, so an entry is
durable and in its final place in the log when its transaction commits. Only the *sequencer*
signs checkpoints. The role is a session advisory lock (``SEQUENCER_LOCK_KEY``) on a connection
the sequencer keeps out of the pool, so it lasts exactly as long as that connection:

- ``Checkpointer.running(..., standby=False)``, a single coordinator: refuses to start
  (``SequencerFencedError``) when another process holds the lock.
- ``standby=True``, a replica: when another process holds the lock it waits, trying the lock
  every ``lock_poll_s``, and takes over once the lock is free. PostgreSQL frees a session lock
  as soon as it sees the holder's connection close (a killed process's sockets close at once).

Becoming the sequencer bumps the *epoch* in ``ledger_sequencer``, and every checkpoint is stored
by a statement that locks that row and stores only if the epoch is still the writer's. A
sequencer that lost its lock connection while its loop still runs on other pooled connections
can therefore never store a checkpoint after its successor took over. When a write is fenced
that way, or the lock connection stops answering, the sequencer steps down: a standby waits for
the lock again; a single coordinator takes the lock again if it is free and otherwise stops
signing, and ``running`` raises ``SequencerFencedError`` when its block ends.

Before signing, the checkpointer verifies consistency proofs from the newest stored checkpoint
(whoever signed it) and from the last one it signed itself to the new tree: it never signs a
checkpoint that contradicts one it signed or one that is published, even if someone rewrote the
tables underneath it. Of two checkpoints of one size only the first stored is kept, and
``latest`` is always the stored one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import NoReturn

import asyncpg

from ledger.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointSigner,
    parse_signed_checkpoint,
)
from ledger.interface import LedgerError
from ledger.log_reader import LogReader, StoredCheckpoint
from ledger.merkle import verify_consistency
from ledger.sequencer_lock import DB_ERRORS as _DB_ERRORS
from ledger.sequencer_lock import SequencerLock

logger = logging.getLogger(__name__)

# The newest stored checkpoint, if any, and the current epoch, if any, in one round trip.
_LATEST_SQL = (
    "SELECT (SELECT epoch FROM ledger_sequencer) AS epoch, c.size, c.root, c.note"
    " FROM (SELECT) AS one LEFT JOIN LATERAL ("
    "  SELECT size, root, note FROM ledger_checkpoints ORDER BY size DESC LIMIT 1"
    " ) AS c ON true"
)
# One statement: lock the epoch row (FOR SHARE waits for a takeover in flight and then sees its
# epoch), store the checkpoint only if the epoch is still $4, and say which epoch was found and
# whether a row was stored (none is either fenced or another checkpoint of this size exists).
# A takeover's bump waits for this row lock, so every checkpoint of an older epoch is committed
# before the new sequencer reads the stored latest one.
_STORE_FENCED_SQL = (
    "WITH fence AS (SELECT epoch FROM ledger_sequencer FOR SHARE),"
    " stored AS ("
    "  INSERT INTO ledger_checkpoints (size, root, note, epoch)"
    "  SELECT $1, $2, $3, epoch FROM fence WHERE epoch = $4"
    "  ON CONFLICT (size) DO NOTHING RETURNING size)"
    " SELECT (SELECT epoch FROM fence) AS epoch, EXISTS (SELECT FROM stored) AS stored"
)
# A Checkpointer used without running() (tests, tools) stores unfenced, as epoch 0.
_STORE_SQL = (
    "INSERT INTO ledger_checkpoints (size, root, note) VALUES ($1, $2, $3)"
    " ON CONFLICT (size) DO NOTHING RETURNING size"
)


@dataclass(frozen=True)
class CheckpointerConfig:
    origin: str  # the log's name, the first line of every checkpoint; never change it
    interval_s: float = 0.5  # how often new entries are looked for (well under once a second)
    allow_key_rotation: bool = False  # sign even though the last checkpoint used another key
    # How often a standby tries the sequencer lock, and the sequencer checks that its lock
    # connection still answers (at least as often as it signs). A dead sequencer is replaced
    # within this long after PostgreSQL frees its lock.
    lock_poll_s: float = 1.0


class SequencerFencedError(LedgerError, RuntimeError):
    """Another process holds the sequencer lock of this database, or took the role over."""


class SigningKeyChangedError(LedgerError, RuntimeError):
    """The last checkpoint was signed by another key, and rotation was not asked for."""


class LogForkError(LedgerError, RuntimeError):
    """The stored tree is not an extension of a signed checkpoint: refuse to sign."""


class Checkpointer:
    """Signs a checkpoint whenever the log has grown, while it is the sequencer.

    ``latest`` is the newest checkpoint it knows: the one it stored or found stored, and on a
    standby the one the sequencer stored (read every ``lock_poll_s``). ``is_sequencer`` says
    whether it signs now, ``epoch`` under which epoch.
    """

    def __init__(
        self,
        pool: asyncpg.Pool[asyncpg.Record],
        signer: CheckpointSigner,
        config: CheckpointerConfig,
    ) -> None:
        self._pool = pool
        self._signer = signer
        self._config = config
        self._reader = LogReader(pool)
        self.latest: StoredCheckpoint | None = None
        self._lock = asyncio.Lock()
        self._fenced = False  # set by running(): from then on only an epoch holder stores
        self._epoch: int | None = None  # the epoch this process signs under while sequencer

    @property
    def is_sequencer(self) -> bool:
        """Whether this process holds the sequencer role now (and signs)."""
        return self._epoch is not None

    @property
    def epoch(self) -> int | None:
        """The sequencer epoch this process signs under; None while it is not the sequencer."""
        return self._epoch

    @classmethod
    @contextlib.asynccontextmanager
    async def running(
        cls,
        pool: asyncpg.Pool[asyncpg.Record],
        signer: CheckpointSigner,
        config: CheckpointerConfig,
        *,
        standby: bool = False,
    ) -> AsyncIterator[Checkpointer]:
        """Holds the sequencer role and signs every ``interval_s`` while the block runs.

        Without ``standby`` it raises ``SequencerFencedError`` at once when another process is
        the sequencer, as it always did. With it, it waits for the role in the background and
        takes it over when the holder's connection dies. ``SigningKeyChangedError`` is raised at
        once when the latest stored checkpoint does not verify with ``signer`` (and rotation was
        not asked for), by a sequencer and by a standby that waits alike; a standby that meets
        that only when it takes over logs CRITICAL, lets the lock go and never signs (see
        ``_take_over``). On exit, a sequencer signs what the log
        holds by then; an error that stopped the signing (``LogForkError``, and without
        ``standby`` a ``SequencerFencedError`` or ``SigningKeyChangedError`` met after the
        start) is raised then.
        """
        checkpointer = cls(pool, signer, config)
        checkpointer._fenced = True
        lock = SequencerLock(pool)
        try:
            if await lock.try_lock():
                await checkpointer._take_over(lock, quiet=False)
                logger.info("ledger sequencer (epoch %d)", checkpointer._epoch)
            elif not standby:
                raise SequencerFencedError(
                    "another coordinator is already the ledger sequencer of this database"
                )
            else:
                # A standby's key is checked now too, so that a wrong one fails at start.
                checkpointer.latest = await checkpointer._reader.latest_checkpoint()
                problem = checkpointer._key_problem(checkpointer.latest)
                if problem is not None and not config.allow_key_rotation:
                    raise checkpointer._key_changed(problem)
                logger.info("another process is the ledger sequencer; standing by to take over")
            task = asyncio.create_task(
                checkpointer._serve(lock, standby=standby), name="ledger-sequencer"
            )
            try:
                yield checkpointer
            finally:
                task.cancel()
                await asyncio.wait([task])  # not "await task": a cancel of ours must propagate
                if not task.cancelled() and (error := task.exception()) is not None:
                    raise error
                if checkpointer.is_sequencer:
                    try:
                        await checkpointer.checkpoint()
                    except SequencerFencedError:
                        if not standby:
                            raise
                        logger.warning("deposed as the ledger sequencer while shutting down")
        finally:
            checkpointer._epoch = None
            await lock.close()

    async def checkpoint(self) -> StoredCheckpoint | None:
        """Signs the current tree if it grew since the latest stored checkpoint; returns the
        latest stored one.

        Raises ``LogForkError`` if the tree does not extend the latest stored checkpoint or the
        last one this checkpointer signed. Under ``running`` it raises ``SequencerFencedError``
        when this process is not the sequencer, or when another took over since (it then steps
        down: ``is_sequencer`` is False). A Checkpointer used without ``running`` signs unfenced.
        """
        async with self._lock:
            epoch = self._epoch
            if self._fenced and epoch is None:
                raise SequencerFencedError("this process is not the ledger sequencer")
            # The stored latest before the head: the head only grows, so it is never behind.
            row = await self._pool.fetchrow(_LATEST_SQL)
            assert row is not None, "the statement always returns one row"
            if epoch is not None and row["epoch"] != epoch:
                # Seen early, also when there is nothing to sign; the store below is what fences.
                self._deposed(epoch, row["epoch"], "nothing was signed")
            stored = (
                None
                if row["size"] is None
                else StoredCheckpoint(row["size"], row["root"], row["note"])
            )
            head = await self._reader.head()
            mine = self.latest
            for base in (stored, mine if mine != stored else None):
                if base is not None:
                    await self._check_extends(base, head.size, head.root)
            if stored is not None and stored.size == head.size:
                self.latest = stored
                return stored
            note = self._signer.sign(Checkpoint(self._config.origin, head.size, head.root))
            self.latest = await self._store(StoredCheckpoint(head.size, head.root, note), epoch)
            return self.latest

    async def _check_extends(self, base: StoredCheckpoint, size: int, root: bytes) -> None:
        if base.size > size:
            raise LogForkError(
                f"the stored log has {size} entries, fewer than the signed checkpoint of size "
                f"{base.size}: refusing to sign"
            )
        if base.size == size:
            if base.root != root:
                raise LogForkError(f"the tree of size {size} changed its root")
            return
        proof = await self._reader.consistency_proof(base.size, size)
        if not verify_consistency(base.size, size, proof, base.root, root):
            raise LogForkError(
                f"the stored log of size {size} is not an extension of the signed "
                f"checkpoint of size {base.size}: refusing to sign"
            )

    async def _store(self, checkpoint: StoredCheckpoint, epoch: int | None) -> StoredCheckpoint:
        """Stores ``checkpoint`` (fenced by ``epoch`` under running()); returns what is stored
        at its size, which is another signer's checkpoint if one got there first."""
        size, root, note = checkpoint.size, checkpoint.root, checkpoint.note
        if epoch is None:
            stored = await self._pool.fetchval(_STORE_SQL, size, root, note) is not None
        else:
            row = await self._pool.fetchrow(_STORE_FENCED_SQL, size, root, note, epoch)
            assert row is not None, "the statement always returns one row"
            if row["epoch"] != epoch:
                self._deposed(epoch, row["epoch"], f"the checkpoint of size {size} was not stored")
            stored = row["stored"]
        if stored:
            return checkpoint
        found = await self._reader.checkpoints(size, 1)
        if not found or found[0].size != size:
            raise LogForkError(f"the checkpoint of size {size} vanished as it was stored")
        if found[0].root != root:
            raise LogForkError(
                f"another checkpoint of size {size} with a different root is stored: refusing "
                "to sign"
            )
        return found[0]

    def _deposed(self, epoch: int, current: int | None, what: str) -> NoReturn:
        if self._epoch == epoch:
            self._epoch = None
        raise SequencerFencedError(
            f"another process took over as the ledger sequencer (epoch {current}, ours {epoch}):"
            f" {what}"
        )

    async def _serve(self, lock: SequencerLock, *, standby: bool) -> None:
        """Signs while this process is the sequencer; otherwise waits for the lock. Ends only
        with an error (which running() raises when its block ends) or a key that may not sign.
        """
        try:
            await self._take_turns(lock, standby=standby)
        except LogForkError:
            # The lock stays held until running() ends: no replica signs over a fork.
            logger.critical("ledger fork detected; checkpoints stopped", exc_info=True)
            raise
        except (SequencerFencedError, SigningKeyChangedError) as error:
            logger.error("stopped signing ledger checkpoints: %s", error)
            raise
        except Exception:
            logger.exception("the ledger sequencer failed; checkpoints stopped")
            raise

    async def _take_turns(self, lock: SequencerLock, *, standby: bool) -> None:
        while True:
            if self._epoch is None:
                await self._wait_for_lock(lock, refuse=not standby)
                try:
                    if not await self._take_over(lock, quiet=standby):
                        await lock.close()
                        return  # this replica's key may not sign: it stays a standby for good
                except (*_DB_ERRORS, SequencerFencedError):
                    logger.warning("could not take over as the ledger sequencer", exc_info=True)
                    self._epoch = None
                    await lock.close()
                    await asyncio.sleep(self._config.lock_poll_s)
                    continue
                logger.warning("took over as the ledger sequencer (epoch %d)", self._epoch)
            reason = await self._sign_while_held(lock)
            epoch, self._epoch = self._epoch, None
            if isinstance(reason, SequencerFencedError) and not standby:
                raise reason  # the lock is let go when running() ends
            await lock.close()
            logger.warning(
                "stepped down as the ledger sequencer (epoch %s): %s; %s",
                epoch,
                reason,
                "standing by to take over again" if standby else "taking the lock again",
            )

    async def _sign_while_held(self, lock: SequencerLock) -> str | SequencerFencedError:
        """Signs every ``interval_s`` and checks the lock connection every ``lock_poll_s``;
        returns why this process is not the sequencer any more."""
        loop = asyncio.get_running_loop()
        due = loop.time() + self._config.interval_s
        while True:
            await asyncio.sleep(max(0.0, min(self._config.lock_poll_s, due - loop.time())))
            if not await lock.alive():
                return "its lock connection was lost"
            if loop.time() < due:
                continue
            due = loop.time() + self._config.interval_s
            try:
                await self.checkpoint()
            except SequencerFencedError as error:
                return error
            except _DB_ERRORS:
                logger.warning("could not sign a checkpoint; retrying", exc_info=True)

    async def _wait_for_lock(self, lock: SequencerLock, *, refuse: bool) -> None:
        """Returns once ``lock`` is held, retrying while the database cannot be reached.

        Tries every ``lock_poll_s``, refreshing ``latest`` meanwhile; with ``refuse``, raises
        ``SequencerFencedError`` instead of waiting when another process holds the lock."""
        unreachable = False
        while True:
            try:
                if await lock.try_lock():
                    return
                if refuse:
                    raise SequencerFencedError(
                        "another process took the ledger sequencer lock of this database"
                    )
                self.latest = await self._reader.latest_checkpoint()
                unreachable = False
            except _DB_ERRORS as error:
                if not unreachable:
                    logger.warning("cannot try the ledger sequencer lock now (%r); retrying", error)
                unreachable = True
            await asyncio.sleep(self._config.lock_poll_s)

    async def _take_over(self, lock: SequencerLock, *, quiet: bool) -> bool:
        """Becomes the sequencer once ``lock`` is held: a new epoch, the signer checked and
        recorded, the log signed. Returns False when the signer may not sign this log.

        The key is checked against the latest checkpoint stored after the epoch was bumped (no
        older sequencer can store one after that). A key that does not verify it, without
        ``allow_key_rotation``, raises ``SigningKeyChangedError`` unless ``quiet``: a standby
        taking over then logs CRITICAL and returns False rather than ending the process, which
        serves requests and appends like any replica; the caller lets the lock go so that a
        replica with the right key takes over. (At start every process checks its key, so this
        is a key rotated by another replica since.)
        """
        epoch = await lock.bump_epoch()
        latest = await self._reader.latest_checkpoint()
        problem = self._key_problem(latest)
        if problem is not None:
            if not self._config.allow_key_rotation:
                error = self._key_changed(problem)
                if not quiet:
                    raise error
                logger.critical("%s; this replica will not sign checkpoints", error)
                return False
            logger.warning(
                "rotating the ledger signing key to %s: publish it to auditors and miners",
                self._signer.verifier_key,
            )
        await lock.execute(
            "INSERT INTO ledger_signers (verifier_key, origin) VALUES ($1, $2)"
            " ON CONFLICT (verifier_key) DO NOTHING",
            self._signer.verifier_key,
            self._config.origin,
        )
        self.latest = latest
        self._epoch = epoch
        await self.checkpoint()
        return True

    def _key_problem(self, latest: StoredCheckpoint | None) -> CheckpointError | None:
        """Why ``latest`` does not verify with this signer's key; None if it does or is None."""
        if latest is None:
            return None
        try:
            parse_signed_checkpoint(latest.note, self._signer.verifier, origin=self._config.origin)
        except CheckpointError as error:
            return error
        return None

    def _key_changed(self, problem: CheckpointError) -> SigningKeyChangedError:
        return SigningKeyChangedError(
            f"the last checkpoint of this ledger does not verify with the signing key "
            f"{self._signer.verifier_key} ({problem}); start with the original key "
            "(--ledger-key) or rotate on purpose (--rotate-ledger-key, docs/ledger.md)"
        )
