"""The spot checker's decisions, with real sessions, a real ledger and a real trust store.

Scorers are simulated at the session boundary (reading ``session.outbox`` and calling
``session.deliver``, as the gRPC servicer does): each answers every ScoreJob with honest scores
(the claimed logprobs, margins 0), damning ones (margins far above the limit), or nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import asyncpg
import pytest

from coordinator.catalog import Catalog, CatalogEntry
from coordinator.dispatch.privacy import PrivacyPolicy, eligibility
from coordinator.dispatch.registry import MinerRegistry
from coordinator.gateway.session import MinerSession
from coordinator.jobs import MinerFinish
from coordinator.ops.metrics import CoordinatorMetrics
from coordinator.verification.checker import SpotChecker
from coordinator.verification.penalties import Penalties
from coordinator.verification.policy import VerificationConfig, check_rate, scoring_pay, selected
from coordinator.verification.scoring import FinishedJob, Scoring, claim_of
from coordinator.verification.trust import TrustStore, recent_checks
from ledger.interface import AccountKind, AccountRef
from ledger.postgres import PostgresLedger
from proto import miner_pb2
from proto.signing import output_digest
from tests.coordinator.core_fakes import make_job, make_session

Behaviour = Callable[[miner_pb2.ScoreJob], miner_pb2.ScoreResult | None]
BUYER = AccountRef(AccountKind.BUYER, "key-1")
CLAIMED_LOGPROB = -0.75
TOKENS = tuple(range(65, 65 + 24))  # printable bytes: no stop token among them


def honest(score: miner_pb2.ScoreJob) -> miner_pb2.ScoreResult:
    n = len(score.completion_token_ids)
    return miner_pb2.ScoreResult(
        score_id=score.score_id, logprobs=[CLAIMED_LOGPROB] * n, margins=[0.0] * n
    )


def damning(score: miner_pb2.ScoreJob) -> miner_pb2.ScoreResult:
    n = len(score.completion_token_ids)
    return miner_pb2.ScoreResult(
        score_id=score.score_id, logprobs=[CLAIMED_LOGPROB - 3] * n, margins=[6.0] * n
    )


def silent(score: miner_pb2.ScoreJob) -> None:
    return None


SKIPPED_AT = 5


def skipped_stop(score: miner_pb2.ScoreJob) -> miner_pb2.ScoreResult:
    """What an honest scorer sees of a miner that went on past a stop at ``SKIPPED_AT``: every
    token agrees within the margin limit, but the sampler would have stopped there."""
    result = honest(score)
    n = len(score.completion_token_ids)
    result.margins[SKIPPED_AT] = 0.8
    result.stop_margins.extend([0.8 if i == SKIPPED_AT else -2.0 for i in range(n)])
    return result


def stop_margins_of_the_wrong_length(score: miner_pb2.ScoreJob) -> miner_pb2.ScoreResult:
    result = honest(score)
    result.stop_margins.extend([-2.0] * (len(score.completion_token_ids) - 1))
    return result


def off_by(delta: float) -> Behaviour:
    """What an honest scorer sees of a miner on slightly wrong weights: its claimed
    log-probabilities are off by ``delta``, always, and it picks the right tokens."""

    def answer(score: miner_pb2.ScoreJob) -> miner_pb2.ScoreResult:
        n = len(score.completion_token_ids)
        return miner_pb2.ScoreResult(
            score_id=score.score_id, logprobs=[CLAIMED_LOGPROB - delta] * n, margins=[0.0] * n
        )

    return answer


@dataclass
class Market:
    ledger: PostgresLedger
    trust: TrustStore
    registry: MinerRegistry
    checker: SpotChecker
    metrics: CoordinatorMetrics
    catalog: Catalog
    pool: asyncpg.Pool[asyncpg.Record]
    received: dict[str, list[miner_pb2.CoordinatorMessage]] = field(default_factory=dict)

    async def miner(self, behaviour: Behaviour = honest) -> MinerSession:
        session = make_session(self.catalog)
        await self.ledger.open_account(AccountRef(AccountKind.MINER, session.miner_id))
        self.registry.add(session)
        inbox = self.received.setdefault(session.miner_id, [])
        asyncio.get_running_loop().create_task(_answer(session, behaviour, inbox))
        return session

    async def settled_job(self, miner: MinerSession, entry: CatalogEntry) -> FinishedJob:
        """A job ``miner`` ran and was paid for: 100 to the miner, 50 to the fee account (which
        pays scorers)."""
        job = make_job(entry, max_tokens=len(TOKENS))
        hold = await self.ledger.hold(BUYER, 150, reference=bytes(32))
        miner_account = AccountRef(AccountKind.MINER, miner.miner_id)
        await self.ledger.settle(
            hold, miner=miner_account, miner_credit=100, fee=50, reference=bytes(32)
        )
        return FinishedJob(
            job=job,
            miner_id=miner.miner_id,
            device_name="test",
            buyer=BUYER,
            token_ids=TOKENS,
            logprobs=(CLAIMED_LOGPROB,) * len(TOKENS),
            finish_reason=MinerFinish.LENGTH,
            output_sha256=output_digest(TOKENS),
            miner_credit=100,
            fee=50,
        )

    async def balance(self, account: AccountRef) -> int:
        return await self.ledger.balance(account)


async def _answer(
    session: MinerSession, behaviour: Behaviour, inbox: list[miner_pb2.CoordinatorMessage]
) -> None:
    while (message := await session.outbox.get()) is not None:
        if message.WhichOneof("body") == "score":
            result = behaviour(message.score)
            if result is not None:
                session.deliver(miner_pb2.MinerMessage(score_result=result))
        else:
            inbox.append(message)


@pytest.fixture
async def market(
    db_pool: asyncpg.Pool[asyncpg.Record], entry: CatalogEntry
) -> AsyncIterator[Market]:
    # Pools judge after two jobs' tokens, so pooled verdicts show within a short test.
    thresholds = dataclasses.replace(entry.verification, pooled_min_tokens=2 * len(TOKENS))
    catalog = Catalog([dataclasses.replace(entry, verification=thresholds)])
    ledger = await PostgresLedger.create(db_pool)
    trust = await TrustStore.create(db_pool)
    registry = MinerRegistry()
    metrics = CoordinatorMetrics()
    config = VerificationConfig(score_timeout_s=0.5, probation_checks=3, floor=0.5)
    checker = SpotChecker(
        config,
        catalog=catalog,
        trust=trust,
        scoring=Scoring(registry=registry, is_banned=trust.is_banned, timeout_s=0.5),
        penalties=Penalties(
            config, catalog=catalog, ledger=ledger, trust=trust, registry=registry, metrics=metrics
        ),
        metrics=metrics,
    )
    await ledger.open_account(BUYER)
    await ledger.mint(BUYER, 10_000)
    try:
        yield Market(ledger, trust, registry, checker, metrics, catalog, db_pool)
    finally:
        for session in registry.workers():
            session.close("test over")
        await ledger.aclose()


async def notices(market: Market, session: MinerSession) -> list[miner_pb2.SlashNotice]:
    await asyncio.sleep(0.05)  # let the simulated miner read its outbox
    return [
        message.slash_notice
        for message in market.received[session.miner_id]
        if message.WhichOneof("body") == "slash_notice"
    ]


async def test_a_passing_check_builds_trust_and_pays_the_scorer(
    market: Market, entry: CatalogEntry
) -> None:
    miner, scorer = await market.miner(), await market.miner()
    finished = await market.settled_job(miner, entry)
    assert await market.checker.check(finished) == "passed"
    record = market.trust.get(miner.miner_id)
    assert (record.checks_run, record.checks_passed, record.consecutive_valid) == (1, 1, 1)
    pay = scoring_pay(
        len(finished.job.prompt_token_ids) + len(TOKENS),
        input_price_per_mtok=entry.input_price_per_mtok,
        pay_bps=10_000,
    )
    assert pay > 0
    assert await market.balance(AccountRef(AccountKind.MINER, scorer.miner_id)) == pay
    assert await market.balance(AccountRef(AccountKind.MINER, miner.miner_id)) == 100


async def test_two_scorers_failing_a_job_refund_the_buyer_and_slash_the_miner(
    market: Market, entry: CatalogEntry
) -> None:
    cheat = await market.miner()
    await market.miner(damning)
    await market.miner(damning)
    first = await market.settled_job(cheat, entry)
    second = await market.settled_job(cheat, entry)  # also unmatured: slashed too
    buyer_before = await market.balance(BUYER)
    assert await market.checker.check(first) == "confirmed"
    assert await market.balance(BUYER) == buyer_before + 150  # everything it paid for the job
    assert await market.balance(AccountRef(AccountKind.MINER, cheat.miner_id)) == 0
    record = market.trust.get(cheat.miner_id)
    assert (record.confirmed_failures, record.consecutive_valid, record.banned) == (1, 0, False)
    assert "disagree" in record.last_failure or "margin" in record.last_failure
    [notice] = await notices(market, cheat)
    assert notice.job_id == first.job.job_id and notice.amount == 200 and not notice.banned
    assert check_rate(record.consecutive_valid, VerificationConfig()) == 1.0
    # A second confirmed failure bans the key and ends its session.
    assert await market.checker.check(second) == "confirmed"
    assert market.trust.is_banned(cheat.miner_id)
    assert cheat.closed_reason is not None and cheat.closed_reason.startswith("banned")
    # The first failure emptied the miner's account (slashed to issuance), so issuance refunds
    # the second buyer in full.
    [row, first_row] = await recent_checks(market.pool, miner_id=cheat.miner_id)
    assert (first_row.outcome, first_row.refunded, first_row.slashed) == ("confirmed", 150, 200)
    assert (row.outcome, row.refunded, row.slashed) == ("confirmed", 150, 0)
    assert await market.balance(BUYER) == buyer_before + 300


async def test_one_failing_scorer_with_nobody_to_confirm_punishes_nobody(
    market: Market, entry: CatalogEntry
) -> None:
    miner = await market.miner()
    await market.miner(damning)
    finished = await market.settled_job(miner, entry)
    assert await market.checker.check(finished) == "failed"
    assert await market.balance(AccountRef(AccountKind.MINER, miner.miner_id)) == 100
    record = market.trust.get(miner.miner_id)
    assert (record.checks_failed, record.confirmed_failures) == (1, 0)
    assert record.consecutive_valid == 0  # its next jobs are all checked


async def test_a_framing_scorer_outvoted_by_two_others_is_punished(
    market: Market, entry: CatalogEntry
) -> None:
    miner = await market.miner()
    framer = await market.miner(damning)
    await market.miner(honest)
    await market.miner(honest)
    # Scorers are picked at random; in probation every pass is audited by a second scorer, so
    # the framer meets the job within a few checks, first or second.
    outcomes = set()
    for _ in range(12):
        finished = await market.settled_job(miner, entry)
        outcomes.add(await market.checker.check(finished))
        if market.trust.get(framer.miner_id).contradicted:
            break
    framer_record = market.trust.get(framer.miner_id)
    assert framer_record.contradicted >= 1, outcomes
    assert framer_record.confirmed_failures >= 1
    assert market.trust.get(miner.miner_id).confirmed_failures == 0
    assert await market.balance(AccountRef(AccountKind.MINER, miner.miner_id)) > 0


async def test_two_scorers_pools_failing_confirm_a_subtle_cheat(
    market: Market, entry: CatalogEntry
) -> None:
    limits = entry.verification
    per_job = limits.dlogprob_allowance / len(TOKENS) + limits.max_mean_abs_dlogprob
    pooled = limits.pooled_max_mean_abs_dlogprob
    assert pooled < per_job  # else no cheat could pass a job yet fail the pool
    miner = await market.miner()
    await market.miner(off_by((pooled + per_job) / 2))
    await market.miner(off_by((pooled + per_job) / 2))
    first = await market.settled_job(miner, entry)
    assert await market.checker.check(first) == "passed"  # one job says nothing yet
    record = market.trust.get(miner.miner_id)
    assert len(record.pools) == 2  # probation: every pass was audited by a second scorer
    second = await market.settled_job(miner, entry)
    assert await market.checker.check(second) == "confirmed"
    record = market.trust.get(miner.miner_id)
    assert record.confirmed_failures == 1 and "pooled" in record.last_failure
    assert record.pools == {}  # punished: the statistics start again


async def test_scorers_that_do_not_answer_are_skipped(market: Market, entry: CatalogEntry) -> None:
    miner = await market.miner()
    await market.miner(silent)
    finished = await market.settled_job(miner, entry)
    assert await market.checker.check(finished) == "skipped"
    assert market.trust.get(miner.miner_id).checks_run == 0


async def test_submit_checks_a_new_identity_and_wait_idle_returns(
    market: Market, entry: CatalogEntry
) -> None:
    miner = await market.miner()
    await market.miner()
    async with market.checker.running():
        market.checker.submit(await market.settled_job(miner, entry))
        async with asyncio.timeout(5):
            await market.checker.wait_idle()
    assert market.trust.get(miner.miner_id).checks_passed == 1


# --- the policy -----------------------------------------------------------------------------


def test_check_rate_is_full_in_probation_then_decays_to_the_floor() -> None:
    config = VerificationConfig(probation_checks=10, floor=0.02)
    assert [check_rate(n, config) for n in (0, 9)] == [1.0, 1.0]
    assert check_rate(10, config) == pytest.approx(0.1)
    assert check_rate(20, config) == pytest.approx(0.05)
    assert check_rate(10_000, config) == 0.02


def test_selection_is_keyed_and_close_to_the_rate() -> None:
    key, other = b"k" * 32, b"o" * 32
    picks = [selected(key, job_id=f"job-{i}", output_sha256=b"x", rate=0.1) for i in range(5000)]
    assert 400 < sum(picks) < 600
    other_picks = [
        selected(other, job_id=f"job-{i}", output_sha256=b"x", rate=0.1) for i in range(5000)
    ]
    assert picks != other_picks  # without the key, a miner cannot predict which are checked
    assert all(selected(key, job_id="j", output_sha256=b"", rate=1.0) for _ in range(3))


def test_config_rejects_nonsense() -> None:
    for bad in ({"floor": 0.0}, {"floor": 1.5}, {"window_s": -1.0}, {"bans_after": 0}):
        with pytest.raises(ValueError):
            VerificationConfig(**bad)  # type: ignore[arg-type]


async def test_a_skipped_stop_is_confirmed_and_named_in_the_record_and_the_notice(
    market: Market, entry: CatalogEntry
) -> None:
    assert entry.verification.stop_margin_limit < 0.8 < entry.verification.margin_limit
    padder = await market.miner()
    await market.miner(skipped_stop)
    await market.miner(skipped_stop)
    finished = await market.settled_job(padder, entry)
    assert await market.checker.check(finished) == "confirmed"
    reason = f"would have stopped at position {SKIPPED_AT} (stop token ahead by 0.8"
    [row] = await recent_checks(market.pool, miner_id=padder.miner_id)
    assert row.outcome == "confirmed" and reason in row.reasons
    assert reason in market.trust.get(padder.miner_id).last_failure
    [notice] = await notices(market, padder)
    assert reason in notice.reason


async def test_scorers_without_stop_margins_judge_as_before_and_a_wrong_count_is_passed_over(
    market: Market, entry: CatalogEntry
) -> None:
    miner = await market.miner()
    await market.miner(stop_margins_of_the_wrong_length)
    finished = await market.settled_job(miner, entry)
    assert await market.checker.check(finished) == "skipped"
    await market.miner(honest)  # sends no stop margins, as scorers did before them
    assert await market.checker.check(finished) == "passed"


async def test_scorers_of_a_private_job_come_from_its_tier_or_there_is_no_check(
    market: Market, entry: CatalogEntry
) -> None:
    miner, retaining, vetted_retaining, vetted_silent = [await market.miner() for _ in range(4)]
    vetted_silent.retains_data = False  # as if its hello declared DATA_RETENTION_NONE
    vetted = {vetted_retaining.miner_id, vetted_silent.miner_id}
    scoring = Scoring(
        registry=market.registry,
        is_banned=lambda miner_id: False,
        timeout_s=0.5,
        is_vetted=vetted.__contains__,
    )
    finished = await market.settled_job(miner, entry)

    def scorers(policy: PrivacyPolicy) -> set[str]:
        eligible = eligibility(policy, is_vetted=vetted.__contains__)
        picked = set()
        for _ in range(40):
            session = scoring.pick(
                entry.name, exclude={miner.miner_id}, avoid_devices=(), eligible=eligible
            )
            if session is not None:
                picked.add(session.miner_id)
        return picked

    assert scorers(PrivacyPolicy()) == {retaining.miner_id} | vetted
    assert scorers(PrivacyPolicy(vetted_only=True)) == vetted
    assert scorers(PrivacyPolicy(vetted_only=True, no_retention=True)) == {vetted_silent.miner_id}
    assert scorers(PrivacyPolicy(no_retention=True)) == {vetted_silent.miner_id}
    # A job of a tier nobody else meets is not shown to anyone outside it: no opinion at all.
    private = dataclasses.replace(finished, privacy=PrivacyPolicy(no_retention=True))
    claim = claim_of(private, vocab_size=entry.tokenizer.vocab_size, context_length=1 << 16)
    opinion = await scoring.opinion(
        private,
        claim,
        entry.verification,
        exclude={miner.miner_id, vetted_silent.miner_id},
        avoid_devices=(),
    )
    assert opinion is None
    assert all(
        message.WhichOneof("body") != "score"
        for session in (retaining, vetted_retaining)
        for message in market.received[session.miner_id]
    )
