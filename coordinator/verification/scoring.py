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
from coordinator.jobs import Job, MinerFinish, ScoreRequest, TopAlternatives
from coordinator.verification.judge import Claim, Scores, Thresholds, Verdict, judge_job
from coordinator.worker import ScorerLost, Worker
from ledger.interface import AccountRef

logger = logging.getLogger(__name__)

_ATTEMPTS = 3  # scorers tried for one opinion before giving up on it


@dataclass(frozen=True)
class FinishedJob:
    """A settled job with a verified receipt, as the service hands it to the spot checker."""

    job: Job  # exactly what the miner was sent (prompt ids, sampling, job id)
    miner_id: str  # who ran it
    device_name: str  # the miner's announced hardware, to pick a scorer on other hardware
    buyer: AccountRef  # who paid, refunded if the check fails
    token_ids: tuple[int, ...]  # every token the miner streamed
    logprobs: tuple[float, ...]  # the logprob the miner claimed for each
    finish_reason: MinerFinish  # what the miner reported
    output_sha256: bytes  # from the receipt: keys the selection
    miner_credit: int  # what the settlement paid the miner
    fee: int  # what it paid the operator
    # The alternatives the miner claimed per token, (id, logprob) most likely first, when the
    # buyer asked for top_logprobs; empty otherwise.
    top_logprobs: tuple[TopAlternatives, ...] = ()
    # The buyer's privacy tier: its scorers must meet it as its miner did.
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)


def claim_of(finished: FinishedJob, *, vocab_size: int, context_length: int) -> Claim:
    job = finished.job
    return Claim(
        prompt_token_ids=tuple(job.prompt_token_ids),
        token_ids=finished.token_ids,
        logprobs=finished.logprobs,
        finish_reason=finished.finish_reason.value,
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

    def session_of(self, miner_id: str) -> Worker | None:
        return self._registry.get(miner_id)

    def pick(
        self,
        model: str,
        *,
        exclude: Collection[str],
        avoid_devices: Collection[str],
        eligible: Eligible = anyone,
    ) -> Worker | None:
        """A scorer for ``model``: not excluded or banned, admitted by ``eligible`` (the job's
        privacy tier); other hardware and idle preferred."""
        candidates = [
            worker
            for worker in self._registry.serving(model)
            if worker.miner_id not in exclude
            and not self._is_banned(worker.miner_id)
            and eligible(worker)
        ]
        if not candidates:
            return None

        def rank(worker: Worker) -> tuple[bool, float]:
            same_device = worker.device_name in avoid_devices
            return same_device, worker.active_jobs / worker.max_concurrency

        best = min(rank(worker) for worker in candidates)
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
            worker = self.pick(
                finished.job.model, exclude=tried, avoid_devices=avoid_devices, eligible=eligible
            )
            if worker is None:
                return None
            tried.add(worker.miner_id)
            scores = await self._ask(worker, finished)
            if scores is not None:
                return Opinion(worker.miner_id, judge_job(claim, scores, thresholds))
        return None

    async def _ask(self, worker: Worker, finished: FinishedJob) -> Scores | None:
        job = finished.job
        score = ScoreRequest(
            score_id=f"score-{uuid.uuid4().hex}",
            job=job,
            completion_token_ids=finished.token_ids,
            claimed_top_ids=tuple(
                tuple(token for token, _ in top) for top in finished.top_logprobs
            ),
        )
        future = worker.start_score(score)
        try:
            result = await asyncio.wait_for(future, self._timeout_s)
        except TimeoutError:
            worker.expire_score(score.score_id)
            logger.info("scorer %s did not answer in %g s", worker.miner_id[:12], self._timeout_s)
            return None
        except ScorerLost as lost:
            logger.info("scorer %s went away: %s", worker.miner_id[:12], lost)
            return None
        expected = len(finished.token_ids)
        counts = (len(result.logprobs), len(result.margins))
        # No stop margins at all is a scorer that predates them: the judge leaves that rule out.
        stops_fit = len(result.stop_margins) in (0, expected)
        if result.error or counts != (expected, expected) or not stops_fit:
            logger.warning(
                "scorer %s could not score job %s: %s",
                worker.miner_id[:12],
                job.job_id,
                result.error
                or f"{counts[0]} log-probabilities, {counts[1]} margins and"
                f" {len(result.stop_margins)} stop margins for {expected} tokens",
            )
            return None
        # Alternatives come back one entry per claimed one, or not at all (a long job's do not
        # fit in one message; they are then left unchecked).
        tops = list(result.scored_top_logprobs)
        claimed = [len(top) for top in finished.top_logprobs]
        if tops and (
            [len(top) for top in tops] != claimed or len(result.top_thresholds) != len(claimed)
        ):
            logger.warning(
                "scorer %s sent alternatives that do not fit job %s's claim; ignoring them",
                worker.miner_id[:12],
                job.job_id,
            )
            tops = []
        return Scores(
            logprobs=result.logprobs,
            margins=result.margins,
            stop_margins=result.stop_margins,
            top_logprobs=tuple(tops),
            top_thresholds=result.top_thresholds if tops else (),
        )
