"""The marketplace as the HTTP layer sees it: authenticate, price, dispatch.

Each request's money (limits, admission, the durable hold, settlement, refunds) is one
``coordinator.request_saga.RequestSaga``, entered around the dispatch and the stream.

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
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from decimal import Decimal

from coordinator.api import (
    Buyer,
    CompletionRequest,
    ModelCard,
    ProviderPreferences,
    Readiness,
)
from coordinator.billing.admission import CreditGuard
from coordinator.billing.job_log import JobLog
from coordinator.billing.keys import KeyStore
from coordinator.billing.limits import RateLimits, SpendGuard
from coordinator.billing.receipts import CreditedJob
from coordinator.catalog import Catalog, CatalogEntry, request_cost
from coordinator.completion import RunningCompletion
from coordinator.dispatch.dispatcher import Dispatcher
from coordinator.dispatch.privacy import eligibility, nobody_vetted
from coordinator.dispatch.registry import MinerRegistry
from coordinator.errors import (
    ContextLengthError,
    InsufficientCreditsError,
    InvalidRequestError,
    NoMatchingEndpointError,
    NoMinerAvailableError,
)
from coordinator.jobs import Job, Sampling
from coordinator.ops.metrics import CoordinatorMetrics
from coordinator.request_saga import (
    BillingConfig,
    RequestSaga,
    SagaParts,
    TimedCompletion,
    buyer_account,
)
from coordinator.text.tokenization import ChatTemplateError
from coordinator.verification.scoring import FinishedJob
from ledger.interface import AccountRef, Ledger
from ledger.money import format_credits

logger = logging.getLogger(__name__)

_MAX_SEED = 2**63 - 1
# Tokenizing costs about 1 us per byte: beyond this a prompt goes to a thread, so one huge
# request cannot stall every other stream on the event loop; below it the hop costs more.
_INLINE_TOKENIZE_CHARS = 64 * 1024


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
        limits: RateLimits | None = None,
        on_finished: Callable[[FinishedJob], None] | None = None,
        is_vetted: Callable[[str], bool] = nobody_vetted,
        hold_first: bool = False,
        replica_id: str = "",
    ) -> None:
        """``on_credit`` hears of every settlement that credited a miner, once it committed.
        ``on_finished`` hears of every settled job with a verified receipt (the spot checker).
        ``is_vetted`` tells the miners an operator vetted (``coordinator.dispatch.privacy``), for
        requests that only vetted miners may see.

        ``metrics`` receives latencies and billed tokens; without it they go to a private set.
        ``limits`` enforces requests and tokens per minute per key; None: no rate limits.
        Spend limits (set per key in the key store) are always enforced. ``hold_first`` places
        each request's durable hold before dispatching it (replicas: ``SagaParts.hold_first``);
        ``replica_id`` tags its holds and spend reservations with this replica.
        """
        self._catalog = catalog
        self._keys = keys
        self._registry = registry
        self._dispatcher = dispatcher
        self._metrics = metrics if metrics is not None else CoordinatorMetrics()
        self._is_vetted = is_vetted
        self._credit = CreditGuard(ledger.balance)
        self._saga_parts = SagaParts(
            billing=billing,
            ledger=ledger,
            credit=self._credit,
            spend=SpendGuard(job_log=job_log, replica_id=replica_id),
            limits=limits,
            job_log=job_log,
            metrics=self._metrics,
            on_credit=on_credit,
            on_finished=on_finished,
            hold_first=hold_first,
            replica_id=replica_id,
        )

    async def settled(self) -> None:
        """Waits for the settlements still running (shutdown: before the lease ends)."""
        while self._saga_parts.settling:
            await asyncio.gather(*self._saga_parts.settling, return_exceptions=True)

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
        privacy = request.provider.privacy
        eligible = eligibility(privacy, is_vetted=self._is_vetted)
        if not self._dispatcher.has_miners(entry.name, eligible=eligible):
            if not privacy.restricted or not self._dispatcher.has_miners(entry.name):
                raise NoMinerAvailableError(f"no miner is serving model '{entry.name}' right now")
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
        job = Job(
            job_id=f"job-{uuid.uuid4().hex}",
            model=entry.name,
            prompt_token_ids=tuple(prompt_ids),
            sampling=Sampling(
                temperature=request.temperature,
                top_p=request.top_p,
                max_tokens=max_tokens,
                seed=request.seed if request.seed is not None else secrets.randbelow(_MAX_SEED),
                stop_token_ids=entry.tokenizer.stop_token_ids,
                top_logprobs=request.top_logprobs,
            ),
        )
        async with RequestSaga(
            self._saga_parts,
            buyer=buyer,
            entry=entry,
            job=job,
            max_cost=max_cost,
            privacy=privacy,
        ) as saga:
            run = await self._dispatcher.start(
                job,
                sort=request.provider.sort,
                allow_fallbacks=request.provider.allow_fallbacks,
                eligible=eligible,
            )
            completion = TimedCompletion(
                completion_id=f"cmpl-{job.job_id.removeprefix('job-')}",
                created=int(time.time()),
                entry=entry,
                prompt_tokens=len(prompt_ids),
                run=run,
                stop=request.stop,
                logprobs=request.logprobs,
            )
            completion.timer = timer
            saga.attach(completion)
            yield completion

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
