"""The spot checker: selects finished jobs, has them re-scored, and decides.

For a selected job (``policy.selected``):

1. a scorer (another identity serving the model) re-scores it; the judge reads its scores;
2. a pass stands, unless the scorer is itself audited (selected at the scorer's own check rate),
   in which case a second scorer re-scores the job too;
3. a failure is re-scored by a second scorer: two failures confirm it (the miner is punished,
   ``penalties.Penalties.punish``); a pass disputes it;
4. when two scorers disagree, a third one decides, and the scorer outvoted by the other two is
   punished like a cheat (a lazy or framing scorer); with no third scorer the check stays
   ``disputed`` and the miner's next jobs are all checked;
5. every opinion on the miner's job also feeds its pooled statistics, kept per scorer: subtle
   cheats (quantized weights, weight noise) show only over many tokens. When the pools of two
   different scorers both fail, that is a confirmed failure too.

Checks run in a few worker tasks fed by a bounded queue, never on a buyer's request path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from coordinator.catalog import Catalog
from coordinator.ops.metrics import CoordinatorMetrics
from coordinator.verification.judge import PooledStats, Thresholds
from coordinator.verification.penalties import Penalties
from coordinator.verification.policy import VerificationConfig, check_rate, selected
from coordinator.verification.scoring import FinishedJob, Opinion, Scoring, claim_of
from coordinator.verification.trust import CheckRecord, TrustStore

logger = logging.getLogger(__name__)

# Pooled statistics weigh recent jobs: past this many times the judging minimum, halve them.
_POOL_DECAY_FACTOR = 8


class SpotChecker:
    """Owns the check queue and its workers; run it with :meth:`running`."""

    def __init__(
        self,
        config: VerificationConfig,
        *,
        catalog: Catalog,
        trust: TrustStore,
        scoring: Scoring,
        penalties: Penalties,
        metrics: CoordinatorMetrics,
    ) -> None:
        self._config = config
        self._catalog = catalog
        self._trust = trust
        self._scoring = scoring
        self._penalties = penalties
        self._metrics = metrics
        self._queue: asyncio.Queue[FinishedJob] = asyncio.Queue(maxsize=config.max_backlog)
        self._idle = asyncio.Event()
        self._idle.set()
        self._in_flight = 0

    def submit(self, finished: FinishedJob) -> None:
        """Considers one settled job; queues it when selected. Never blocks."""
        if not self._config.enabled or not finished.token_ids:
            return
        rate = check_rate(self._trust.get(finished.miner_id).consecutive_valid, self._config)
        chosen = selected(
            self._config.selection_key,
            job_id=finished.job.job_id,
            output_sha256=finished.output_sha256,
            rate=rate,
        )
        if not chosen:
            return
        try:
            self._queue.put_nowait(finished)
        except asyncio.QueueFull:
            logger.warning("spot-check backlog full: job %s goes unchecked", finished.job.job_id)
            self._metrics.spot_check(finished.miner_id, "skipped")
            return
        self._idle.clear()

    async def wait_idle(self) -> None:
        """Returns once every queued check has been decided (tests, graceful shutdown)."""
        await self._idle.wait()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[SpotChecker]:
        workers = [
            asyncio.create_task(self._work(), name=f"spot-checker-{index}")
            for index in range(self._config.max_concurrent_checks)
        ]
        try:
            yield self
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _work(self) -> None:
        while True:
            finished = await self._queue.get()
            self._in_flight += 1
            try:
                await self.check(finished)
            except Exception:
                logger.exception("spot check of job %s failed", finished.job.job_id)
            finally:
                self._in_flight -= 1
                if self._queue.empty() and self._in_flight == 0:
                    self._idle.set()

    async def check(self, finished: FinishedJob) -> str:
        """Runs one check to its end; returns the outcome recorded for the miner."""
        entry = self._catalog.get(finished.job.model)
        thresholds = entry.verification
        claim = claim_of(
            finished, vocab_size=entry.tokenizer.vocab_size, context_length=entry.context_length
        )
        miner = finished.miner_id
        devices = {finished.device_name}
        opinions: list[Opinion] = []

        async def ask() -> Opinion | None:
            exclude = {miner, *(opinion.scorer_id for opinion in opinions)}
            opinion = await self._scoring.opinion(
                finished, claim, thresholds, exclude=exclude, avoid_devices=devices
            )
            if opinion is not None:
                opinions.append(opinion)
                worker = self._scoring.session_of(opinion.scorer_id)
                if worker is not None:
                    devices.add(worker.device_name)
            return opinion

        first = await ask()
        if first is None:
            return await self._finish(finished, "skipped", opinions, thresholds)
        audit = first.verdict.passed and selected(
            self._config.selection_key,
            job_id=f"audit:{finished.job.job_id}",
            output_sha256=first.scorer_id.encode(),
            rate=check_rate(self._trust.get(first.scorer_id).consecutive_valid, self._config),
        )
        if first.verdict.passed and not audit:
            return await self._finish(finished, "passed", opinions, thresholds)
        second = await ask()
        if second is None:
            outcome = "passed" if first.verdict.passed else "failed"
            return await self._finish(finished, outcome, opinions, thresholds)
        if first.verdict.passed == second.verdict.passed:
            outcome = "passed" if first.verdict.passed else "confirmed"
            return await self._finish(finished, outcome, opinions, thresholds)
        third = await ask()
        if third is None:
            return await self._finish(finished, "disputed", opinions, thresholds)
        outvoted = next(o for o in (first, second) if o.verdict.passed != third.verdict.passed)
        await self._penalties.punish(
            outvoted.scorer_id,
            finished,
            reasons=_reasons([outvoted]) or "passed a job two other scorers failed",
            scorers=tuple(o.scorer_id for o in opinions),
            as_scorer=True,
        )
        outcome = "passed" if third.verdict.passed else "confirmed"
        return await self._finish(
            finished, outcome, [o for o in opinions if o is not outvoted], thresholds
        )

    async def _finish(
        self,
        finished: FinishedJob,
        outcome: str,
        opinions: list[Opinion],
        thresholds: Thresholds,
    ) -> str:
        miner = finished.miner_id
        scorers = tuple(opinion.scorer_id for opinion in opinions)
        failing = [o for o in opinions if not o.verdict.passed]
        pooled_failures: list[str] = []
        async with self._trust.lock:
            record = self._trust.get(miner)
            if opinions:
                record.checks_run += 1
                self._metrics.spot_check(miner, "run")
            for opinion in opinions:
                pool = record.pools.setdefault(opinion.scorer_id, PooledStats())
                pool.add(opinion.verdict)
                _decay(pool, thresholds)
            for scorer, pool in sorted(record.pools.items()):
                pooled = pool.verdict(thresholds)
                if pooled is not None and not pooled.passed:
                    pooled_failures.append(f"pooled by scorer {scorer[:12]}: {_join(pooled)}")
            if outcome == "passed" and pooled_failures:
                outcome = "confirmed" if len(pooled_failures) >= 2 else "failed"
            if outcome == "passed":
                record.checks_passed += 1
                record.consecutive_valid += 1
            elif outcome in ("failed", "confirmed", "disputed"):
                record.checks_failed += outcome != "disputed"
                record.consecutive_valid = 0
            for scorer in scorers:
                scorer_record = self._trust.get(scorer)
                scorer_record.scorings += 1
                if len(opinions) > 1:  # its opinion was compared with another and stood
                    scorer_record.consecutive_valid += 1
                await self._trust.save(scorer_record)
            await self._trust.save(record)
        reasons = _reasons(failing) or "; ".join(pooled_failures)
        if outcome == "confirmed":
            # Recorded as failed first, then punished (which records "confirmed").
            self._metrics.spot_check(miner, "failed")
            await self._penalties.punish(miner, finished, reasons=reasons, scorers=scorers)
        else:
            self._metrics.spot_check(miner, outcome)
            await self._trust.record_check(
                CheckRecord(
                    job_id=finished.job.job_id,
                    miner_id=miner,
                    outcome=outcome,
                    scorers=scorers,
                    reasons=reasons,
                )
            )
        if outcome != "passed":
            logger.warning(
                "spot check of job %s (miner %s): %s %s",
                finished.job.job_id,
                miner[:12],
                outcome,
                reasons,
            )
        await self._penalties.pay_scorers(finished, scorers)
        return outcome


def _join(verdict: object) -> str:
    reasons = getattr(verdict, "reasons", ())
    return ", ".join(reasons) or "failed"


def _reasons(opinions: list[Opinion]) -> str:
    return "; ".join(f"scorer {o.scorer_id[:12]}: {_join(o.verdict)}" for o in opinions)


def _decay(pool: PooledStats, thresholds: Thresholds) -> None:
    if pool.tokens > _POOL_DECAY_FACTOR * max(1, thresholds.pooled_min_tokens):
        pool.jobs //= 2
        pool.tokens //= 2
        pool.disagreeing //= 2
        pool.sum_abs_dlogprob /= 2
