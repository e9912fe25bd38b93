"""The coordinator's exceptions. HTTP status codes are assigned only in ``coordinator.http``.

CoordinatorError
├── RequestError                   the buyer's request cannot be served as asked (4xx)
│   ├── AuthenticationError        missing, unknown or revoked API key (401)
│   ├── InvalidRequestError        malformed body or parameter (400)
│   │   └── ContextLengthError     prompt (+ max_tokens) longer than the model's context (400)
│   ├── ModelNotFoundError         no such model in the catalog (404)
│   │   └── NoMatchingEndpointError  the model exists, but no miner meets provider.max_price (404)
│   ├── InsufficientCreditsError   the balance does not cover the request's maximum cost (402)
│   ├── RateLimitedError           the key's requests or tokens per minute are spent (429)
│   └── SpendLimitError            the request could push the key past its spend limit (429)
├── NoMinerAvailableError          no connected miner can take the job now (503, Retry-After)
├── StorageUnavailableError        PostgreSQL cannot be reached now; nothing charged (503)
├── UpstreamError                  the miner failed after tokens were streamed (SSE error event)
│   └── MinerMisbehaved            its result contradicts its stream: unpaid (completion.py)
│
│   Raised and handled inside the coordinator (never reach a buyer as such):
├── CreditsShortError              the credit estimate cannot cover a request (billing/admission.py)
├── ScorerLost                     a miner asked to score a job went away (worker.py)
├── ClientGone                     the buyer disconnected before its answer (http/disconnect.py)
│
│   Startup and operator errors (one line on stderr, no traceback):
├── CatalogError                   an invalid --model spec, catalog file or field (catalog.py)
├── TokenizerError                 a model's tokenizer files or template (text/tokenization.py)
│   ├── TokenizerLoadError         a file is missing or invalid
│   └── ChatTemplateError          no chat template, or it rejected the messages
└── UsageError                     a bad command-line value, exit status 2 (cli.py)

CatalogError and TokenizerError are also ValueErrors, as they were before this tree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

LimitKind = Literal["requests", "tokens"]


class CoordinatorError(Exception):
    """Root of everything the coordinator raises on purpose."""


class RequestError(CoordinatorError):
    """The buyer's request cannot be served as asked."""


class AuthenticationError(RequestError):
    """Missing, unknown or revoked API key."""


class InvalidRequestError(RequestError):
    """Malformed body or parameter. ``param`` names the offending field when there is one."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidRequestError):
    """The prompt (plus the requested completion) does not fit the model's context."""


class ModelNotFoundError(RequestError):
    """No model of that name in the catalog."""


class NoMatchingEndpointError(ModelNotFoundError):
    """The buyer's ``provider`` preferences (``max_price``) exclude every miner of the model."""


class InsufficientCreditsError(RequestError):
    """The buyer's balance does not cover the request's maximum cost."""


@dataclass(frozen=True)
class RateLimitState:
    """One per-minute limit of one key, as it stood when a request was admitted or refused."""

    limit: int  # per minute
    remaining: int  # what the key may still use now
    reset_s: float  # seconds until the limit is back to full


class RateLimitedError(RequestError):
    """The key used up a per-minute limit; ``retry_after_s`` says when this request would pass.

    ``states`` holds every limit in force (requests, tokens) for the x-ratelimit-* headers;
    ``limit_kind`` names the one that refused.
    """

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float,
        limit_kind: LimitKind,
        states: Mapping[LimitKind, RateLimitState],
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.limit_kind = limit_kind
        self.states = dict(states)

    @property
    def limit(self) -> int:
        return self.states[self.limit_kind].limit

    @property
    def remaining(self) -> int:
        return self.states[self.limit_kind].remaining

    @property
    def reset_s(self) -> float:
        return self.states[self.limit_kind].reset_s


class SpendLimitError(RequestError):
    """Spent plus held plus this request's maximum cost would exceed the key's spend limit."""


class NoMinerAvailableError(CoordinatorError):
    """No connected miner can take the job now; the buyer may retry after ``retry_after`` s."""

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StorageUnavailableError(CoordinatorError):
    """The database cannot be reached now, so the request cannot be admitted; nothing was held
    or charged. The buyer may retry after ``retry_after`` seconds."""

    retry_after = 5


class UpstreamError(CoordinatorError):
    """The miner failed after tokens had been streamed; delivered tokens are billed."""
