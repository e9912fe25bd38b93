"""The log's sequencer role: signing checkpoints, fenced so that only one process holds it.

Any process may append entries (each transaction takes the log lock), but only the process
that holds the sequencer lock signs checkpoints, so a second coordinator on the same database
refuses to start instead of racing the first. Before signing a new checkpoint the checkpointer
verifies a consistency proof from the last checkpoint it knows to the new tree: it never signs
two checkpoints that contradict each other, even if someone rewrote the tables underneath.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

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

logger = logging.getLogger(__name__)

# pg_try_advisory_lock key held for the lifetime of the sequencer ("mmseqncr").
SEQUENCER_LOCK_KEY = 0x6D6D7365716E6372


@dataclass(frozen=True)
class CheckpointerConfig:
    origin: str  # the log's name, the first line of every checkpoint; never change it
    interval_s: float = 0.5  # how often new entries are looked for (well under once a second)
    allow_key_rotation: bool = False  # sign even though the last checkpoint used another key


class SequencerFencedError(LedgerError, RuntimeError):
    """Another process holds the sequencer lock of this database."""


class SigningKeyChangedError(LedgerError, RuntimeError):
    """The last checkpoint was signed by another key, and rotation was not asked for."""


class LogForkError(LedgerError, RuntimeError):
    """The stored tree is not an extension of the last signed checkpoint: refuse to sign."""


class Checkpointer:
    """Signs a checkpoint whenever the log has grown; ``latest`` is the newest one signed."""

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

    @classmethod
    @contextlib.asynccontextmanager
    async def running(
        cls,
        pool: asyncpg.Pool[asyncpg.Record],
        signer: CheckpointSigner,
        config: CheckpointerConfig,
    ) -> AsyncIterator[Checkpointer]:
        """Takes the sequencer lock, signs every ``interval_s`` while the block runs."""
        checkpointer = cls(pool, signer, config)
        async with pool.acquire() as fence:
            if not await fence.fetchval("SELECT pg_try_advisory_lock($1)", SEQUENCER_LOCK_KEY):
                raise SequencerFencedError(
                    "another coordinator is already the ledger sequencer of this database"
                )
            try:
                checkpointer.latest = await checkpointer._reader.latest_checkpoint()
                checkpointer._check_signer()
                await fence.execute(
                    "INSERT INTO ledger_signers (verifier_key, origin) VALUES ($1, $2)"
                    " ON CONFLICT (verifier_key) DO NOTHING",
                    signer.verifier_key,
                    config.origin,
                )
                await checkpointer.checkpoint()
                task = asyncio.create_task(checkpointer._loop())
                try:
                    yield checkpointer
                finally:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    await checkpointer.checkpoint()
            finally:
                await fence.execute("SELECT pg_advisory_unlock($1)", SEQUENCER_LOCK_KEY)

    def _check_signer(self) -> None:
        latest = self.latest
        if latest is None:
            return
        try:
            parse_signed_checkpoint(latest.note, self._signer.verifier, origin=self._config.origin)
        except CheckpointError as error:
            if not self._config.allow_key_rotation:
                raise SigningKeyChangedError(
                    f"the last checkpoint of this ledger does not verify with the signing key "
                    f"{self._signer.verifier_key} ({error}); start with the original key "
                    "(--ledger-key) or rotate on purpose (--rotate-ledger-key, docs/ledger.md)"
                ) from None
            logger.warning(
                "rotating the ledger signing key to %s: publish it to auditors and miners",
                self._signer.verifier_key,
            )

    async def checkpoint(self) -> StoredCheckpoint | None:
        """Signs the current tree if it grew since the last checkpoint; returns the latest."""
        async with self._lock:
            head = await self._reader.head()
            latest = self.latest
            if latest is not None and head.size == latest.size:
                if head.root != latest.root:
                    raise LogForkError(f"the tree of size {head.size} changed its root")
                return latest
            if latest is not None:
                proof = await self._reader.consistency_proof(latest.size, head.size)
                if not verify_consistency(latest.size, head.size, proof, latest.root, head.root):
                    raise LogForkError(
                        f"the stored log of size {head.size} is not an extension of the signed "
                        f"checkpoint of size {latest.size}: refusing to sign"
                    )
            note = self._signer.sign(Checkpoint(self._config.origin, head.size, head.root))
            await self._pool.execute(
                "INSERT INTO ledger_checkpoints (size, root, note) VALUES ($1, $2, $3)"
                " ON CONFLICT (size) DO NOTHING",
                head.size,
                head.root,
                note,
            )
            self.latest = StoredCheckpoint(head.size, head.root, note)
            return self.latest

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.interval_s)
            try:
                await self.checkpoint()
            except LogForkError:
                logger.critical("ledger fork detected; checkpoints stopped", exc_info=True)
                raise
            except (OSError, asyncpg.PostgresError):
                logger.warning("could not sign a checkpoint; retrying", exc_info=True)
