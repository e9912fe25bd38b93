"""One welcomed miner's gRPC stream, as the :class:`coordinator.worker.Worker` the rest sees.

The gRPC servicer owns the stream; the session validates each message from the miner, turns it
into a domain value (``coordinator/gateway/wire.py``) and queues it on the job it belongs to, so
that the dispatcher can wait on exactly the job it started. What the coordinator sends goes out
through ``outbox`` as protobuf.

The session also measures the miner's speed as its messages arrive (``speed``, see
:mod:`coordinator.dispatch.speed`) and tells ``on_slot_freed`` whenever a job slot frees, so
that requests queued for a busy model can be woken.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from coordinator.dispatch.speed import MinerSpeed
from coordinator.gateway import wire
from coordinator.gateway.handshake import refusal
from coordinator.jobs import Job, MinerLost, ScoreRequest, ScoreResult
from coordinator.worker import (
    ConsistencyProof,
    CreditReceipt,
    JobStream,
    LedgerWitnessDesk,
    ScorerLost,
    SlashNotice,
    Worker,
    can_take,
)
from proto import miner_pb2
from proto.limits import MAX_TOKENS_PER_CHUNK, MAX_TOP_LOGPROB_TOKENS_PER_CHUNK

logger = logging.getLogger(__name__)

_MAX_ABANDONED = 1024
_MAX_EXPIRED_SCORES = 1024


class MinerSession:
    """A miner that passed the handshake and may be given jobs: a :class:`Worker`."""

    def __init__(
        self,
        hello: miner_pb2.Hello,
        *,
        miner_id: str,
        vocab_sizes: Mapping[str, int],
        witness_desk: LedgerWitnessDesk | None = None,
    ) -> None:
        """``witness_desk`` takes the miner's ledger messages (consistency requests, alarms);
        without it they are protocol violations."""
        self.miner_id = miner_id
        self.hello = hello
        self.public_key = hello.public_key
        self.models = frozenset(model.name for model in hello.models)
        self.device_name = hello.hardware.device_name
        self.accelerator = hello.hardware.accelerator
        # Anything but a declared NONE may keep prompts or completions.
        self.retains_data = hello.data_retention != miner_pb2.DATA_RETENTION_NONE
        self.max_concurrency = max(1, hello.max_concurrency)
        self.connected_at = time.monotonic()
        self.last_seen = time.monotonic()
        self.draining = False
        self.closed_reason: str | None = None
        self.speed = MinerSpeed()  # measured on arrival of its tokens, never from its claims
        self.is_local = True  # its stream ends in this process
        # Told whenever a job slot frees (a result, a failure, an abandoned job); the registry
        # sets it so that requests queued for a busy model can be woken.
        self.on_slot_freed: Callable[[Worker], None] | None = None
        self._vocab_sizes = dict(vocab_sizes)
        self._witness_desk = witness_desk
        self._jobs: dict[str, JobStream] = {}
        # Jobs given up on before their first token (e.g. the miner was too slow): whatever the
        # miner still sends for them is dropped, not treated as a protocol violation.
        self._abandoned: set[str] = set()
        # Spot checks this miner was asked to score, by score id; and those given up on.
        self._scores: dict[str, asyncio.Future[ScoreResult]] = {}
        self._expired_scores: set[str] = set()
        # None is the end-of-stream marker for the servicer's response generator.
        self.outbox: asyncio.Queue[miner_pb2.CoordinatorMessage | None] = asyncio.Queue()

    @property
    def active_jobs(self) -> int:
        return len(self._jobs)

    @property
    def free_slots(self) -> int:
        return self.max_concurrency - len(self._jobs)

    def accepts(self, model: str) -> bool:
        return can_take(self, model)

    def start_job(self, job: Job) -> JobStream:
        stream = JobStream(job)
        self._jobs[job.job_id] = stream
        self.outbox.put_nowait(miner_pb2.CoordinatorMessage(job=wire.job_message(job)))
        return stream

    def cancel_job(self, job_id: str) -> None:
        """Asks the miner to stop a job; its slot frees when the miner answers or goes away."""
        stream = self._jobs.get(job_id)
        if stream is not None and not stream.finished and self.closed_reason is None:
            self.outbox.put_nowait(
                miner_pb2.CoordinatorMessage(cancel=miner_pb2.CancelJob(job_id=job_id))
            )

    def abandon_job(self, job_id: str) -> None:
        """Cancels a job and frees its slot now; late messages for it are ignored."""
        self.cancel_job(job_id)
        if self._jobs.pop(job_id, None) is not None:
            if len(self._abandoned) < _MAX_ABANDONED:
                self._abandoned.add(job_id)
            self._slot_freed()

    def start_score(self, request: ScoreRequest) -> asyncio.Future[ScoreResult]:
        """Sends a score request; the future resolves with the result, or fails with
        :class:`ScorerLost` when the miner goes away first."""
        future: asyncio.Future[ScoreResult] = asyncio.get_running_loop().create_future()
        if self.closed_reason is not None:
            future.set_exception(ScorerLost(self.closed_reason))
            return future
        self._scores[request.score_id] = future
        self.outbox.put_nowait(miner_pb2.CoordinatorMessage(score=wire.score_message(request)))
        return future

    def expire_score(self, score_id: str) -> None:
        """Gives up on a score job; a late answer for it is dropped."""
        if self._scores.pop(score_id, None) is not None:
            if len(self._expired_scores) >= _MAX_EXPIRED_SCORES:
                self._expired_scores.clear()
            self._expired_scores.add(score_id)

    def send_credit_receipt(self, receipt: CreditReceipt) -> None:
        self._notify(wire.credit_receipt_message(receipt))

    def send_consistency_proof(self, proof: ConsistencyProof) -> None:
        self._notify(wire.consistency_proof_message(proof))

    def send_slash_notice(self, notice: SlashNotice) -> None:
        self._notify(wire.slash_notice_message(notice))

    def ban(self, message: str, *, reason: str) -> None:
        """Refuses the banned key with ``message`` and ends the session."""
        self._notify(
            miner_pb2.CoordinatorMessage(
                refusal=refusal(miner_pb2.REFUSAL_REASON_BANNED_KEY, message)
            )
        )
        self.close(reason)

    def _notify(self, message: miner_pb2.CoordinatorMessage) -> None:
        """Queues a message that belongs to no job, unless the session is over."""
        if self.closed_reason is None:
            self.outbox.put_nowait(message)

    def deliver(self, message: miner_pb2.MinerMessage) -> str | None:
        """Routes one message from the miner. Returns a protocol violation, or None when fine."""
        self.last_seen = time.monotonic()
        kind = message.WhichOneof("body")
        if kind == "chunk":
            return self._deliver_chunk(message.chunk)
        if kind == "heartbeat":
            return None
        if kind == "result" or kind == "failure":
            return self._deliver_end(message, kind)
        if kind == "score_result":
            return self._deliver_score(message.score_result)
        if kind == "drain":
            logger.info("miner %s is draining: %s", self.miner_id[:12], message.drain.reason)
            self.draining = True
            return None
        if kind == "consistency_request" and self._witness_desk is not None:
            request = message.consistency_request
            self._witness_desk.consistency_requested(
                self, old_size=request.old_size, new_size=request.new_size
            )
            return None
        if kind == "witness_alarm" and self._witness_desk is not None:
            self._witness_desk.alarm_raised(self, wire.witness_alarm(message.witness_alarm))
            return None
        return f"unexpected {kind or 'empty'} message after the handshake"

    def _deliver_end(self, message: miner_pb2.MinerMessage, kind: str) -> str | None:
        job_id = message.result.job_id if kind == "result" else message.failure.job_id
        if job_id in self._abandoned:
            self._abandoned.discard(job_id)
            return None
        stream = self._jobs.pop(job_id, None)
        if stream is None:
            return f"{kind} for unknown job {job_id!r}"
        stream.finished = True
        if kind == "result":
            self._measure_decode(stream)
            stream.put(wire.job_result(message.result))
        else:
            stream.put(wire.job_failure(message.failure))
        self._slot_freed()
        return None

    def _deliver_chunk(self, chunk: miner_pb2.TokenChunk) -> str | None:
        if chunk.job_id in self._abandoned:
            return None
        stream = self._jobs.get(chunk.job_id)
        if stream is None:
            return f"tokens for unknown job {chunk.job_id!r}"
        if len(chunk.logprobs) != len(chunk.token_ids) or not chunk.token_ids:
            return "token chunk with mismatched or empty token_ids/logprobs"
        if len(chunk.token_ids) > MAX_TOKENS_PER_CHUNK:
            return f"token chunk with more than {MAX_TOKENS_PER_CHUNK} tokens"
        vocab_size = self._vocab_sizes[stream.job.model]
        if any(token >= vocab_size for token in chunk.token_ids):
            return f"token id outside the vocabulary of {stream.job.model} ({vocab_size})"
        problem = _top_logprobs_problem(
            chunk, asked=stream.job.sampling.top_logprobs, vocab_size=vocab_size
        )
        if problem is not None:
            return problem
        violation = stream.accept_tokens(chunk.token_ids)
        if violation is None:
            now = time.monotonic()
            if stream.first_token_at is None:
                stream.first_token_at = now
                stream.first_chunk_tokens = len(chunk.token_ids)
                self.speed.first_token(now - stream.sent_at)
            stream.last_token_at = now
            stream.put(wire.token_chunk(chunk))
        return violation

    def _measure_decode(self, stream: JobStream) -> None:
        if stream.first_token_at is not None and stream.last_token_at is not None:
            self.speed.decoded(
                stream.tokens_received - stream.first_chunk_tokens,
                stream.last_token_at - stream.first_token_at,
            )

    def _slot_freed(self) -> None:
        if self.on_slot_freed is not None:
            self.on_slot_freed(self)

    def _deliver_score(self, result: miner_pb2.ScoreResult) -> str | None:
        if result.score_id in self._expired_scores:
            self._expired_scores.discard(result.score_id)
            return None
        future = self._scores.pop(result.score_id, None)
        if future is None:
            return f"score result for unknown score job {result.score_id!r}"
        if not future.done():
            future.set_result(wire.score_result(result))
        return None

    def close(self, reason: str) -> None:
        """Ends the session: every job in flight learns the miner is lost."""
        if self.closed_reason is not None:
            return
        self.closed_reason = reason
        for stream in self._jobs.values():
            stream.put(MinerLost(reason))
        self._jobs.clear()
        for future in self._scores.values():
            if not future.done():
                future.set_exception(ScorerLost(reason))
        self._scores.clear()
        self.outbox.put_nowait(None)


def _top_logprobs_problem(
    chunk: miner_pb2.TokenChunk, *, asked: int, vocab_size: int
) -> str | None:
    """Why the chunk's alternatives break the protocol, or None: one entry per token exactly
    when the job asked, each of min(asked, vocabulary) distinct ids in the vocabulary."""
    if not asked:
        return (
            "token chunk with top_logprobs its job did not ask for" if chunk.top_logprobs else None
        )
    if len(chunk.top_logprobs) != len(chunk.token_ids):
        return "token chunk without one top_logprobs entry per token"
    if len(chunk.token_ids) > MAX_TOP_LOGPROB_TOKENS_PER_CHUNK:
        return (
            f"token chunk with alternatives for more than {MAX_TOP_LOGPROB_TOKENS_PER_CHUNK} tokens"
        )
    width = min(asked, vocab_size)
    for top in chunk.top_logprobs:
        ids = top.token_ids
        if len(ids) != width or len(top.logprobs) != width or len(set(ids)) != width:
            return f"top_logprobs entry without {width} distinct alternatives"
        if any(token >= vocab_size for token in ids):
            return "top_logprobs token id outside the vocabulary"
    return None
