"""The coordinator's exceptions. HTTP status codes are assigned only in ``coordinator.http``.

CoordinatorError
├── RequestError                   the buyer's request cannot be served as asked (4xx)
│   ├── AuthenticationError        missing, unknown or revoked API key (401)
│   ├── InvalidRequestError        malformed body or parameter (400)
│   │   └── ContextLengthError     prompt (+ max_tokens) longer than the model's context (400)
│   ├── ModelNotFoundError         no such model in the catalog (404)
│   └── InsufficientCreditsError   the balance does not cover the request's maximum cost (402)
├── NoMinerAvailableError          no connected miner can take the job now (503, Retry-After)
└── UpstreamError                  the miner failed after tokens were streamed (SSE error event)
"""

from __future__ import annotations


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


class InsufficientCreditsError(RequestError):
    """The buyer's balance does not cover the request's maximum cost."""


class NoMinerAvailableError(CoordinatorError):
    """No connected miner can take the job now; the buyer may retry after ``retry_after`` s."""

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamError(CoordinatorError):
    """The miner failed after tokens had been streamed; delivered tokens are billed."""
