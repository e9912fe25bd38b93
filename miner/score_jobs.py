"""Spot checks asked of this miner: re-scoring a finished job, usually another miner's.

The coordinator sends a ``ScoreJob``; the miner runs ``Engine.score`` for the named model in a
task and answers with exactly one ``ScoreResult``: a log-probability, a margin and a stop margin
per completion token (no stop margins from an engine that does not compute them), or ``error``
set (and no numbers) when the job cannot be scored here: a model not served, ids outside the
vocabulary, a context overflow, an engine failure. The one exception is a lost connection, which
leaves nobody to answer.

Score jobs do not take job slots: one is a single prefill (about 20 times cheaper than generating
the job) and the engine runs it between other jobs' decode steps. A coordinator gone wrong could
still send them faster than they finish, so at most ``MAX_SCORES_IN_FLIGHT`` run at once; the
rest are answered with an error at once, and the coordinator asks another scorer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Literal

from miner.engine.base import Engine, GenerationError, ScoreRequest
from miner.jobs import Send, StopReason, sampling_params
from proto import miner_pb2
from proto.limits import MAX_MINER_MESSAGE_BYTES

logger = logging.getLogger(__name__)

MAX_SCORES_IN_FLIGHT = 16
"""Score jobs running at once on one connection; more are refused with an error."""


_OptionalField = Literal["scored_top_logprobs", "top_thresholds", "stop_margins"]
# What a too-large ScoreResult leaves out, in this order.
_OPTIONAL_FIELDS: tuple[tuple[str, tuple[_OptionalField, ...]], ...] = (
    ("alternatives", ("scored_top_logprobs", "top_thresholds")),
    ("stop margins", ("stop_margins",)),
)


def score_error(score_id: str, message: str) -> miner_pb2.MinerMessage:
    """A ScoreResult saying why ``score_id`` was not scored."""
    return miner_pb2.MinerMessage(
        score_result=miner_pb2.ScoreResult(score_id=score_id, error=message)
    )


class ScoreRunner:
    """The score jobs in flight on one connection."""

    def __init__(self, engines: Mapping[str, Engine], *, send: Send) -> None:
        self._engines = engines
        self._send = send
        self._running: dict[str, asyncio.Task[None]] = {}
        self._stop_reasons: dict[str, StopReason] = {}

    @property
    def active(self) -> int:
        """Score jobs in flight."""
        return len(self._running)

    def start(self, job: miner_pb2.ScoreJob) -> None:
        """Starts scoring ``job``, or answers it with an error when it cannot run here."""
        score_id = job.score_id
        if score_id in self._running:
            # An error would name the score job that is running fine.
            logger.warning("ignoring a second ScoreJob %s while the first is running", score_id)
            return
        engine = self._engines.get(job.model)
        if engine is None:
            logger.warning("score job %s asks for model %r, not served here", score_id, job.model)
            self._send(score_error(score_id, f"model {job.model!r} is not served by this miner"))
            return
        if len(self._running) >= MAX_SCORES_IN_FLIGHT:
            logger.warning("score job %s refused: %d already running", score_id, self.active)
            self._send(score_error(score_id, "too many score jobs in flight"))
            return
        task = asyncio.create_task(self._run(job, engine), name=f"score-{score_id}")
        self._running[score_id] = task
        task.add_done_callback(lambda done: self._finished(score_id, done))

    async def wait(self, limit_s: float | None) -> bool:
        """Waits for the score jobs in flight now; True when they all ended within ``limit_s``."""
        tasks = list(self._running.values())
        if not tasks:
            return True
        _, pending = await asyncio.wait(tasks, timeout=limit_s)
        return not pending

    async def stop_all(self, reason: StopReason) -> None:
        """Cancels every score job in flight and waits until their answers (if any) are queued.

        The coordinator is told, with an error, unless the connection is gone.
        """
        tasks = list(self._running.items())
        for score_id, task in tasks:
            self._stop_reasons.setdefault(score_id, reason)
            task.cancel()
        if tasks:
            await asyncio.wait([task for _, task in tasks])

    async def _run(self, job: miner_pb2.ScoreJob, engine: Engine) -> None:
        score_id = job.score_id
        started = time.monotonic()
        request = ScoreRequest(
            noise_job_id=job.noise_job_id,
            prompt_token_ids=tuple(job.prompt_token_ids),
            completion_token_ids=tuple(job.completion_token_ids),
            sampling=sampling_params(job.sampling),
            claimed_top_ids=tuple(tuple(top.token_ids) for top in job.claimed_top_logprobs),
        )
        try:
            scores = await engine.score(request)
        except GenerationError as err:
            logger.warning("score job %s cannot be scored: %s", score_id, err)
            self._send(score_error(score_id, str(err)))
            return
        except Exception as err:
            logger.exception("score job %s crashed", score_id)
            self._send(score_error(score_id, f"miner error: {err}"))
            return
        expected = len(request.completion_token_ids)
        counts = (len(scores.logprobs), len(scores.margins))
        claimed_tops = len(request.claimed_top_ids)
        if (
            counts != (expected, expected)
            or len(scores.stop_margins) not in (0, expected)
            or (len(scores.top_logprobs), len(scores.top_thresholds)) != (claimed_tops,) * 2
        ):
            # An engine bug; a result the coordinator would reject anyway.
            logger.error("score job %s: the engine scored the wrong number of tokens", score_id)
            self._send(score_error(score_id, "miner error: wrong number of scores"))
            return
        message = miner_pb2.MinerMessage(
            score_result=miner_pb2.ScoreResult(
                score_id=score_id,
                logprobs=scores.logprobs,
                margins=scores.margins,
                stop_margins=scores.stop_margins,
                scored_top_logprobs=[
                    miner_pb2.TopLogprobs(token_ids=ids, logprobs=values)
                    for ids, values in zip(
                        request.claimed_top_ids, scores.top_logprobs, strict=True
                    )
                ],
                top_thresholds=scores.top_thresholds,
            )
        )
        # A long job's optional figures may not fit one message: they go, largest first (the
        # alternatives about 100 bytes a token, stop margins 4), and the coordinator judges
        # everything else without them.
        for what, fields in _OPTIONAL_FIELDS:
            if message.ByteSize() > MAX_MINER_MESSAGE_BYTES:
                logger.warning(
                    "score job %s: %d tokens are too many to report %s for",
                    score_id,
                    expected,
                    what,
                )
                for name in fields:
                    message.score_result.ClearField(name)
        if message.ByteSize() > MAX_MINER_MESSAGE_BYTES:
            logger.error("score job %s: %d tokens are too many to report", score_id, expected)
            self._send(score_error(score_id, "too many tokens to report in one message"))
            return
        self._send(message)
        logger.info(
            "score job %s done: %d tokens of job %s, %.2f s",
            score_id,
            len(scores.margins),
            job.noise_job_id,
            time.monotonic() - started,
        )

    def _finished(self, score_id: str, task: asyncio.Task[None]) -> None:
        """Done callback: forgets the task and answers for one that was cancelled."""
        if self._running.get(score_id) is task:
            del self._running[score_id]
        reason = self._stop_reasons.pop(score_id, None)
        if not task.cancelled():
            return
        if reason is None or reason is StopReason.DISCONNECT:
            logger.debug("score job %s abandoned: connection lost", score_id)
            return
        logger.info("score job %s stopped: %s", score_id, reason.value)
        self._send(score_error(score_id, reason.value))
