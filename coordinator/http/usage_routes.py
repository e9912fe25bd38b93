"""A buyer's own usage, authenticated by its API key.

GET /v1/key                          the key's balance, spend, spend limit and totals
GET /v1/usage?limit=N&before=T       its requests, newest first (N <= 100, default 20; T ISO 8601
                                     with an offset, e.g. the previous page's ``next_before``)

Shapes follow OpenRouter's ``GET /api/v1/key`` (``data.usage``, ``data.limit``,
``data.limit_remaining`` in credits) with exact micro-unit fields beside the floats.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from aiohttp import web

from coordinator.api import Buyer
from coordinator.billing.usage import MAX_HISTORY, KeyUsage, UsageEntry
from coordinator.errors import InvalidRequestError
from coordinator.http.app import bearer_key
from ledger.interface import MICRO_PER_CREDIT


class Authenticator(Protocol):
    async def authenticate(self, api_key: str) -> Buyer: ...


class UsageReader(Protocol):
    async def key_usage(self, buyer: Buyer) -> KeyUsage: ...

    async def history(
        self, buyer: Buyer, *, limit: int, before: datetime | None = None
    ) -> list[UsageEntry]: ...


def _credits(micro: int) -> float:
    return micro / MICRO_PER_CREDIT


def _key_body(usage: KeyUsage) -> dict[str, object]:
    limit = usage.spend_limit
    return {
        "data": {
            "key_id": usage.key_id,
            "label": usage.name,
            "usage": _credits(usage.totals.cost),
            "usage_micro": usage.totals.cost,
            "limit": _credits(limit) if limit is not None else None,
            "limit_remaining": _credits(max(0, limit - usage.totals.cost)) if limit else None,
            "balance": _credits(usage.balance),
            "balance_micro": usage.balance,
            "refunded_micro": usage.refunded,
            "requests": usage.totals.requests,
            "prompt_tokens": usage.totals.prompt_tokens,
            "completion_tokens": usage.totals.completion_tokens,
        }
    }


def _entry_body(entry: UsageEntry) -> dict[str, object]:
    job = entry.job
    return {
        "id": "cmpl-" + job.job_id.removeprefix("job-"),
        "model": job.model,
        "created": int(job.created_at.timestamp()),
        "finish_reason": job.finish_reason,
        "usage": {
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": job.completion_tokens,
            "total_tokens": job.prompt_tokens + job.completion_tokens,
        },
        "cost": _credits(job.cost),
        "cost_micro": job.cost,
        "refunded_micro": entry.refunded,
    }


def add_usage_routes(app: web.Application, *, auth: Authenticator, usage: UsageReader) -> None:
    async def authenticate(request: web.Request) -> Buyer:
        return await auth.authenticate(bearer_key(request))

    async def key(request: web.Request) -> web.Response:
        buyer = await authenticate(request)
        return web.json_response(_key_body(await usage.key_usage(buyer)))

    async def history(request: web.Request) -> web.Response:
        buyer = await authenticate(request)
        limit = _limit(request.query.get("limit"))
        before = _before(request.query.get("before"))
        entries = await usage.history(buyer, limit=limit + 1, before=before)
        page, more = entries[:limit], len(entries) > limit
        body = {
            "object": "list",
            "data": [_entry_body(entry) for entry in page],
            "has_more": more,
            "next_before": page[-1].job.created_at.isoformat() if more and page else None,
        }
        return web.json_response(body)

    app.router.add_get("/v1/key", key)
    app.router.add_get("/v1/usage", history)


def _limit(text: str | None) -> int:
    if text is None:
        return 20
    if not text.isdigit() or not 1 <= int(text) <= MAX_HISTORY:
        raise InvalidRequestError(
            f"limit must be an integer from 1 to {MAX_HISTORY}", param="limit"
        )
    return int(text)


def _before(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidRequestError(
            "before must be an ISO 8601 time with a UTC offset, e.g. the next_before of a page",
            param="before",
        ) from None
    if moment.tzinfo is None:
        raise InvalidRequestError("before must include a UTC offset", param="before")
    return moment
