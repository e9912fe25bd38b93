"""Credit receipts for miners, and the proofs that make every miner a witness of the ledger.

After a settlement credits a miner, the miner is sent a ``CreditReceipt``: its settle entry's
exact bytes, the entry's index, an inclusion proof and the signed checkpoint the proof is for.
The checkpointer signs at most every ``checkpoint_interval_s``, so receipts wait (in memory,
never blocking the buyer's response) until a checkpoint covers their entry; then all the
receipts a checkpoint covers are sent in one round, their proofs read in one query
(``LogReader.inclusion_proofs``): a cost per round, not per job, so receipts stay cheap under
load. A receipt goes once, to the miner's session of that moment: a miner that is offline then
gets none (its credit is still in the public ledger, where ``/ledger/proof/inclusion`` serves
the same proofs).

The miner keeps the newest checkpoint it has verified and asks for a ``ConsistencyProof`` to
each newer one; a ``WitnessAlarm`` from a miner means one of those proofs failed, which is
logged at CRITICAL: the ledger forked, or someone rewrote it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg

from coordinator.dispatch.registry import MinerRegistry
from coordinator.worker import ConsistencyProof, CreditReceipt, WitnessAlarm, Worker
from ledger.log_reader import LogRangeError, LogReader, StoredCheckpoint

logger = logging.getLogger(__name__)

# What an alarm may put in one log line; the message is the miner's text, not to be trusted.
_MAX_ALARM_LOG_CHARS = 2000
# Receipts whose proofs are fetched in one query. A round is usually a few hundred; the bound
# keeps one query's arrays, and the event loop's time assembling its proofs, small when a long
# wait for a checkpoint lets many pile up.
_PROOFS_PER_QUERY = 2000


@dataclass(frozen=True)
class CreditedJob:
    """A settlement that credited a miner: the service hands these over as they commit."""

    job_id: str  # the job the miner ran
    miner_id: str  # hex public key, the owner of the credited miner account
    hold_id: int  # the hold the settlement closed; its one 'settle' entry is the credit


@dataclass(frozen=True)
class ReceiptConfig:
    poll_interval_s: float = 0.1  # how often waiting receipts look for a covering checkpoint
    max_wait_s: float = 60.0  # a receipt with no covering checkpoint by then is dropped
    max_pending: int = 100_000  # receipts waiting at once; beyond this new ones are dropped


@dataclass(eq=False)  # compared by identity: each is one waiting receipt
class _Pending:
    job: CreditedJob
    since: float  # time.monotonic() when the settlement was handed over
    seq: int | None = None  # the settle entry's index, once looked up
    leaf: bytes = b""  # the settle entry's canonical bytes


class LedgerReceipts:
    """Sends credit receipts and answers miners' consistency requests and alarms."""

    def __init__(
        self,
        pool: asyncpg.Pool[asyncpg.Record],
        *,
        registry: MinerRegistry,
        origin: str,
        verifier_key: str,
        config: ReceiptConfig | None = None,
    ) -> None:
        self.origin = origin  # announced in Welcome
        self.verifier_key = verifier_key  # announced in Welcome
        self._pool = pool
        self._reader = LogReader(pool)
        self._registry = registry
        self._config = config or ReceiptConfig()
        self._pending: list[_Pending] = []
        self._answering: dict[str, asyncio.Task[None]] = {}  # miner id -> consistency answer
        self._wake = asyncio.Event()

    def credited(self, job: CreditedJob) -> None:
        """Queues a receipt for ``job``; returns at once (called from the settlement path)."""
        if len(self._pending) >= self._config.max_pending:
            logger.warning("too many receipts waiting; none for job %s", job.job_id)
            return
        self._pending.append(_Pending(job, time.monotonic()))
        self._wake.set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[LedgerReceipts]:
        """Sends receipts while the block runs; those still waiting at its end are dropped."""
        task = asyncio.create_task(self._loop(), name="credit-receipts")
        try:
            yield self
        finally:
            task.cancel()
            answering = list(self._answering.values())
            for answer in answering:
                answer.cancel()
            await asyncio.gather(task, *answering, return_exceptions=True)
            if self._pending:
                logger.info("%d credit receipts not sent: shutting down", len(self._pending))

    def alarm_raised(self, worker: Worker, alarm: WitnessAlarm) -> None:
        """A miner's proof failed: the ledger forked or was tampered with."""
        logger.critical(
            "miner %s reports a ledger fork or tampering: %s; its checkpoint %r, the "
            "contradicting one %r",
            worker.miner_id,
            alarm.message[:_MAX_ALARM_LOG_CHARS],
            alarm.old_checkpoint[:_MAX_ALARM_LOG_CHARS],
            alarm.new_checkpoint[:_MAX_ALARM_LOG_CHARS],
        )

    def consistency_requested(self, worker: Worker, *, old_size: int, new_size: int) -> None:
        """Answers a miner's consistency request in the background, one at a time per miner."""
        busy = self._answering.get(worker.miner_id)
        if busy is not None and not busy.done():
            # A witness asks one at a time; more is load nobody needs. It will ask again.
            logger.warning(
                "miner %s sent a consistency request before the last was answered; ignored",
                worker.miner_id[:12],
            )
            return
        self._answering[worker.miner_id] = asyncio.create_task(
            self._answer(worker, old_size, new_size)
        )

    async def _answer(self, worker: Worker, old: int, new: int) -> None:
        try:
            hashes = await self._reader.consistency_proof(old, new)
            signed = await self._reader.checkpoints(new, 1)
            note = signed[0].note if signed and signed[0].size == new else b""
            proof = ConsistencyProof(
                old_size=old, new_size=new, hashes=tuple(hashes), checkpoint=note
            )
        except LogRangeError as error:
            proof = ConsistencyProof(old_size=old, new_size=new, error=str(error))
        except (OSError, asyncpg.PostgresError):
            # Transient: no answer at all, so the miner retries instead of raising an alarm.
            logger.warning("cannot prove consistency %d -> %d now", old, new, exc_info=True)
            return
        finally:
            self._answering.pop(worker.miner_id, None)
        if worker.closed_reason is None:
            worker.send_consistency_proof(proof)

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(self._config.poll_interval_s)
            try:
                await self._send_ready()
            except (OSError, asyncpg.PostgresError):
                logger.warning("could not send credit receipts; retrying", exc_info=True)
            except Exception:
                # Receipts are a courtesy to miners: a bug here must not stop the next ones.
                logger.exception("sending credit receipts failed; retrying")
            if not self._pending:
                self._wake.clear()

    async def _send_ready(self) -> None:
        now = time.monotonic()
        expired = {p for p in self._pending if now - p.since > self._config.max_wait_s}
        for pending in expired:
            logger.warning(
                "no checkpoint covered the credit of job %s in %.0f s; receipt dropped",
                pending.job.job_id,
                self._config.max_wait_s,
            )
        self._pending = [p for p in self._pending if p not in expired]
        await self._find_entries([p for p in self._pending if p.seq is None])
        checkpoint = await self._reader.latest_checkpoint()
        if checkpoint is None:
            return
        covered = [p for p in self._pending if p.seq is not None and p.seq < checkpoint.size]
        for start in range(0, len(covered), _PROOFS_PER_QUERY):
            await self._send_covered(covered[start : start + _PROOFS_PER_QUERY], checkpoint)

    async def _send_covered(self, covered: list[_Pending], checkpoint: StoredCheckpoint) -> None:
        """Sends receipts for entries ``checkpoint`` covers: one proof query for all of them."""
        online = {worker.miner_id for worker in self._registry.workers()}
        proofs = await self._reader.inclusion_proofs(
            [p.seq for p in covered if p.seq is not None and p.job.miner_id in online],
            checkpoint.size,
        )
        # Workers as they are after the query: one that closed meanwhile gets no receipt.
        workers = {worker.miner_id: worker for worker in self._registry.workers()}
        for pending in covered:
            worker = workers.get(pending.job.miner_id)
            proof = proofs.get(pending.seq) if pending.seq is not None else None
            if worker is not None and worker.closed_reason is None and proof is not None:
                self._send(worker, pending, checkpoint, proof)
            else:
                logger.info(
                    "miner %s is offline: no receipt for job %s",
                    pending.job.miner_id[:12],
                    pending.job.job_id,
                )
        done = set(covered)
        self._pending = [p for p in self._pending if p not in done]

    async def _find_entries(self, unresolved: list[_Pending]) -> None:
        if not unresolved:
            return
        rows = await self._pool.fetch(
            "SELECT hold_id, seq, leaf FROM ledger_entries"
            " WHERE kind = 'settle' AND hold_id = ANY($1::bigint[])",
            [p.job.hold_id for p in unresolved],
        )
        found = {row["hold_id"]: row for row in rows}
        for pending in unresolved:
            row = found.get(pending.job.hold_id)
            if row is not None:
                pending.seq, pending.leaf = row["seq"], row["leaf"]

    def _send(
        self,
        worker: Worker,
        pending: _Pending,
        checkpoint: StoredCheckpoint,
        proof: list[bytes],
    ) -> None:
        assert pending.seq is not None
        worker.send_credit_receipt(
            CreditReceipt(
                job_id=pending.job.job_id,
                entry=pending.leaf,
                index=pending.seq,
                tree_size=checkpoint.size,
                inclusion_proof=tuple(proof),
                checkpoint=checkpoint.note,
            )
        )
        logger.debug(
            "receipt for job %s: entry %d in checkpoint %d",
            pending.job.job_id,
            pending.seq,
            checkpoint.size,
        )
