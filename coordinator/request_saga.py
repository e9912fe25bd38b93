"""One request's money, from admission to settlement: the saga the service runs per request.

Entering a :class:`RequestSaga` admits the request, each step undone if a later one refuses:

1. the key's rate limits reserve its tokens (prompt plus ``max_tokens``);
2. the key's spend limit admits its maximum cost;
3. the in-memory credit estimate admits it (``coordinator.billing.admission``); or, for
   replicas (``SagaParts.hold_first``), the durable hold of the maximum cost is placed now, since
   one process's estimate cannot see the holds of the others (2 to 3 ms more to the first token
   alone; under load the hold waits for a ledger batch: tens of ms at 64 in flight, see
   docs/benchmarks.md, "Replicas").

The service then dispatches the job and hands the running completion to
:meth:`RequestSaga.attach`: once its first delta reached the buyer, the completion places the
durable hold, which commits while the job runs. Leaving the saga (always, shielded: a buyer
who disconnects cancels the request, never its settlement) awaits the hold; settles what was
delivered (the miner's credit, the operator's fee) or releases it; records the job; tells the
receipts and the spot checker; and gives back what the limits and the estimate reserved. A
request that found no miner, or delivered nothing, wrote nothing to the ledger.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from types import TracebackType

import asyncpg

from coordinator.api import Buyer, TextDelta
from coordinator.billing.admission import Admission, CreditGuard, CreditsShortError
from coordinator.billing.job_log import JobLog, JobRecord
from coordinator.billing.limits import RateLimits, Reservation, SpendGuard, SpendHold
from coordinator.billing.receipts import CreditedJob
from coordinator.catalog import CatalogEntry
from coordinator.completion import RunningCompletion
from coordinator.dispatch.privacy import PrivacyPolicy
from coordinator.errors import InsufficientCreditsError, StorageUnavailableError
from coordinator.jobs import Job
from coordinator.ops.metrics import CoordinatorMetrics, RequestTimer
from coordinator.verification.scoring import FinishedJob
from ledger.interface import (
    AccountKind,
    AccountRef,
    Hold,
    InsufficientFundsError,
    Ledger,
    Settlement,
)
from ledger.money import format_credits

logger = logging.getLogger(__name__)


def buyer_account(buyer: Buyer) -> AccountRef:
    return AccountRef(AccountKind.BUYER, buyer.key_id)


def miner_account(miner_id: str) -> AccountRef:
    return AccountRef(AccountKind.MINER, miner_id)


@dataclass(frozen=True)
class BillingConfig:
    fee_bps: int = 500  # operator's share of every charge in basis points (500 = 5%), rounded down


@dataclass(frozen=True)
class SagaParts:
    """What every request's saga works with: the marketplace's collaborators, built once."""

    billing: BillingConfig  # the operator's fee
    ledger: Ledger  # holds, settlements, releases
    credit: CreditGuard  # the in-memory estimate of what each buyer can still commit
    spend: SpendGuard  # per-key spend limits
    limits: RateLimits | None  # per-key requests and tokens per minute; None: no rate limits
    job_log: JobLog  # one row per job
    metrics: CoordinatorMetrics  # billed tokens
    # Hears of every settlement that credited a miner, once it committed (the receipts).
    on_credit: Callable[[CreditedJob], None] | None
    # Hears of every settled job with a verified receipt (the spot checker).
    on_finished: Callable[[FinishedJob], None] | None
    # Place the durable hold before dispatching (replicas: each process's credit estimate
    # misses the holds of the others, so only the ledger's own check is exact across them).
    hold_first: bool = False
    # This replica's id: its holds carry it, so a sweep of a dead replica releases only its own.
    replica_id: str = ""
    # Settlements still running (shielded from the buyer's disconnect): shutdown waits for them
    # before the replica's lease, which releases its open holds, ends.
    settling: set[asyncio.Task[None]] = field(default_factory=set)


class TimedCompletion(RunningCompletion):
    """A :class:`RunningCompletion` whose deltas are timed as they are handed to the buyer."""

    timer: RequestTimer  # set by the service right after construction
    _timed: AsyncGenerator[TextDelta, None] | None = None

    def __aiter__(self) -> AsyncIterator[TextDelta]:
        if self._timed is None:
            self._timed = self.timer.timed(super().__aiter__())
        return self._timed

    async def aclose(self) -> None:
        if self._timed is not None:
            await self._timed.aclose()
        await super().aclose()


class RequestSaga:
    """One request's hold, stream, settlement and refund (see the module docstring)."""

    def __init__(
        self,
        parts: SagaParts,
        *,
        buyer: Buyer,
        entry: CatalogEntry,
        job: Job,
        max_cost: int,
        privacy: PrivacyPolicy,
    ) -> None:
        """``max_cost``: what the job may cost at most (its prompt and ``max_tokens``);
        ``privacy``: the buyer's tier, which binds the spot check's scorers as it bound the
        miner."""
        self._parts = parts
        self._buyer = buyer
        self._entry = entry
        self._job = job
        self._max_cost = max_cost
        self._privacy = privacy
        self._reservation: Reservation | None = None
        self._spend: SpendHold | None = None
        self._admission: Admission | None = None  # None for a free model: nothing to hold
        self._early_hold: Hold | None = None  # placed on entry with ``hold_first``
        self._completion: TimedCompletion | None = None

    async def __aenter__(self) -> RequestSaga:
        try:
            return await self._enter()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            logger.warning("request of key %s: the database failed: %r", self._buyer.key_id, error)
            raise StorageUnavailableError(
                "the marketplace's database cannot be reached right now; nothing was charged"
            ) from error

    async def _enter(self) -> RequestSaga:
        parts, job = self._parts, self._job
        if parts.limits is not None:
            tokens = len(job.prompt_token_ids) + job.sampling.max_tokens
            self._reservation = await parts.limits.check(self._buyer.key_id, tokens=tokens)
        try:
            self._spend = await parts.spend.admit(
                self._buyer, self._max_cost, job_id=self._job.job_id
            )
            if parts.hold_first:
                self._early_hold = await self._hold_now()
            else:
                self._admission = await self._admit()
        except BaseException:
            await asyncio.shield(self._release_limits())
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # Shielded: a buyer who disconnects cancels the request, never the settlement.
        settling = asyncio.ensure_future(self._finish())
        self._parts.settling.add(settling)
        settling.add_done_callback(self._parts.settling.discard)
        await asyncio.shield(settling)

    def attach(self, completion: TimedCompletion) -> None:
        """The job's running completion: it places the hold once its first delta is delivered
        (so the commit's work never delays the first token) and reports the rate limits."""
        self._completion = completion
        if self._early_hold is not None:
            held: asyncio.Future[Hold | None] = asyncio.get_running_loop().create_future()
            held.set_result(self._early_hold)
            completion.hold = held
        elif not self._parts.hold_first:
            completion.place_hold = self._start_hold
        if self._reservation is not None:
            completion.rate_limits = self._reservation.states

    async def _admit(self) -> Admission | None:
        if self._max_cost == 0:
            return None
        try:
            return await self._parts.credit.admit(buyer_account(self._buyer), self._max_cost)
        except CreditsShortError as error:
            raise self._insufficient(available=error.available) from None

    async def _hold_now(self) -> Hold | None:
        """The durable hold of the request's maximum cost, placed before it is dispatched."""
        if self._max_cost == 0:
            return None
        try:
            return await self._parts.ledger.hold(
                buyer_account(self._buyer),
                self._max_cost,
                reference=hashlib.sha256(self._job.job_id.encode()).digest(),
                holder=self._parts.replica_id,
            )
        except InsufficientFundsError as error:
            raise self._insufficient(available=error.available) from None

    def _start_hold(self) -> asyncio.Future[Hold | None]:
        """The durable hold, committing while the job runs; settlement waits for it."""
        if self._admission is None:
            done: asyncio.Future[Hold | None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        return asyncio.ensure_future(self._hold(self._admission))

    async def _hold(self, admission: Admission) -> Hold:
        try:
            hold = await self._parts.ledger.hold(
                admission.account,
                admission.amount,
                reference=hashlib.sha256(self._job.job_id.encode()).digest(),
                holder=self._parts.replica_id,
            )
        except InsufficientFundsError as error:
            # Only this process places holds, so the estimate was wrong: a bug, not a race.
            logger.warning("job %s: the hold was refused after admission", self._job.job_id)
            raise self._insufficient(available=error.available) from None
        self._parts.credit.held(admission)
        return hold

    def _insufficient(self, *, available: int) -> InsufficientCreditsError:
        job = self._job
        return InsufficientCreditsError(
            f"insufficient credits: this request may cost up to {format_credits(self._max_cost)} "
            f"({len(job.prompt_token_ids)} prompt tokens, up to {job.sampling.max_tokens} "
            f"completion tokens); the balance is {format_credits(max(available, 0))}"
        )

    async def _finish(self) -> None:
        completion, admission, credit = self._completion, self._admission, self._parts.credit
        # None: no miner took the job, or nothing was delivered, so nothing was held or is owed.
        pending_hold = completion.hold if completion is not None else None
        hold: Hold | None = self._early_hold  # released below if nothing was delivered
        hold_failed = False
        charged: int | None = None
        try:
            if pending_hold is not None and hold is None:
                try:
                    hold = await pending_hold
                except Exception as error:
                    hold_failed = True
                    logger.warning(
                        "request of key %s: no hold, nothing billed: %s", self._buyer.key_id, error
                    )
                    if completion is not None:
                        completion.unbillable = True
            if admission is not None and hold is not None:
                credit.settling(admission)
            charged = await self._settle(hold)
        finally:
            if admission is not None and pending_hold is None:
                credit.cancel(admission)
            elif admission is not None:
                # A hold the ledger could not close still holds its amount: read afresh.
                settled = not hold_failed and charged is not None
                credit.finished(admission, charged=charged or 0, held=settled)
            await self._release_limits()

    async def _settle(self, hold: Hold | None) -> int | None:
        """Closes the hold and logs the job; returns what was charged, None when the ledger
        could not close the hold."""
        parts, completion = self._parts, self._completion
        if completion is not None:
            await completion.aclose()
            completion.timer.finished()
        cost = completion.cost() if completion is not None else 0
        charged: int | None = None
        try:
            if hold is None:
                charged = 0
            elif cost == 0:
                await parts.ledger.release(hold)
                charged = 0
            elif completion is not None:
                settlement = await self._credit_miner(hold, completion, cost)
                charged = cost
                self._announce(hold, completion, settlement)
            if completion is not None:
                await parts.job_log.record(JobRecord.of(self._buyer, completion, cost=cost))
        except Exception:
            # The hold stays open and visible to the auditor; never lose it silently.
            logger.exception("settling job for key %s failed", self._buyer.key_id)
        return charged

    async def _credit_miner(self, hold: Hold, completion: TimedCompletion, cost: int) -> Settlement:
        """Settles ``cost`` of the hold: the miner's credit and the operator's fee."""
        fee = cost * self._parts.billing.fee_bps // 10_000
        verified = completion.verified
        reference = (
            verified.receipt_sha256
            if verified is not None
            else hashlib.sha256(completion.run.job.job_id.encode()).digest()
        )
        miner = miner_account(completion.run.worker.miner_id)
        return await self._parts.ledger.settle(
            hold, miner=miner, miner_credit=cost - fee, fee=fee, reference=reference
        )

    def _announce(self, hold: Hold, completion: TimedCompletion, settlement: Settlement) -> None:
        """Tells who listens of a settled job: metrics, the receipts, the spot checker."""
        parts, verified = self._parts, completion.verified
        miner_id = completion.run.worker.miner_id
        parts.metrics.billed(self._entry.name, completion.usage)
        if parts.on_credit is not None and settlement.miner_credit > 0:
            parts.on_credit(CreditedJob(completion.run.job.job_id, miner_id, settlement.hold_id))
        if parts.on_finished is not None and verified is not None:
            parts.on_finished(
                FinishedJob(
                    job=completion.run.job,
                    miner_id=miner_id,
                    device_name=completion.run.worker.device_name,
                    buyer=hold.buyer,
                    token_ids=tuple(completion.received_ids),
                    logprobs=tuple(completion.received_logprobs),
                    finish_reason=verified.miner_finish_reason,
                    output_sha256=verified.receipt.output_sha256,
                    miner_credit=settlement.miner_credit,
                    fee=settlement.fee,
                    top_logprobs=tuple(completion.received_top_logprobs),
                    privacy=self._privacy,
                )
            )

    async def _release_limits(self) -> None:
        """After settling: rate limits keep the tokens used; a request never started costs none."""
        parts, completion = self._parts, self._completion
        if self._reservation is not None and parts.limits is not None:
            if completion is None:
                await parts.limits.cancel(self._reservation)
            else:
                await parts.limits.record_usage(
                    self._reservation, tokens=completion.usage.total_tokens
                )
        if self._spend is not None:
            await parts.spend.finished(self._spend)
