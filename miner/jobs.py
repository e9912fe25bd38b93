"""Running jobs on engines and streaming their tokens back, for one coordinator connection.

Every job ends with exactly one terminal message: a signed ``JobResult`` (STOP, LENGTH or
CANCELLED) or a ``JobFailure``, except when the connection itself is gone (nobody to tell).
Stopping a job means cancelling its task: the cancellation lands inside the engine's generator,
which unwinds at once, so no further forward pass is started.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from miner.engine.base import (
    Engine,
    GeneratedToken,
    GenerationError,
    GenerationRequest,
    ModelInfo,
    SamplingParams,
)
from miner.identity import Identity
from proto import miner_pb2
from proto.limits import MAX_TOKENS_PER_CHUNK, MAX_TOP_LOGPROB_TOKENS_PER_CHUNK
from proto.signing import output_digest, receipt_message, request_digest

logger = logging.getLogger(__name__)

Send = Callable[[miner_pb2.MinerMessage], None]
"""Queues one message for the coordinator; never blocks."""


class StopReason(enum.Enum):
    """Why a running job is being stopped before its end; decides what the coordinator hears."""

    COORDINATOR = "cancelled by the coordinator"  # -> JobResult CANCELLED
    HANDBACK = "miner shutting down"  # -> JobFailure (no token yet) or JobResult CANCELLED
    DISCONNECT = "connection lost"  # -> nothing: the stream is gone


@dataclass
class _RunningJob:
    job: miner_pb2.Job
    info: ModelInfo
    started: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(default_factory=list)
    stop_reason: StopReason | None = None
    task: asyncio.Task[None] | None = None


def sampling_params(sampling: miner_pb2.SamplingParams) -> SamplingParams:
    """The engine's view of the coordinator's sampling parameters (values taken verbatim)."""
    return SamplingParams(
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        max_tokens=sampling.max_tokens,
        seed=sampling.seed,
        stop_token_ids=tuple(sampling.stop_token_ids),
        top_logprobs=sampling.top_logprobs,
    )


def signed_result(
    job: miner_pb2.Job,
    token_ids: Sequence[int],
    finish_reason: miner_pb2.FinishReason.ValueType,
    *,
    info: ModelInfo,
    identity: Identity,
) -> miner_pb2.JobResult:
    """The JobResult for ``job`` having produced ``token_ids``, with its receipt signed."""
    receipt = miner_pb2.Receipt(
        job_id=job.job_id,
        request_sha256=request_digest(job),
        output_sha256=output_digest(token_ids),
        prompt_tokens=len(job.prompt_token_ids),
        completion_tokens=len(token_ids),
        weights_sha256=info.weights_sha256,
        engine=info.engine,
        dtype=info.dtype,
    )
    return miner_pb2.JobResult(
        job_id=job.job_id,
        finish_reason=finish_reason,
        receipt=receipt,
        signature=identity.sign(receipt_message(receipt)),
    )


def failure(job_id: str, message: str, *, retryable: bool) -> miner_pb2.MinerMessage:
    """A JobFailure message."""
    return miner_pb2.MinerMessage(
        failure=miner_pb2.JobFailure(job_id=job_id, message=message, retryable=retryable)
    )


class JobRunner:
    """The jobs in flight on one connection, at most ``max_concurrency`` of them."""

    def __init__(
        self,
        engines: Mapping[str, Engine],
        *,
        identity: Identity,
        send: Send,
        max_concurrency: int,
    ) -> None:
        self._engines = engines
        self._identity = identity
        self._send = send
        self._max_concurrency = max_concurrency
        self._running: dict[str, _RunningJob] = {}
        # The last TokenChunk of each job while it still waits in the outbox: a token produced
        # before the connection took it joins it, so a fast engine does not pay one message (and
        # one detokenizing step at the coordinator) per token. See :meth:`chunk_taken`.
        self._open_chunks: dict[str, miner_pb2.TokenChunk] = {}

    @property
    def active(self) -> int:
        """Jobs in flight."""
        return len(self._running)

    def start(self, job: miner_pb2.Job) -> None:
        """Starts ``job``, or answers it with a retryable JobFailure when it cannot run here."""
        if job.job_id in self._running:
            # A failure would name the job that is running fine; the coordinator is confused.
            logger.warning("ignoring a second Job %s while the first is running", job.job_id)
            return
        engine = self._engines.get(job.model)
        if engine is None:
            logger.warning(
                "job %s asks for model %r, which is not served here", job.job_id, job.model
            )
            self._send(
                failure(
                    job.job_id, f"model {job.model!r} is not served by this miner", retryable=True
                )
            )
            return
        if len(self._running) >= self._max_concurrency:
            logger.warning("job %s refused: %d jobs already running", job.job_id, self.active)
            self._send(failure(job.job_id, "at capacity", retryable=True))
            return
        running = _RunningJob(job=job, info=engine.info)
        self._running[job.job_id] = running
        running.task = asyncio.create_task(self._run(running, engine), name=f"job-{job.job_id}")
        running.task.add_done_callback(lambda task: self._finished(running, task))
        logger.debug("job %s started on %s", job.job_id, job.model)

    def stop(self, job_id: str, reason: StopReason) -> bool:
        """Stops a running job; False when no such job is running."""
        running = self._running.get(job_id)
        if running is None or running.task is None:
            return False
        if running.stop_reason is None:  # the first reason decides what the coordinator hears
            running.stop_reason = reason
        running.task.cancel()
        return True

    async def wait(self, limit_s: float | None) -> bool:
        """Waits for the jobs in flight now to end; True when they all did within ``limit_s``."""
        tasks = [running.task for running in self._running.values() if running.task is not None]
        if not tasks:
            return True
        _, pending = await asyncio.wait(tasks, timeout=limit_s)
        return not pending

    async def stop_all(self, reason: StopReason) -> None:
        """Stops every job in flight and waits until their terminal messages are queued."""
        tasks = [running.task for running in self._running.values() if running.task is not None]
        for job_id in list(self._running):
            self.stop(job_id, reason)
        if tasks:
            # The done callbacks (which send the terminal messages) run before this returns:
            # they were registered before asyncio.wait's own.
            await asyncio.wait(tasks)

    async def _run(self, running: _RunningJob, engine: Engine) -> None:
        job = running.job
        sampling = sampling_params(job.sampling)
        request = GenerationRequest(
            job_id=job.job_id, prompt_token_ids=tuple(job.prompt_token_ids), sampling=sampling
        )
        stop_ids = frozenset(sampling.stop_token_ids)
        tokens = running.token_ids
        try:
            generator = engine.generate(request)
            try:
                async for token in generator:
                    self._emit(job.job_id, token)
                    tokens.append(token.token_id)
                    # The engine ends by itself; stopping here too keeps the protocol honest.
                    if token.token_id in stop_ids or len(tokens) >= sampling.max_tokens:
                        break
            finally:
                await _close(generator)
        except GenerationError as err:
            logger.warning("job %s failed: %s", job.job_id, err)
            self._send(failure(job.job_id, str(err), retryable=False))
            return
        except Exception as err:
            logger.exception("job %s crashed after %d tokens", job.job_id, len(tokens))
            self._send(failure(job.job_id, f"miner error: {err}", retryable=not tokens))
            return
        finally:
            # Before the task is done, so capacity frees exactly when the terminal message goes.
            self._forget(running)
        stopped = bool(tokens) and tokens[-1] in stop_ids
        finish = miner_pb2.FINISH_REASON_STOP if stopped else miner_pb2.FINISH_REASON_LENGTH
        self._send_result(running, finish)
        logger.info(
            "job %s done: %d tokens, %s, %.2f s",
            job.job_id,
            len(tokens),
            "stop" if stopped else "length",
            time.monotonic() - running.started,
        )

    def _forget(self, running: _RunningJob) -> None:
        # A later job may reuse the id once this one has ended; leave that one alone.
        if self._running.get(running.job.job_id) is running:
            del self._running[running.job.job_id]
            self._open_chunks.pop(running.job.job_id, None)

    def chunk_taken(self, job_id: str) -> None:
        """The connection took the job's open chunk off the outbox: it may not change any more."""
        self._open_chunks.pop(job_id, None)

    def _emit(self, job_id: str, token: GeneratedToken) -> None:
        open_chunk = self._open_chunks.get(job_id)
        limit = MAX_TOP_LOGPROB_TOKENS_PER_CHUNK if token.top_logprobs else MAX_TOKENS_PER_CHUNK
        if open_chunk is not None and len(open_chunk.token_ids) < limit:
            _append(open_chunk, token)
            return
        message = miner_pb2.MinerMessage(chunk=miner_pb2.TokenChunk(job_id=job_id))
        _append(message.chunk, token)
        self._open_chunks[job_id] = message.chunk
        self._send(message)

    def _send_result(self, running: _RunningJob, finish: miner_pb2.FinishReason.ValueType) -> None:
        result = signed_result(
            running.job, running.token_ids, finish, info=running.info, identity=self._identity
        )
        self._send(miner_pb2.MinerMessage(result=result))

    def _finished(self, running: _RunningJob, task: asyncio.Task[None]) -> None:
        """Done callback: answers for jobs that were stopped (possibly before they started)."""
        job_id = running.job.job_id
        self._forget(running)
        if not task.cancelled():
            return
        reason = running.stop_reason
        produced = len(running.token_ids)
        if reason is StopReason.COORDINATOR or (reason is StopReason.HANDBACK and produced):
            logger.info("job %s %s after %d tokens", job_id, reason.value, produced)
            self._send_result(running, miner_pb2.FINISH_REASON_CANCELLED)
        elif reason is StopReason.HANDBACK:
            logger.info("job %s handed back before its first token", job_id)
            self._send(failure(job_id, reason.value, retryable=True))
        else:
            logger.debug("job %s abandoned: %s", job_id, reason.value if reason else "cancelled")


def _append(chunk: miner_pb2.TokenChunk, token: GeneratedToken) -> None:
    chunk.token_ids.append(token.token_id)
    chunk.logprobs.append(token.logprob)
    if token.top_logprobs:
        chunk.top_logprobs.add(
            token_ids=[token_id for token_id, _ in token.top_logprobs],
            logprobs=[logprob for _, logprob in token.top_logprobs],
        )


async def _close(iterator: AsyncIterator[GeneratedToken]) -> None:
    """Closes an engine's generator (a no-op when it already ran to its end)."""
    if isinstance(iterator, AsyncGenerator):
        await iterator.aclose()
