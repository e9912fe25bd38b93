"""A miner connected to another replica, as a :class:`coordinator.worker.Worker` here.

Its facts and load come from its replica's capacity messages (``WorkerState``); its jobs, score
requests and notices travel over NATS to that replica, which hands them to the miner's session
and streams the job's events back (``coordinator/replicas/relay.py``). To the dispatcher, the
router and the spot checker it is one more worker.

Load is counted so that two replicas rarely race for one slot: the miner's jobs by the home
replica's last count, except the ones this replica asked for, which it counts itself (at once,
not a capacity message later). When both race anyway, the home replica refuses the job it has no
slot for with a retryable failure, and the dispatcher tries another miner.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from coordinator.dispatch.speed import MinerSpeed
from coordinator.jobs import Job, JobEvent, MinerLost, ScoreRequest, ScoreResult, TokenChunk
from coordinator.replicas import codec
from coordinator.replicas.codec import Document, WorkerState
from coordinator.worker import (
    ConsistencyProof,
    CreditReceipt,
    JobStream,
    ScorerLost,
    SlashNotice,
    Worker,
    can_take,
)

logger = logging.getLogger(__name__)


class MeshLink(Protocol):
    """What a remote worker needs of the replicas' link (``coordinator/replicas/mesh.py``)."""

    replica_id: str  # this replica

    def send(self, home: str, kind: str, document: Document) -> None:
        """Publishes ``document`` to replica ``home``'s ``kind`` subject, in order."""
        ...

    def ask(self, home: str, kind: str, document: Document) -> Awaitable[Document]:
        """A request to replica ``home``; the answer, or ScorerLost-worthy errors raised."""
        ...

    def expect_events(self, job_id: str, deliver: Callable[[JobEvent], None]) -> None:
        """Routes the events relayed for ``job_id`` to ``deliver`` until :meth:`forget`."""
        ...

    def forget(self, job_id: str) -> None: ...


class RemoteWorker:
    """A :class:`Worker` whose miner is connected to replica ``home``."""

    def __init__(self, state: WorkerState, *, home: str, link: MeshLink) -> None:
        self.home = home
        self.miner_id = state.miner_id
        self.public_key = state.public_key
        self.is_local = False
        self.connected_at = time.monotonic() - state.connected_for_s
        self.closed_reason: str | None = None
        self.on_slot_freed: Callable[[Worker], None] | None = None
        self._link = link
        self._jobs: dict[str, JobStream] = {}  # jobs this replica asked it for, not finished
        self._scores: dict[str, asyncio.Task[None]] = {}
        self._others_jobs = 0
        self._apply(state)

    def update(self, state: WorkerState) -> None:
        """Takes the home replica's latest word on the miner; wakes the queue if it has room."""
        free_before = self.free_slots
        self._apply(state)
        if self.free_slots > free_before:
            self._slot_freed()

    def _apply(self, state: WorkerState) -> None:
        self.models = frozenset(state.models)
        self.device_name = state.device_name
        self.accelerator = state.accelerator
        self.retains_data = state.retains_data
        self.max_concurrency = max(1, state.max_concurrency)
        self.draining = state.draining
        self.speed = MinerSpeed.measured(
            ttft_s=state.ttft_s, tokens_per_s=state.tokens_per_s, jobs=state.jobs_measured
        )
        mine = state.jobs_by_origin.get(self._link.replica_id, 0)
        self._others_jobs = max(0, state.active_jobs - mine)

    @property
    def active_jobs(self) -> int:
        return self._others_jobs + len(self._jobs)

    @property
    def free_slots(self) -> int:
        return self.max_concurrency - self.active_jobs

    def accepts(self, model: str) -> bool:
        return can_take(self, model)

    def start_job(self, job: Job) -> JobStream:
        stream = JobStream(job)
        self._jobs[job.job_id] = stream
        self._link.expect_events(job.job_id, lambda event: self._deliver(stream, event))
        self._link.send(self.home, "job", {"miner": self.miner_id, "job": codec.job_document(job)})
        return stream

    def _deliver(self, stream: JobStream, event: JobEvent) -> None:
        job_id = stream.job.job_id
        if self._jobs.get(job_id) is not stream:
            return  # abandoned: whatever still comes is dropped
        if isinstance(event, TokenChunk):
            stream.put(event)
            return
        stream.finished = True
        self._end(job_id)
        stream.put(event)
        self._slot_freed()

    def _end(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)
        self._link.forget(job_id)

    def cancel_job(self, job_id: str) -> None:
        stream = self._jobs.get(job_id)
        if stream is not None and not stream.finished and self.closed_reason is None:
            self._link.send(self.home, "cancel", {"miner": self.miner_id, "job_id": job_id})

    def abandon_job(self, job_id: str) -> None:
        if job_id in self._jobs:
            self._link.send(
                self.home, "cancel", {"miner": self.miner_id, "job_id": job_id, "abandon": True}
            )
            self._end(job_id)
            self._slot_freed()

    def start_score(self, request: ScoreRequest) -> asyncio.Future[ScoreResult]:
        future: asyncio.Future[ScoreResult] = asyncio.get_running_loop().create_future()
        if self.closed_reason is not None:
            future.set_exception(ScorerLost(self.closed_reason))
            return future
        task = asyncio.create_task(self._score(request, future))
        self._scores[request.score_id] = task
        task.add_done_callback(lambda _: self._scores.pop(request.score_id, None))
        return future

    async def _score(self, request: ScoreRequest, future: asyncio.Future[ScoreResult]) -> None:
        try:
            answer = await self._link.ask(
                self.home,
                "score",
                {"miner": self.miner_id, "request": codec.score_request_document(request)},
            )
            if "lost" in answer:
                raise ScorerLost(str(answer["lost"]))
            result = codec.score_result_from(answer["result"])
        except asyncio.CancelledError:
            if not future.done():
                future.set_exception(ScorerLost("the score request was given up"))
            raise
        except Exception as error:  # the link, the other replica, or its answer
            if not future.done():
                future.set_exception(
                    error if isinstance(error, ScorerLost) else ScorerLost(str(error))
                )
            return
        if not future.done():
            future.set_result(result)

    def expire_score(self, score_id: str) -> None:
        task = self._scores.pop(score_id, None)
        if task is not None:
            task.cancel()

    def send_credit_receipt(self, receipt: CreditReceipt) -> None:
        self._notify("credit_receipt", codec.credit_receipt_document(receipt))

    def send_consistency_proof(self, proof: ConsistencyProof) -> None:
        self._notify("consistency_proof", codec.consistency_proof_document(proof))

    def send_slash_notice(self, notice: SlashNotice) -> None:
        self._notify("slash_notice", codec.slash_notice_document(notice))

    def ban(self, message: str, *, reason: str) -> None:
        self._notify("ban", {"message": message, "reason": reason})
        self.detach(reason)

    def close(self, reason: str) -> None:
        """Ends the miner's session at its home replica, and here."""
        if self.closed_reason is None:
            self._notify("close", {"reason": reason})
        self.detach(reason)

    def detach(self, reason: str) -> None:
        """Forgets the miner here only (it left its replica, or the replica is gone): its jobs
        here learn the miner is lost; its session, if any, is the home replica's business."""
        if self.closed_reason is not None:
            return
        self.closed_reason = reason
        for job_id, stream in list(self._jobs.items()):
            self._end(job_id)
            stream.put(MinerLost(reason))
        for task in list(self._scores.values()):
            task.cancel()

    def _notify(self, kind: str, body: Document) -> None:
        if self.closed_reason is None:
            self._link.send(self.home, "notify", {"miner": self.miner_id, "kind": kind, **body})

    def _slot_freed(self) -> None:
        if self.on_slot_freed is not None and self.closed_reason is None:
            self.on_slot_freed(self)
