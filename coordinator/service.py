"""The marketplace as the HTTP layer sees it: authenticate, price, hold, dispatch, settle.

Billing rules (docs/architecture.md, "Billing"):
- cost = ceil((prompt_tokens x input price + completion_tokens x output price) / 1e6) micro-units,
  prices in micro-units per million tokens, rounded up once per request;
- a request holds its maximum cost (prompt plus max_tokens), so concurrent requests can never
  spend more than the balance; it is admitted against an in-memory estimate of the balance and
  the durable hold is placed once the first delta was delivered and commits while the job runs
  (``coordinator.billing.admission``), so the commit is not in the time to first token and a request
  that delivered nothing writes nothing to the ledger; a hold that fails ends the stream;
- only delivered completion tokens are billed; a request that delivered none costs nothing;
- a completion cut at a stop string is billed through the token that completed the stop string;
- the operator's fee is floor(cost x fee_bps / 10000); the miner is credited the rest;
- per-key rate and spend limits are checked before the hold; a refused request costs nothing.

Routing preferences (OpenRouter's ``provider`` object): ``sort`` and ``allow_fallbacks`` go to the
dispatcher. ``max_price`` is checked against the catalog before anything is held: every miner of a
model sells at its catalog price, so a cap below it matches no miner and the request is refused
the way OpenRouter refuses a request no endpoint matches: NoMatchingEndpointError (404), message
"No endpoints found matching your max price ...".
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import secrets
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal

from coordinator.api import (
    Buyer,
    CompletionRequest,
    ModelCard,
    ProviderPreferences,
    Readiness,
    TextDelta,
)
from coordinator.billing.admission import Admission, CreditGuard, CreditsShortError
from coordinator.billing.job_log import JobLog, JobRecord
from coordinator.billing.keys import KeyStore
from coordinator.billing.limits import RateLimiter, Reservation, SpendGuard, SpendHold
from coordinator.billing.receipts import CreditedJob
from coordinator.catalog import Catalog, CatalogEntry, request_cost
from coordinator.completion import RunningCompletion
from coordinator.dispatch.dispatcher import Dispatcher
from coordinator.dispatch.privacy import PrivacyPolicy, eligibility, nobody_vetted
from coordinator.dispatch.registry import MinerRegistry
from coordinator.errors import (
    ContextLengthError,
    InsufficientCreditsError,
    InvalidRequestError,
    NoMatchingEndpointError,
    NoMinerAvailableError,
)
from coordinator.ops.metrics import CoordinatorMetrics, RequestTimer
from coordinator.text.tokenization import ChatTemplateError
from coordinator.verification.scoring import FinishedJob
from ledger.interface import AccountKind, AccountRef, Hold, InsufficientFundsError, Ledger
from ledger.money import format_credits
from proto import miner_pb2

logger = logging.getLogger(__name__)

_MAX_SEED = 2**63 - 1
# Tokenizing costs about 1 us per byte: beyond this a prompt goes to a thread, so one huge
# request cannot stall every other stream on the event loop; below it the hop costs more.
_INLINE_TOKENIZE_CHARS = 64 * 1024


@dataclass(frozen=True)
class BillingConfig:
    fee_bps: int = 500  # operator's share of every charge in basis points (500 = 5%), rounded down


def _prompt_chars(request: CompletionRequest) -> int:
    if request.messages is not None:
        return sum(len(message.content) for message in request.messages)
    return len(request.prompt or "")


def _check_max_price(entry: CatalogEntry, provider: ProviderPreferences) -> None:
    """Refuses a request whose ``provider.max_price`` is below the model's catalog price."""
    too_dear = provider.over_max_price(
        prompt=Decimal(entry.input_price_per_mtok).scaleb(-6),
        completion=Decimal(entry.output_price_per_mtok).scaleb(-6),
    )
    if too_dear:
        raise NoMatchingEndpointError(
            f"No endpoints found matching your max price for model '{entry.name}' "
            f"(credits per million tokens: {'; '.join(too_dear)})"
        )


def _insufficient(amount: int, job: miner_pb2.Job, *, available: int) -> InsufficientCreditsError:
    return InsufficientCreditsError(
        f"insufficient credits: this request may cost up to {format_credits(amount)} "
        f"({len(job.prompt_token_ids)} prompt tokens, up to {job.sampling.max_tokens} "
        f"completion tokens); the balance is {format_credits(max(available, 0))}"
    )


def buyer_account(buyer: Buyer) -> AccountRef:
    return AccountRef(AccountKind.BUYER, buyer.key_id)


def miner_account(miner_id: str) -> AccountRef:
    return AccountRef(AccountKind.MINER, miner_id)


class _TimedCompletion(RunningCompletion):
    """A :class:`RunningCompletion` whose deltas are timed as they are handed to the buyer."""

    timer: RequestTimer  # set by the service right after construction
    privacy: PrivacyPolicy = PrivacyPolicy()  # the buyer's tier: binds the spot check's scorers
    _timed: AsyncGenerator[TextDelta, None] | None = None

    def __aiter__(self) -> AsyncIterator[TextDelta]:
        if self._timed is None:
            self._timed = self.timer.timed(super().__aiter__())
        return self._timed

    async def aclose(self) -> None:
        if self._timed is not None:
            await self._timed.aclose()
        await super().aclose()


class MarketplaceService:
    """Implements :class:`coordinator.api.InferenceService`."""

    def __init__(
        self,
        billing: BillingConfig,
        *,
        catalog: Catalog,
        keys: KeyStore,
        ledger: Ledger,
        registry: MinerRegistry,
        dispatcher: Dispatcher,
        job_log: JobLog,
        on_credit: Callable[[CreditedJob], None] | None = None,
        metrics: CoordinatorMetrics | None = None,
        limits: RateLimiter | None = None,
        on_finished: Callable[[FinishedJob], None] | None = None,
        is_vetted: Callable[[str], bool] = nobody_vetted,
    ) -> None:
        """``on_credit`` hears of every settlement that credited a miner, once it committed.
        ``on_finished`` hears of every settled job with a verified receipt (the spot checker).
        ``is_vetted`` tells the miners an operator vetted (``coordinator.dispatch.privacy``), for
        requests that only vetted miners may see.

        ``metrics`` receives latencies and billed tokens; without it they go to a private set.
        ``limits`` enforces requests and tokens per minute per key; None: no rate limits.
        Spend limits (set per key in the key store) are always enforced.
        """
        self._billing = billing
        self._catalog = catalog
        self._keys = keys
        self._ledger = ledger
        self._registry = registry
        self._dispatcher = dispatcher
        self._job_log = job_log
        self._on_credit = on_credit
        self._metrics = metrics if metrics is not None else CoordinatorMetrics()
        self._limits = limits
        self._on_finished = on_finished
        self._is_vetted = is_vetted
        self._spend = SpendGuard(job_log=job_log)
        self._credit = CreditGuard(ledger.balance)

    async def authenticate(self, api_key: str) -> Buyer:
        return await self._keys.authenticate(api_key)

    async def models(self) -> list[ModelCard]:
        return [
            ModelCard(
                name=entry.name,
                context_length=entry.context_length,
                input_price_per_mtok=entry.input_price_per_mtok,
                output_price_per_mtok=entry.output_price_per_mtok,
                miners=len(serving := self._registry.serving(entry.name)),
                vetted_miners=sum(self._is_vetted(session.miner_id) for session in serving),
                created=entry.created,
            )
            for entry in self._catalog.entries()
        ]

    async def readiness(self) -> Readiness:
        serving = {
            session.miner_id
            for name in self._catalog.names()
            for session in self._registry.serving(name)
        }
        return Readiness(ready=bool(serving), miners=len(serving))

    @asynccontextmanager
    async def complete(
        self, buyer: Buyer, request: CompletionRequest
    ) -> AsyncIterator[RunningCompletion]:
        entry = self._catalog.get(request.model)
        _check_max_price(entry, request.provider)
        timer = self._metrics.request(entry.name)
        if _prompt_chars(request) > _INLINE_TOKENIZE_CHARS:
            prompt_ids = await asyncio.to_thread(self._tokenize, entry, request)
        else:
            prompt_ids = self._tokenize(entry, request)
        if not self._dispatcher.has_miners(entry.name):
            raise NoMinerAvailableError(f"no miner is serving model '{entry.name}' right now")
        privacy = request.provider.privacy
        eligible = eligibility(privacy, is_vetted=self._is_vetted)
        if not self._dispatcher.has_miners(entry.name, eligible=eligible):
            # Fail closed: the prompt goes to no miner outside the buyer's tier.
            raise NoMinerAvailableError(
                f"no miner serving model '{entry.name}' right now is {privacy.describe()}; "
                "the request was not sent to any other miner"
            )
        account = buyer_account(buyer)
        max_tokens = request.max_tokens
        if max_tokens is None:
            max_tokens = await self._affordable_tokens(entry, account, len(prompt_ids))
        max_cost = request_cost(entry, prompt_tokens=len(prompt_ids), completion_tokens=max_tokens)
        job = miner_pb2.Job(
            job_id=f"job-{uuid.uuid4().hex}",
            model=entry.name,
            prompt_token_ids=prompt_ids,
            sampling=miner_pb2.SamplingParams(
                temperature=request.temperature,
                top_p=request.top_p,
                max_tokens=max_tokens,
                seed=request.seed if request.seed is not None else secrets.randbelow(_MAX_SEED),
                stop_token_ids=entry.tokenizer.stop_token_ids,
                top_logprobs=request.top_logprobs,
            ),
        )
        reservation = (
            self._limits.check(buyer.key_id, tokens=len(prompt_ids) + max_tokens)
            if self._limits is not None
            else None
        )
        spend: SpendHold | None = None
        try:
            spend = await self._spend.admit(buyer, max_cost)
            admission = await self._admit(account, max_cost, job)
        except BaseException:
            await asyncio.shield(self._release_limits(reservation, spend, None))
            raise
        completion: _TimedCompletion | None = None
        try:
            run = await self._dispatcher.start(
                job,
                sort=request.provider.sort,
                allow_fallbacks=request.provider.allow_fallbacks,
                eligible=eligible,
            )
            completion = _TimedCompletion(
                completion_id=f"cmpl-{job.job_id.removeprefix('job-')}",
                created=int(time.time()),
                entry=entry,
                prompt_tokens=len(prompt_ids),
                run=run,
                stop=request.stop,
                logprobs=request.logprobs,
            )
            completion.timer = timer
            completion.privacy = privacy
            # Placed once the first delta was delivered: a request that found no miner, or
            # delivered nothing, wrote nothing to the ledger, and the commit's work on the event
            # loop never delays the first token.
            completion.place_hold = functools.partial(self._start_hold, admission, job)
            if reservation is not None:
                completion.rate_limits = reservation.states
            yield completion
        finally:
            # Shielded: a buyer who disconnects cancels the request, never the settlement.
            await asyncio.shield(
                self._finish(
                    buyer,
                    admission,
                    entry,
                    completion,
                    reservation=reservation,
                    spend=spend,
                )
            )

    def _tokenize(self, entry: CatalogEntry, request: CompletionRequest) -> list[int]:
        try:
            if request.messages is not None:
                ids = entry.tokenizer.encode_chat(request.messages)
            else:
                ids = entry.tokenizer.encode_prompt(request.prompt or "")
        except ChatTemplateError as error:
            raise InvalidRequestError(str(error), param="messages") from None
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        room = entry.context_length - len(ids)
        if room < 1:
            raise ContextLengthError(
                f"this model's maximum context length is {entry.context_length} tokens; the "
                f"prompt has {len(ids)} tokens",
                param="messages" if request.messages is not None else "prompt",
            )
        if request.max_tokens is not None and request.max_tokens > room:
            raise ContextLengthError(
                f"this model's maximum context length is {entry.context_length} tokens; you "
                f"requested {len(ids) + request.max_tokens} ({len(ids)} in the prompt, "
                f"{request.max_tokens} for the completion)",
                param="max_tokens",
            )
        return ids

    async def _affordable_tokens(
        self, entry: CatalogEntry, account: AccountRef, prompt_tokens: int
    ) -> int:
        """max_tokens when the buyer gave none: what the context and the balance allow."""
        room = entry.context_length - prompt_tokens
        if entry.output_price_per_mtok == 0:
            return room
        balance = await self._credit.available(account)
        budget = balance * 1_000_000 - prompt_tokens * entry.input_price_per_mtok
        affordable = budget // entry.output_price_per_mtok
        if affordable < 1:
            raise InsufficientCreditsError(
                f"insufficient credits: the balance of {format_credits(balance)} does not cover "
                f"the {prompt_tokens}-token prompt and one completion token"
            )
        return min(room, affordable)

    async def _admit(
        self, account: AccountRef, amount: int, job: miner_pb2.Job
    ) -> Admission | None:
        """None for a free model: nothing to hold."""
        if amount == 0:
            return None
        try:
            return await self._credit.admit(account, amount)
        except CreditsShortError as error:
            raise _insufficient(amount, job, available=error.available) from None

    def _start_hold(
        self, admission: Admission | None, job: miner_pb2.Job
    ) -> asyncio.Future[Hold | None]:
        """The durable hold, committing while the job runs; settlement waits for it."""
        if admission is None:
            done: asyncio.Future[Hold | None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        return asyncio.ensure_future(self._hold(admission, job))

    async def _hold(self, admission: Admission, job: miner_pb2.Job) -> Hold:
        try:
            hold = await self._ledger.hold(
                admission.account,
                admission.amount,
                reference=hashlib.sha256(job.job_id.encode()).digest(),
            )
        except InsufficientFundsError as error:
            # Only this process places holds, so the estimate was wrong: a bug, not a race.
            logger.warning("job %s: the hold was refused after admission", job.job_id)
            raise _insufficient(admission.amount, job, available=error.available) from None
        self._credit.held(admission)
        return hold

    async def _release_limits(
        self,
        reservation: Reservation | None,
        spend: SpendHold | None,
        completion: _TimedCompletion | None,
    ) -> None:
        """After settling: rate limits keep the tokens used; a request never started costs none."""
        if reservation is not None and self._limits is not None:
            if completion is None:
                self._limits.cancel(reservation)
            else:
                self._limits.record_usage(reservation, tokens=completion.usage.total_tokens)
        if spend is not None:
            await self._spend.finished(spend)

    async def _finish(
        self,
        buyer: Buyer,
        admission: Admission | None,
        entry: CatalogEntry,
        completion: _TimedCompletion | None,
        *,
        reservation: Reservation | None,
        spend: SpendHold | None,
    ) -> None:
        # None: no miner took the job, or nothing was delivered, so nothing was held or is owed.
        pending_hold = completion.hold if completion is not None else None
        hold: Hold | None = None
        hold_failed = False
        charged: int | None = None
        try:
            if pending_hold is not None:
                try:
                    hold = await pending_hold
                except Exception as error:
                    hold_failed = True
                    logger.warning(
                        "request of key %s: no hold, nothing billed: %s", buyer.key_id, error
                    )
                    if completion is not None:
                        completion.unbillable = True
            if admission is not None and hold is not None:
                self._credit.settling(admission)
            charged = await self._settle(buyer, hold, entry, completion)
        finally:
            if admission is not None and pending_hold is None:
                self._credit.cancel(admission)
            elif admission is not None:
                # A hold the ledger could not close still holds its amount: read afresh.
                settled = not hold_failed and charged is not None
                self._credit.finished(admission, charged=charged or 0, held=settled)
            await self._release_limits(reservation, spend, completion)

    async def _settle(
        self,
        buyer: Buyer,
        hold: Hold | None,
        entry: CatalogEntry,
        completion: _TimedCompletion | None,
    ) -> int | None:
        """Closes the hold and logs the job; returns what was charged, None when the ledger
        could not close the hold."""
        if completion is not None:
            await completion.aclose()
            completion.timer.finished()
        cost = completion.cost() if completion is not None else 0
        charged: int | None = None
        try:
            if hold is None:
                charged = 0
            elif cost == 0:
                await self._ledger.release(hold)
                charged = 0
            elif hold is not None and completion is not None:
                fee = cost * self._billing.fee_bps // 10_000
                reference = (
                    completion.verified.receipt_sha256
                    if completion.verified is not None
                    else hashlib.sha256(completion.run.job.job_id.encode()).digest()
                )
                miner_id = completion.run.session.miner_id
                settlement = await self._ledger.settle(
                    hold,
                    miner=miner_account(miner_id),
                    miner_credit=cost - fee,
                    fee=fee,
                    reference=reference,
                )
                charged = cost
                self._metrics.billed(entry.name, completion.usage)
                if self._on_credit is not None and settlement.miner_credit > 0:
                    self._on_credit(
                        CreditedJob(completion.run.job.job_id, miner_id, settlement.hold_id)
                    )
                verified = completion.verified
                if self._on_finished is not None and verified is not None:
                    session = completion.run.session
                    self._on_finished(
                        FinishedJob(
                            job=completion.run.job,
                            miner_id=miner_id,
                            device_name=session.hello.hardware.device_name,
                            buyer=hold.buyer,
                            token_ids=tuple(completion.received_ids),
                            logprobs=tuple(completion.received_logprobs),
                            finish_reason=verified.miner_finish_reason,
                            output_sha256=verified.receipt.output_sha256,
                            miner_credit=settlement.miner_credit,
                            fee=settlement.fee,
                            top_logprobs=tuple(completion.received_top_logprobs),
                            privacy=completion.privacy,
                        )
                    )
            if completion is not None:
                await self._job_log.record(JobRecord.of(buyer, completion, cost=cost))
        except Exception:
            # The hold stays open and visible to the auditor; never lose it silently.
            logger.exception("settling job for key %s failed", buyer.key_id)
        return charged
