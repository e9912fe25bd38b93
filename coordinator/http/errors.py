"""How failures look to a buyer: an HTTP status and an OpenAI-shaped error body.

This is the only place that assigns HTTP status codes to :mod:`coordinator.errors`. The body is
always ``{"error": {"message", "type", "code", "param"}}`` so every OpenAI client can read it;
the same body travels as an SSE event when a stream fails after it started.

Limits answer 429 as OpenAI does: a rate limit with ``Retry-After`` and OpenAI's
``x-ratelimit-*`` headers (clients back off and retry); a spend limit with type
``insufficient_quota``, code ``spend_limit_exceeded``, no ``Retry-After`` and
``x-should-retry: false`` (waiting does not help; the operator must raise the limit).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from aiohttp import web

from coordinator.errors import (
    AuthenticationError,
    ContextLengthError,
    CoordinatorError,
    InsufficientCreditsError,
    InvalidRequestError,
    LimitKind,
    ModelNotFoundError,
    NoMatchingEndpointError,
    NoMinerAvailableError,
    RateLimitedError,
    RateLimitState,
    RequestError,
    SpendLimitError,
    StorageUnavailableError,
    UpstreamError,
)

INVALID_REQUEST = "invalid_request_error"


@dataclass(frozen=True)
class HttpError:
    """One failure as the buyer sees it."""

    status: int  # HTTP status code
    message: str  # for humans; never a traceback or an internal detail
    type: str  # OpenAI's error category
    code: str | None = None  # machine-readable reason, when there is one
    param: str | None = None  # the request field at fault, when there is one
    headers: Mapping[str, str] = field(default_factory=dict)  # e.g. Retry-After

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "code": self.code,
                "param": self.param,
            }
        }

    def response(self) -> web.Response:
        return web.json_response(
            self.body(), status=self.status, headers=dict(self.headers), dumps=compact_json
        )


def compact_json(value: object) -> str:
    """JSON as sent on the wire: no spaces, non-ASCII kept as is (UTF-8 on the wire)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def http_error_for(exc: CoordinatorError) -> HttpError:
    """Maps a coordinator exception to what the buyer sees; subclasses before their bases."""
    message = str(exc) or type(exc).__name__
    if isinstance(exc, AuthenticationError):
        return HttpError(401, message, "authentication_error", code="invalid_api_key")
    if isinstance(exc, ContextLengthError):
        return HttpError(
            400, message, INVALID_REQUEST, code="context_length_exceeded", param=exc.param
        )
    if isinstance(exc, InvalidRequestError):
        return HttpError(400, message, INVALID_REQUEST, param=exc.param)
    if isinstance(exc, NoMatchingEndpointError):
        return HttpError(
            404, message, INVALID_REQUEST, code="no_endpoints_found", param="provider.max_price"
        )
    if isinstance(exc, ModelNotFoundError):
        return HttpError(404, message, INVALID_REQUEST, code="model_not_found", param="model")
    if isinstance(exc, InsufficientCreditsError):
        return HttpError(402, message, "insufficient_credits", code="insufficient_credits")
    if isinstance(exc, RateLimitedError):
        return HttpError(
            429, message, "rate_limit_exceeded", code="rate_limit_exceeded", headers=_rate(exc)
        )
    if isinstance(exc, SpendLimitError):
        return HttpError(
            429,
            message,
            "insufficient_quota",
            code="spend_limit_exceeded",
            headers={"x-should-retry": "false"},
        )
    if isinstance(exc, RequestError):
        return HttpError(400, message, INVALID_REQUEST)
    if isinstance(exc, NoMinerAvailableError):
        return HttpError(
            503,
            message,
            "service_unavailable",
            code="no_miner_available",
            headers={"Retry-After": str(exc.retry_after)},
        )
    if isinstance(exc, StorageUnavailableError):
        return HttpError(
            503,
            message,
            "service_unavailable",
            code="storage_unavailable",
            headers={"Retry-After": str(exc.retry_after)},
        )
    if isinstance(exc, UpstreamError):
        return HttpError(502, message, "upstream_error", code="upstream_error")
    return HttpError(500, message, "server_error")


def _rate(exc: RateLimitedError) -> dict[str, str]:
    headers = {
        "Retry-After": str(max(1, math.ceil(exc.retry_after_s))),
        "retry-after-ms": str(max(1, math.ceil(exc.retry_after_s * 1000))),
    }
    return {**headers, **rate_limit_headers(exc.states)}


def rate_limit_headers(states: Mapping[LimitKind, RateLimitState]) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` headers."""
    headers: dict[str, str] = {}
    for kind, state in states.items():
        headers[f"x-ratelimit-limit-{kind}"] = str(state.limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(state.remaining)
        headers[f"x-ratelimit-reset-{kind}"] = duration(state.reset_s)
    return headers


def duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1.5s", "6m0s"."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 10) / 10:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


def internal_error(request_id: str) -> HttpError:
    """An unexpected failure: a generic message and the id to quote; details stay in the log."""
    return HttpError(
        500,
        f"The server had an error while processing your request. Request id: {request_id}",
        "server_error",
        code="internal_error",
    )


def http_error_for_status(
    exc: web.HTTPException, *, method: str, path: str, max_body_bytes: int
) -> HttpError:
    """aiohttp's own refusals (unknown route, wrong method, body too large) as OpenAI errors."""
    if isinstance(exc, web.HTTPNotFound):
        return HttpError(404, f"Invalid URL ({method} {path})", INVALID_REQUEST, code="not_found")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allow = exc.headers.get("Allow")
        return HttpError(
            405,
            f"Method {method} is not allowed for {path}",
            INVALID_REQUEST,
            code="method_not_allowed",
            headers={"Allow": allow} if allow else {},
        )
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return HttpError(
            413,
            f"The request body is larger than {max_body_bytes} bytes",
            INVALID_REQUEST,
            code="request_too_large",
        )
    kind = INVALID_REQUEST if exc.status < 500 else "server_error"
    return HttpError(exc.status, exc.reason, kind)
