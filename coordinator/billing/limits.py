"""Per-key limits: requests and tokens per minute, and a spend limit in credits.

Rates are token buckets, one pair per key, held in process (one coordinator serves a ledger, so
there is nobody to share them with). A bucket holds a minute's allowance and refills evenly, so
a key may burst its whole minute at once and then gets ``limit / 60`` per second. A request
reserves ``prompt + max_tokens`` tokens on admission; :meth:`RateLimiter.record_usage` gives
back what it did not use, and :meth:`RateLimiter.cancel` gives everything back to a request that
never reached a miner. A request larger than a whole minute's tokens is admitted once the bucket
is full and leaves it in debt, rather than being refused forever.

A key's buckets are full again a minute after its last request, so the limiter forgets it then
(and, past ``max_keys``, forgets the least recently seen key early): memory stays bounded.

The spend limit is checked against what the ledger-backed job log says the key spent plus what
its requests in flight hold, under one lock, so concurrent requests cannot overshoot it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.api import Buyer
from coordinator.billing.job_log import JobLog
from coordinator.errors import LimitKind, RateLimitedError, RateLimitState, SpendLimitError
from ledger.money import format_credits

logger = logging.getLogger(__name__)

_WINDOW_S = 60.0


@dataclass(frozen=True)
class LimitsConfig:
    requests_per_minute: int = 600  # per API key; 0 = unlimited
    tokens_per_minute: int = 1_000_000  # prompt + max_tokens per API key; 0 = unlimited
    max_keys: int = 100_000  # keys tracked at once; beyond it the least recently seen is forgotten


@dataclass
class _Buckets:
    requests: float  # allowance left now; refills at requests_per_minute / 60 per second
    tokens: float  # may go negative after a request larger than a minute's allowance
    updated: float  # clock reading of the last refill


@dataclass
class Reservation:
    """What one admitted request took from its key's buckets."""

    key_id: str  # the API key
    tokens: int  # tokens taken so far; corrected once by record_usage
    states: dict[LimitKind, RateLimitState]  # the key's limits right after admission
    settled: bool = False  # record_usage or cancel ran


class RateLimiter:
    """Requests and tokens per minute per key. Not thread-safe: use it from one event loop."""

    def __init__(
        self, config: LimitsConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._config = config
        self._clock = clock
        self._keys: OrderedDict[str, _Buckets] = OrderedDict()  # least recently seen first

    def __len__(self) -> int:
        """Keys tracked now."""
        return len(self._keys)

    def check(self, key_id: str, *, tokens: int) -> Reservation:
        """Admits one request of up to ``tokens`` tokens or raises :class:`RateLimitedError`."""
        now = self._clock()
        self._forget_idle(now)
        buckets = self._refilled(key_id, now)
        rpm, tpm = self._config.requests_per_minute, self._config.tokens_per_minute
        if rpm and buckets.requests < 1:
            self._refuse(buckets, "requests", missing=1 - buckets.requests)
        if tpm and buckets.tokens < min(tokens, tpm):
            self._refuse(buckets, "tokens", missing=min(tokens, tpm) - buckets.tokens)
        if rpm:
            buckets.requests -= 1
        if tpm:
            buckets.tokens -= tokens
        return Reservation(key_id, tokens, self._states(buckets))

    def record_usage(self, reservation: Reservation, *, tokens: int) -> None:
        """Corrects the reservation to the tokens the request really used (prompt + output)."""
        if not reservation.settled:
            reservation.settled = True
            self._give_back(reservation.key_id, tokens=reservation.tokens - tokens, requests=0)

    def cancel(self, reservation: Reservation) -> None:
        """Gives everything back: the request was refused or never reached a miner."""
        if not reservation.settled:
            reservation.settled = True
            self._give_back(reservation.key_id, tokens=reservation.tokens, requests=1)

    def _give_back(self, key_id: str, *, tokens: int, requests: int) -> None:
        buckets = self._keys.get(key_id)
        if buckets is None:
            return  # forgotten: its buckets count as full already
        self._refill(buckets, self._clock())
        rpm, tpm = self._config.requests_per_minute, self._config.tokens_per_minute
        if rpm:
            buckets.requests = min(float(rpm), buckets.requests + requests)
        if tpm:
            buckets.tokens = min(float(tpm), buckets.tokens + tokens)

    def _refilled(self, key_id: str, now: float) -> _Buckets:
        buckets = self._keys.pop(key_id, None)
        if buckets is None:
            buckets = _Buckets(
                float(self._config.requests_per_minute), float(self._config.tokens_per_minute), now
            )
            if len(self._keys) >= max(1, self._config.max_keys):
                self._keys.popitem(last=False)
        self._keys[key_id] = buckets  # now the most recently seen
        self._refill(buckets, now)
        return buckets

    def _refill(self, buckets: _Buckets, now: float) -> None:
        elapsed = max(0.0, now - buckets.updated)
        rpm, tpm = self._config.requests_per_minute, self._config.tokens_per_minute
        buckets.requests = min(float(rpm), buckets.requests + elapsed * rpm / _WINDOW_S)
        buckets.tokens = min(float(tpm), buckets.tokens + elapsed * tpm / _WINDOW_S)
        buckets.updated = now

    def _forget_idle(self, now: float) -> None:
        # A minute without a request refills any bucket: forgetting the key changes nothing.
        while self._keys:
            oldest = next(iter(self._keys.values()))
            if now - oldest.updated < _WINDOW_S:
                break
            self._keys.popitem(last=False)

    def _states(self, buckets: _Buckets) -> dict[LimitKind, RateLimitState]:
        states: dict[LimitKind, RateLimitState] = {}
        rows: tuple[tuple[LimitKind, int, float], ...] = (
            ("requests", self._config.requests_per_minute, buckets.requests),
            ("tokens", self._config.tokens_per_minute, buckets.tokens),
        )
        for kind, limit, level in rows:
            if limit:
                states[kind] = RateLimitState(
                    limit=limit,
                    remaining=max(0, math.floor(level)),
                    reset_s=(limit - level) * _WINDOW_S / limit,
                )
        return states

    def _refuse(self, buckets: _Buckets, kind: LimitKind, *, missing: float) -> None:
        limit = (
            self._config.requests_per_minute
            if kind == "requests"
            else self._config.tokens_per_minute
        )
        retry_after_s = missing * _WINDOW_S / limit
        raise RateLimitedError(
            f"rate limit reached: {limit} {kind} per minute for this API key; "
            f"try again in {retry_after_s:.3g} s",
            retry_after_s=retry_after_s,
            limit_kind=kind,
            states=self._states(buckets),
        )


@dataclass
class SpendHold:
    """The maximum cost of one admitted request, counted against its key's spend limit."""

    key_id: str  # the API key
    amount: int  # micro-units


class SpendGuard:
    """Refuses a request whose maximum cost could take its key past the key's spend limit.

    Spent is the job log's total for the key; held is what its admitted, unfinished requests may
    still cost. One lock covers reading both and admitting, and :meth:`finished` takes the same
    lock after the job was logged, so a settlement is counted at least once, never zero times.
    """

    def __init__(self, *, job_log: JobLog) -> None:
        self._job_log = job_log
        self._lock = asyncio.Lock()
        self._in_flight: dict[str, int] = {}  # key id -> micro-units held by admitted requests

    async def admit(self, buyer: Buyer, amount: int) -> SpendHold | None:
        """Counts ``amount`` against the key's spend limit, or raises :class:`SpendLimitError`.

        None when the key has no spend limit (or the request is free): nothing to track. The
        limit is the one ``buyer`` carries from authentication, so a key without one costs no
        query (the key store forgets a cached key as soon as its limit changes).
        """
        if amount == 0:
            return None
        key_id, limit = buyer.key_id, buyer.spend_limit
        if limit is None:
            return None
        async with self._lock:
            spent = await self._job_log.spent(key_id)
            held = self._in_flight.get(key_id, 0)
            if spent + held + amount > limit:
                raise SpendLimitError(
                    f"spend limit reached: this request may cost up to {format_credits(amount)}; "
                    f"the key's limit is {format_credits(limit)}, with {format_credits(spent)} "
                    f"spent and {format_credits(held)} held by requests in flight"
                )
            self._in_flight[key_id] = held + amount
            return SpendHold(key_id, amount)

    async def finished(self, hold: SpendHold) -> None:
        """The request is over and its cost, if any, is in the job log."""
        async with self._lock:
            left = self._in_flight.get(hold.key_id, 0) - hold.amount
            if left > 0:
                self._in_flight[hold.key_id] = left
            else:
                self._in_flight.pop(hold.key_id, None)
