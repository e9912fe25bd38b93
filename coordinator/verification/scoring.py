"""Sending a finished job to another miner for re-scoring, and judging what comes back.

A scorer must be a different identity serving the same model; among those, one on different
hardware than the checked miner (and than earlier scorers of the same job) is preferred, so a
device-specific quirk cannot make two scorers agree by accident, then the least loaded. A scorer
that goes away, answers with an error or with lists of the wrong length, or stays silent past the
timeout is passed over (no penalty: it may just be slow) and the next one is tried.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from coordinator.dispatch.privacy import Eligible, PrivacyPolicy, anyone, eligibility, nobody_vetted
from coordinator.dispatch.registry import MinerRegistry
from coordinator.gateway.session import MinerSession, ScorerLost
from coordinator.verification.judge import Claim, Scores, Thresholds, Verdict, judge_job
from ledger.interface import AccountRef
from proto import miner_pb2

logger = logging.getLogger(__name__)

_FINISH_NAMES = {
    miner_pb2.FINISH_REASON_STOP: "stop",
    miner_pb2.FINISH_REASON_LENGTH: "length",
    miner_pb2.FINISH_REASON_CANCELLED: "cancelled",
}
_ATTEMPTS = 3  # scorers tried for one opinion before giving up on it


@dataclass(frozen=True)
class FinishedJob:
    """A settled job with a verified receipt, as the service hands it to the spot checker."""

    job: miner_pb2.Job  # exactly what the miner was sent (prompt ids, sampling, job id)
    miner_id: str  # who ran it
    device_name: str  # the miner's announced hardware, to pick a scorer on other hardware
    buyer: AccountRef  # who paid, refunded if the check fails
    token_ids: tuple[int, ...]  # every token the miner streamed
    logprobs: tuple[float, ...]  # the logprob the miner claimed for each
    finish_reason: miner_pb2.FinishReason.ValueType  # what the miner reported
    output_sha256: bytes  # from the receipt: keys the selection
    miner_credit: int  # what the settlement paid the miner
    fee: int  # what it paid the operator
    # The alternatives the miner claimed per token, (id, logprob) most likely first, when the
    # buyer asked for top_logprobs; empty otherwise.
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = ()
    # The buyer's privacy tier: its scorers must meet it as its miner did.
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)


def claim_of(finished: FinishedJob, *, vocab_size: int, context_length: int) -> Claim:
    job = finished.job
    return Claim(
        prompt_token_ids=tuple(job.prompt_token_ids),
        token_ids=finished.token_ids,
        logprobs=finished.logprobs,
        finish_reason=_FINISH_NAMES.get(finished.finish_reason, "unspecified"),
        max_tokens=job.sampling.max_tokens,
        stop_token_ids=frozenset(job.sampling.stop_token_ids),
        vocab_size=vocab_size,
        context_length=context_length,
        top_logprobs=finished.top_logprobs,
    )


@dataclass(frozen=True)
class Opinion:
    """One scorer's verdict on one job."""

    scorer_id: str  # who scored
    verdict: Verdict  # the judge's reading of its scores


class Scoring:
    """Gets opinions on finished jobs from scorers picked among the connected miners."""

    def __init__(
        self,
        *,
        registry: MinerRegistry,
        is_banned: Callable[[str], bool],
        timeout_s: float,
        rng: random.Random | None = None,
        is_vetted: Callable[[str], bool] = nobody_vetted,
    ) -> None:
        self._registry = registry
        self._is_banned = is_banned
        self._is_vetted = is_vetted
        self._timeout_s = timeout_s
        self._rng = rng or random.Random()

    def session_of(self, miner_id: str) -> MinerSession | None:
        return self._registry.get(miner_id)

    def pick(
        self,
        model: str,
        *,
        exclude: Collection[str],
        avoid_devices: Collection[str],
        eligible: Eligible = anyone,
    ) -> MinerSession | None:
        """A scorer for ``model``: not excluded or banned, admitted by ``eligible`` (the job's
        privacy tier); other hardware and idle preferred."""
        candidates = [
            session
            for session in self._registry.serving(model)
            if session.miner_id not in exclude
            and not self._is_banned(session.miner_id)
            and eligible(session)
        ]
        if not candidates:
            return None

        def rank(session: MinerSession) -> tuple[bool, float]:
            same_device = session.hello.hardware.device_name in avoid_devices
            return same_device, session.active_jobs / session.max_concurrency

        best = min(rank(session) for session in candidates)
        return self._rng.choice([s for s in candidates if rank(s) == best])

    async def opinion(
        self,
        finished: FinishedJob,
        claim: Claim,
        thresholds: Thresholds,
        *,
        exclude: Collection[str],
        avoid_devices: Collection[str],
    ) -> Opinion | None:
        """One new scorer's verdict, or None when no scorer could give one."""
        tried = set(exclude)
        eligible = eligibility(finished.privacy, is_vetted=self._is_vetted)
        for _ in range(_ATTEMPTS):
            session = self.pick(
                finished.job.model, exclude=tried, avoid_devices=avoid_devices, eligible=eligible
            )
            if session is None:
                return None
            tried.add(session.miner_id)
            scores = await self._ask(session, finished)
            if scores is not None:
                return Opinion(session.miner_id, judge_job(claim, scores, thresholds))
        return None

    async def _ask(self, session: MinerSession, finished: FinishedJob) -> Scores | None:
        job = finished.job
        score = miner_pb2.ScoreJob(
            score_id=f"score-{uuid.uuid4().hex}",
            model=job.model,
            prompt_token_ids=job.prompt_token_ids,
            completion_token_ids=finished.token_ids,
            sampling=job.sampling,
            noise_job_id=job.job_id,
            claimed_top_logprobs=[
                miner_pb2.TopLogprobs(token_ids=[token for token, _ in top])
                for top in finished.top_logprobs
            ],
        )
        future = session.start_score(score)
        try:
            result = await asyncio.wait_for(future, self._timeout_s)
        except TimeoutError:
            session.expire_score(score.score_id)
            logger.info("scorer %s did not answer in %g s", session.miner_id[:12], self._timeout_s)
            return None
        except ScorerLost as lost:
            logger.info("scorer %s went away: %s", session.miner_id[:12], lost)
            return None
        expected = len(finished.token_ids)
        counts = (len(result.logprobs), len(result.margins))
        # No stop margins at all is a scorer that predates them: the judge leaves that rule out.
        stops_fit = len(result.stop_margins) in (0, expected)
        if result.error or counts != (expected, expected) or not stops_fit:
            logger.warning(
                "scorer %s could not score job %s: %s",
                session.miner_id[:12],
                job.job_id,
                result.error
                or f"{counts[0]} log-probabilities, {counts[1]} margins and"
                f" {len(result.stop_margins)} stop margins for {expected} tokens",
            )
            return None
        # Alternatives come back one entry per claimed one, or not at all (a long job's do not
        # fit in one message; they are then left unchecked).
        tops = [tuple(top.logprobs) for top in result.scored_top_logprobs]
        claimed = [len(top) for top in finished.top_logprobs]
        if tops and (
            [len(top) for top in tops] != claimed or len(result.top_thresholds) != len(claimed)
        ):
            logger.warning(
                "scorer %s sent alternatives that do not fit job %s's claim; ignoring them",
                session.miner_id[:12],
                job.job_id,
            )
            tops = []
        return Scores(
            logprobs=tuple(result.logprobs),
            margins=tuple(result.margins),
            stop_margins=tuple(result.stop_margins),
            top_logprobs=tuple(tops),
            top_thresholds=tuple(result.top_thresholds) if tops else (),
        )
