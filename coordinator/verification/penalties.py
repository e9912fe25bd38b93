"""What a confirmed failure costs, and what scoring earns.

A failure is confirmed when two scorers agree against a party: against the miner that ran the
job, or against a scorer that two others outvoted. The offender then

- refunds the buyer of the failed job everything it paid: from the offender's account while it
  has credits, the rest minted back from issuance (where earlier slashes of it went);
- loses its unmatured credits (credited within the verification window) to a slash entry;
- restarts with no trust: every one of its next jobs is checked;
- is banned for good (its key refused, its worker closed) at its ``bans_after``-th
  confirmed failure;
- hears why, in a ``SlashNotice`` on its stream (and in the ledger memo of the entries).

Scorers whose opinion stood are paid from the fee account (REWARD entries) at
``policy.scoring_pay``.
"""

from __future__ import annotations

import hashlib
import logging

from coordinator.catalog import Catalog
from coordinator.dispatch.registry import MinerRegistry
from coordinator.ops.metrics import CoordinatorMetrics
from coordinator.verification.policy import VerificationConfig, scoring_pay
from coordinator.verification.scoring import FinishedJob
from coordinator.verification.trust import CheckRecord, TrustStore
from coordinator.worker import SlashNotice
from ledger.entry import MAX_MEMO_BYTES
from ledger.interface import AccountKind, AccountRef, Ledger

logger = logging.getLogger(__name__)


def _reference(kind: str, job_id: str) -> bytes:
    return hashlib.sha256(f"meshmint/v1/spot-check/{kind}\x00{job_id}".encode()).digest()


def _memo(text: str) -> str:
    encoded = text.encode("utf-8")[:MAX_MEMO_BYTES]
    return encoded.decode("utf-8", errors="ignore")


class Penalties:
    """Applies the consequences of checks to the ledger, the trust records and the workers."""

    def __init__(
        self,
        config: VerificationConfig,
        *,
        catalog: Catalog,
        ledger: Ledger,
        trust: TrustStore,
        registry: MinerRegistry,
        metrics: CoordinatorMetrics,
    ) -> None:
        self._config = config
        self._catalog = catalog
        self._ledger = ledger
        self._trust = trust
        self._registry = registry
        self._metrics = metrics

    async def punish(
        self,
        offender: str,
        finished: FinishedJob,
        *,
        reasons: str,
        scorers: tuple[str, ...],
        as_scorer: bool = False,
    ) -> None:
        """Refund, slash, reset, maybe ban. ``as_scorer``: the offender scored the job wrongly
        (the buyer is then not refunded: the job itself was fine)."""
        job_id = finished.job.job_id
        account = AccountRef(AccountKind.MINER, offender)
        role = "scored" if as_scorer else "ran"
        memo = _memo(f"spot check of job {job_id} (which it {role}) failed: {reasons}")
        refunded = taken_from_offender = 0
        if not as_scorer:
            # The offender pays the whole refund while it has credits; what it no longer has was
            # slashed back to issuance already (an earlier failure), so issuance pays the rest.
            charge = finished.miner_credit + finished.fee
            reference = _reference("refund", job_id)
            taken_from_offender = await self._ledger.refund(
                finished.buyer, charge, source=account, reference=reference, memo=memo
            )
            refunded = taken_from_offender
            if refunded < charge:
                await self._ledger.mint(
                    finished.buyer,
                    charge - refunded,
                    memo=_memo(f"refund of job {job_id} from slashed credits: {reasons}"),
                )
                refunded = charge
        unmatured = await self._ledger.unmatured(account, window_s=self._config.window_s)
        slashed = await self._ledger.slash(
            account, unmatured, reference=_reference("slash", job_id), memo=memo
        )
        async with self._trust.lock:
            record = self._trust.get(offender)
            record.confirmed_failures += 1
            record.contradicted += as_scorer
            record.consecutive_valid = 0
            record.last_failure = reasons
            record.pools.clear()
            record.banned = record.banned or record.confirmed_failures >= self._config.bans_after
            banned = record.banned
            await self._trust.save(record)
        if as_scorer:
            self._metrics.scorer_contradicted(offender)
        else:
            self._metrics.spot_check(offender, "confirmed")
        await self._trust.record_check(
            CheckRecord(
                job_id=job_id,
                miner_id=offender,
                outcome="contradicted" if as_scorer else "confirmed",
                scorers=scorers,
                reasons=reasons,
                slashed=slashed + taken_from_offender,
                refunded=refunded,
            )
        )
        logger.warning(
            "confirmed failure of %s (%s job %s): refunded %d to %s, slashed %d%s: %s",
            offender[:12],
            role,
            job_id,
            refunded,
            finished.buyer,
            slashed,
            "; key banned" if banned else "",
            reasons,
        )
        worker = self._registry.get(offender)
        if worker is not None:
            worker.send_slash_notice(
                SlashNotice(
                    job_id=job_id, amount=slashed + taken_from_offender, reason=memo, banned=banned
                )
            )
            if banned:
                worker.ban(
                    f"this key is banned after {self._config.bans_after} confirmed "
                    "failed spot checks",
                    reason=f"banned: {reasons}",
                )

    async def pay_scorers(self, finished: FinishedJob, scorers: tuple[str, ...]) -> None:
        """Pays each scorer whose opinion stood for one prefill over the job's tokens."""
        entry = self._catalog.get(finished.job.model)
        tokens = len(finished.job.prompt_token_ids) + len(finished.token_ids)
        pay = scoring_pay(
            tokens,
            input_price_per_mtok=entry.input_price_per_mtok,
            pay_bps=self._config.scorer_pay_bps,
        )
        if pay == 0:
            return
        for scorer in scorers:
            await self._ledger.reward(
                AccountRef(AccountKind.MINER, scorer),
                pay,
                reference=_reference(f"score/{scorer}", finished.job.job_id),
                memo=f"scored job {finished.job.job_id}",
            )
