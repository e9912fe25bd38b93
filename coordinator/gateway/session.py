"""One welcomed miner: its announced facts, its outbox, and the jobs it is running.

The gRPC servicer owns the stream; the session is what the rest of the coordinator sees. Events
for a job (token chunks, the result, a failure, or the loss of the miner) are queued per job so
that the dispatcher can wait on exactly the job it started.

The session also measures the miner's speed as its messages arrive (``speed``, see
:mod:`coordinator.dispatch.speed`) and tells ``on_slot_freed`` whenever a job slot frees, so
that requests queued for a busy model can be woken.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from coordinator.dispatch.speed import MinerSpeed
from proto import miner_pb2
from proto.limits import MAX_TOKENS_PER_CHUNK, MAX_TOP_LOGPROB_TOKENS_PER_CHUNK

logger = logging.getLogger(__name__)

_MAX_ABANDONED = 1024
_MAX_EXPIRED_SCORES = 1024
_WITNESS_KINDS = frozenset({"consistency_request", "witness_alarm"})


@dataclass(frozen=True)
class MinerLost:
    """The miner went away (disconnected, evicted, or violated the protocol)."""

    reason: str  # shown in logs and, mid-stream, to the buyer


class ScorerLost(Exception):
    """The miner asked to score a job went away before answering."""


JobEvent = miner_pb2.TokenChunk | miner_pb2.JobResult | miner_pb2.JobFailure | MinerLost


class JobChannel:
    """Events of one job on one miner, in arrival order."""

    def __init__(self, job: miner_pb2.Job) -> None:
        self.job = job
        self.tokens_received = 0
        self.finished = False
        self.stopped = False  # a stop token arrived: nothing may follow it
        # Arrival times for the miner's speed: the job queued, its first and its latest chunk.
        self.sent_at = time.monotonic()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.first_chunk_tokens = 0
        self._stop_ids = frozenset(job.sampling.stop_token_ids)
        self._events: deque[JobEvent] = deque()
        self._waiter: asyncio.Future[None] | None = None  # the reader waiting for an event

    def accept_tokens(self, token_ids: Sequence[int]) -> str | None:
        """Counts arriving tokens; returns a violation when they cannot follow what came before."""
        if self.stopped or any(token in self._stop_ids for token in token_ids[:-1]):
            return "tokens after a stop token"
        self.stopped = token_ids[-1] in self._stop_ids
        self.tokens_received += len(token_ids)
        if self.tokens_received > self.job.sampling.max_tokens:
            return f"more than max_tokens={self.job.sampling.max_tokens} tokens"
        return None

    def put(self, event: JobEvent) -> None:
        self._events.append(event)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next_event(self, *, wait_s: float) -> JobEvent:
        """The next event; MinerLost when none arrives within ``wait_s`` seconds."""
        if not self._events:
            # A bare future and one timer: asyncio.wait_for around a queue would add a task.
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(wait_s):
                    await self._waiter
            except TimeoutError:
                return MinerLost(f"no answer from the miner within {wait_s:g} s")
            finally:
                self._waiter = None
        return self._events.popleft()

    def merge_queued(self, chunk: miner_pb2.TokenChunk) -> miner_pb2.TokenChunk:
        """``chunk`` followed by the token chunks already queued behind it, as one chunk.

        A reader that fell behind the miner (a slow buyer, a busy coordinator) then handles
        one delta instead of many: the text and the billing are the same, the work is not.
        """
        if not self._events or not isinstance(self._events[0], miner_pb2.TokenChunk):
            return chunk
        merged = miner_pb2.TokenChunk()
        merged.CopyFrom(chunk)
        while self._events and isinstance(self._events[0], miner_pb2.TokenChunk):
            following = self._events.popleft()
            assert isinstance(following, miner_pb2.TokenChunk)
            merged.token_ids.extend(following.token_ids)
            merged.logprobs.extend(following.logprobs)
            merged.top_logprobs.extend(following.top_logprobs)
        return merged


class MinerSession:
    """A miner that passed the handshake and may be given jobs."""

    def __init__(
        self,
        hello: miner_pb2.Hello,
        *,
        miner_id: str,
        vocab_sizes: Mapping[str, int],
        on_witness_message: Callable[[MinerSession, miner_pb2.MinerMessage], None] | None = None,
    ) -> None:
        """``on_witness_message`` takes the miner's ledger messages (consistency requests,
        alarms); without it they are protocol violations."""
        self.miner_id = miner_id
        self.hello = hello
        self.models = frozenset(model.name for model in hello.models)
        self.max_concurrency = max(1, hello.max_concurrency)
        self.connected_at = time.monotonic()
        self.last_seen = time.monotonic()
        self.draining = False
        self.closed_reason: str | None = None
        self.speed = MinerSpeed()  # measured on arrival of its tokens, never from its claims
        # Told whenever a job slot frees (a result, a failure, an abandoned job); the registry
        # sets it so that requests queued for a busy model can be woken.
        self.on_slot_freed: Callable[[MinerSession], None] | None = None
        self._vocab_sizes = dict(vocab_sizes)
        self._on_witness_message = on_witness_message
        self._jobs: dict[str, JobChannel] = {}
        # Jobs given up on before their first token (e.g. the miner was too slow): whatever the
        # miner still sends for them is dropped, not treated as a protocol violation.
        self._abandoned: set[str] = set()
        # Spot checks this miner was asked to score, by score id; and those given up on.
        self._scores: dict[str, asyncio.Future[miner_pb2.ScoreResult]] = {}
        self._expired_scores: set[str] = set()
        # None is the end-of-stream marker for the servicer's response generator.
        self.outbox: asyncio.Queue[miner_pb2.CoordinatorMessage | None] = asyncio.Queue()

    @property
    def retains_data(self) -> bool:
        """Whether the miner may keep prompts or completions: anything but a declared NONE."""
        return self.hello.data_retention != miner_pb2.DATA_RETENTION_NONE

    @property
    def active_jobs(self) -> int:
        return len(self._jobs)

    @property
    def free_slots(self) -> int:
        return self.max_concurrency - len(self._jobs)

    def accepts(self, model: str) -> bool:
        return (
            self.closed_reason is None
            and not self.draining
            and model in self.models
            and self.free_slots > 0
        )

    def start_job(self, job: miner_pb2.Job) -> JobChannel:
        channel = JobChannel(job)
        self._jobs[job.job_id] = channel
        self.outbox.put_nowait(miner_pb2.CoordinatorMessage(job=job))
        return channel

    def cancel_job(self, job_id: str) -> None:
        """Asks the miner to stop a job; its slot frees when the miner answers or goes away."""
        channel = self._jobs.get(job_id)
        if channel is not None and not channel.finished and self.closed_reason is None:
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

    def start_score(self, score: miner_pb2.ScoreJob) -> asyncio.Future[miner_pb2.ScoreResult]:
        """Sends a score job; the future resolves with the result, or fails with
        :class:`ScorerLost` when the miner goes away first."""
        future: asyncio.Future[miner_pb2.ScoreResult] = asyncio.get_running_loop().create_future()
        if self.closed_reason is not None:
            future.set_exception(ScorerLost(self.closed_reason))
            return future
        self._scores[score.score_id] = future
        self.outbox.put_nowait(miner_pb2.CoordinatorMessage(score=score))
        return future

    def expire_score(self, score_id: str) -> None:
        """Gives up on a score job; a late answer for it is dropped."""
        if self._scores.pop(score_id, None) is not None:
            if len(self._expired_scores) >= _MAX_EXPIRED_SCORES:
                self._expired_scores.clear()
            self._expired_scores.add(score_id)

    def notify(self, message: miner_pb2.CoordinatorMessage) -> None:
        """Queues a message that belongs to no job (e.g. a slash notice)."""
        if self.closed_reason is None:
            self.outbox.put_nowait(message)

    def deliver(self, message: miner_pb2.MinerMessage) -> str | None:
        """Routes one message from the miner. Returns a protocol violation, or None when fine."""
        self.last_seen = time.monotonic()
        kind = message.WhichOneof("body")
        if kind == "heartbeat":
            return None
        if kind == "drain":
            logger.info("miner %s is draining: %s", self.miner_id[:12], message.drain.reason)
            self.draining = True
            return None
        if kind == "chunk":
            return self._deliver_chunk(message.chunk)
        if kind == "score_result":
            return self._deliver_score(message.score_result)
        if kind in _WITNESS_KINDS and self._on_witness_message is not None:
            self._on_witness_message(self, message)
            return None
        if kind in ("result", "failure"):
            event = message.result if kind == "result" else message.failure
            if event.job_id in self._abandoned:
                self._abandoned.discard(event.job_id)
                return None
            channel = self._jobs.get(event.job_id)
            if channel is None:
                return f"{kind} for unknown job {event.job_id!r}"
            channel.finished = True
            self._jobs.pop(event.job_id, None)
            if kind == "result":
                self._measure_decode(channel)
            channel.put(event)
            self._slot_freed()
            return None
        return f"unexpected {kind or 'empty'} message after the handshake"

    def _deliver_chunk(self, chunk: miner_pb2.TokenChunk) -> str | None:
        if chunk.job_id in self._abandoned:
            return None
        channel = self._jobs.get(chunk.job_id)
        if channel is None:
            return f"tokens for unknown job {chunk.job_id!r}"
        if len(chunk.logprobs) != len(chunk.token_ids) or not chunk.token_ids:
            return "token chunk with mismatched or empty token_ids/logprobs"
        if len(chunk.token_ids) > MAX_TOKENS_PER_CHUNK:
            return f"token chunk with more than {MAX_TOKENS_PER_CHUNK} tokens"
        vocab_size = self._vocab_sizes[channel.job.model]
        if any(token >= vocab_size for token in chunk.token_ids):
            return f"token id outside the vocabulary of {channel.job.model} ({vocab_size})"
        problem = _top_logprobs_problem(
            chunk, asked=channel.job.sampling.top_logprobs, vocab_size=vocab_size
        )
        if problem is not None:
            return problem
        violation = channel.accept_tokens(chunk.token_ids)
        if violation is None:
            now = time.monotonic()
            if channel.first_token_at is None:
                channel.first_token_at = now
                channel.first_chunk_tokens = len(chunk.token_ids)
                self.speed.first_token(now - channel.sent_at)
            channel.last_token_at = now
            channel.put(chunk)
        return violation

    def _measure_decode(self, channel: JobChannel) -> None:
        if channel.first_token_at is not None and channel.last_token_at is not None:
            self.speed.decoded(
                channel.tokens_received - channel.first_chunk_tokens,
                channel.last_token_at - channel.first_token_at,
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
            future.set_result(result)
        return None

    def close(self, reason: str) -> None:
        """Ends the session: every job in flight learns the miner is lost."""
        if self.closed_reason is not None:
            return
        self.closed_reason = reason
        for channel in self._jobs.values():
            channel.put(MinerLost(reason))
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
