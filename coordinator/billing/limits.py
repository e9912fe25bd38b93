"""Per-key limits: requests and tokens per minute, and a spend limit in credits.

Rates are token buckets, one pair per key. A bucket holds a minute's allowance and refills
evenly, so a key may burst its whole minute at once and then gets ``limit / 60`` per second. A
request reserves ``prompt + max_tokens`` tokens on admission; ``record_usage`` gives back what it
did not use, and ``cancel`` gives everything back to a request that never reached a miner. A
request larger than a whole minute's tokens is admitted once the bucket is full and leaves it in
debt, rather than being refused forever. The saga sees :class:`RateLimits`, implemented twice:

- :class:`LocalRateLimits` (:class:`RateLimiter` in memory): no I/O on the request's path, for a
  coordinator that runs alone. A key's buckets are full again a minute after its last request,
  so the limiter forgets it then (and, past ``max_keys``, forgets the least recently seen key
  early): memory stays bounded.
- ``coordinator.billing.shared_limits.SharedRateLimits``: the same buckets in PostgreSQL, so
  that replicas of the coordinator share each key's allowance (one statement per check).

The spend limit (:class:`SpendGuard`) is checked in PostgreSQL, so that it holds across
replicas: ``coordinator_key_spend`` keeps per key what its logged jobs cost (``spent``, moved
by a trigger of the job log in the transaction that logs them) and what its admitted requests
in flight may still cost (``held``, the sum of its rows in ``coordinator_spend_reservations``).
Admission is one conditional UPDATE (``spent + held + amount <= limit``), so concurrent
requests on any number of replicas cannot take a key past its limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import asyncpg

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


class RateLimits(Protocol):
    """Requests and tokens per minute per key, as the request saga uses them."""

    async def check(self, key_id: str, *, tokens: int) -> Reservation:
        """Admits one request of up to ``tokens`` tokens or raises :class:`RateLimitedError`
        (whose states give the x-ratelimit-* headers, as the reservation's do)."""
        ...

    async def record_usage(self, reservation: Reservation, *, tokens: int) -> None:
        """Corrects the reservation to the tokens the request really used (prompt + output);
        only the first of ``record_usage`` and ``cancel`` counts."""
        ...

    async def cancel(self, reservation: Reservation) -> None:
        """Gives everything back: the request was refused or never reached a miner."""
        ...


def limit_states(
    config: LimitsConfig, *, requests: float, tokens: float
) -> dict[LimitKind, RateLimitState]:
    """The limits in force as the x-ratelimit-* headers give them, for buckets at these levels."""
    states: dict[LimitKind, RateLimitState] = {}
    rows: tuple[tuple[LimitKind, int, float], ...] = (
        ("requests", config.requests_per_minute, requests),
        ("tokens", config.tokens_per_minute, tokens),
    )
    for kind, limit, level in rows:
        if limit:
            states[kind] = RateLimitState(
                limit=limit,
                remaining=max(0, math.floor(level)),
                reset_s=(limit - level) * _WINDOW_S / limit,
            )
    return states


def refusal(
    config: LimitsConfig, *, requests: float, tokens: float, wanted: int
) -> RateLimitedError | None:
    """Why a request of ``wanted`` tokens does not fit buckets at these levels; None if it does.

    One request must fit the requests bucket, and ``wanted`` tokens (at most a minute's worth)
    the tokens bucket."""
    rpm, tpm = config.requests_per_minute, config.tokens_per_minute
    kind: LimitKind
    if rpm and requests < 1:
        kind, limit, missing = "requests", rpm, 1 - requests
    elif tpm and tokens < min(wanted, tpm):
        kind, limit, missing = "tokens", tpm, min(wanted, tpm) - tokens
    else:
        return None
    retry_after_s = missing * _WINDOW_S / limit
    return RateLimitedError(
        f"rate limit reached: {limit} {kind} per minute for this API key; "
        f"try again in {retry_after_s:.3g} s",
        retry_after_s=retry_after_s,
        limit_kind=kind,
        states=limit_states(config, requests=requests, tokens=tokens),
    )


class RateLimiter:
    """Requests and tokens per minute per key, in memory (synchronous; :class:`LocalRateLimits`
    is its :class:`RateLimits`). Not thread-safe: use it from one event loop."""

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
        refused = refusal(
            self._config, requests=buckets.requests, tokens=buckets.tokens, wanted=tokens
        )
        if refused is not None:
            raise refused
        rpm, tpm = self._config.requests_per_minute, self._config.tokens_per_minute
        if rpm:
            buckets.requests -= 1
        if tpm:
            buckets.tokens -= tokens
        return Reservation(
            key_id,
            tokens,
            limit_states(self._config, requests=buckets.requests, tokens=buckets.tokens),
        )

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


class LocalRateLimits:
    """:class:`RateLimits` of a coordinator that runs alone: a :class:`RateLimiter`, no I/O."""

    def __init__(
        self, config: LimitsConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limiter = RateLimiter(config, clock=clock)

    async def check(self, key_id: str, *, tokens: int) -> Reservation:
        return self.limiter.check(key_id, tokens=tokens)

    async def record_usage(self, reservation: Reservation, *, tokens: int) -> None:
        self.limiter.record_usage(reservation, tokens=tokens)

    async def cancel(self, reservation: Reservation) -> None:
        self.limiter.cancel(reservation)


@dataclass(frozen=True)
class SpendHold:
    """The maximum cost of one admitted request, counted against its key's spend limit."""

    key_id: str  # the API key
    amount: int  # micro-units
    reservation_id: int  # its row in coordinator_spend_reservations


# Admits ``$2`` micro-units for key ``$1`` under limit ``$3`` for replica ``$4`` and job ``$5``
# (or NULL): ``held`` grows only where the sum fits (the row lock makes concurrent admissions
# wait, then re-check), and the reservation is written in the same statement. Also returns the
# key's row as it was before (for a refusal's message), or NULLs when the key has none yet.
_ADMIT = """
WITH taken AS (
    UPDATE coordinator_key_spend SET held = held + $2
    WHERE key_id = $1 AND spent + held + $2 <= $3
    RETURNING key_id
), reserved AS (
    INSERT INTO coordinator_spend_reservations (key_id, replica_id, job_id, amount)
    SELECT key_id, $4, $5, $2 FROM taken
    RETURNING reservation_id
)
SELECT (SELECT reservation_id FROM reserved) AS reservation_id, s.spent, s.held
FROM (VALUES (1)) AS one LEFT JOIN coordinator_key_spend AS s ON s.key_id = $1
"""

# A key's first spend check: its row, spent being what the job log says. A job logged meanwhile
# either is in that sum or finds the row and adds itself (coordinator/billing/job_log.py).
_FIRST_USE = """
INSERT INTO coordinator_key_spend (key_id, spent)
SELECT $1, COALESCE(sum(cost), 0) FROM coordinator_jobs WHERE key_id = $1
ON CONFLICT (key_id) DO NOTHING
"""

# Drops a reservation and what it held, once: a reservation already gone (its job was logged,
# or a sweep dropped it after its replica was declared dead) changes nothing.
_FINISHED = """
WITH dropped AS (
    DELETE FROM coordinator_spend_reservations WHERE reservation_id = $1
    RETURNING key_id, amount
)
UPDATE coordinator_key_spend AS s SET held = s.held - d.amount
FROM dropped AS d WHERE s.key_id = d.key_id
"""

# Every reservation of replica $1, and what they held; returns how many.
_DROP_REPLICA = """
WITH dropped AS (
    DELETE FROM coordinator_spend_reservations WHERE replica_id = $1
    RETURNING key_id, amount
), per_key AS (
    SELECT key_id, sum(amount)::bigint AS amount, count(*) AS n FROM dropped GROUP BY key_id
), eased AS (
    UPDATE coordinator_key_spend AS s SET held = s.held - p.amount
    FROM per_key AS p WHERE s.key_id = p.key_id
)
SELECT COALESCE(sum(n), 0)::bigint FROM per_key
"""


class SpendGuard:
    """Refuses a request whose maximum cost could take its key past the key's spend limit.

    Spent is what the job log charged the key; held is what its admitted, unfinished requests
    (on every replica) may still cost. Both are one row per key in PostgreSQL, admitted against
    with a conditional UPDATE, so no number of concurrent requests, on any number of replicas,
    can take ``spent + held`` past the limit. A request admitted with its ``job_id`` has its
    reservation taken out of ``held`` by the insert that logs its job and adds its cost to
    ``spent`` (a trigger, ``coordinator.billing.job_log``): the amount moves once, atomically.
    :meth:`finished` then drops whatever is left: the reservation of a request whose job was
    never logged (no miner took it), or of one admitted without a job id (whose logged cost
    then counts twice, held and spent, until :meth:`finished`: conservative, never zero times).

    ``replica_id`` tags the reservations (``coordinator.replicas``): a replica that dies leaves
    them behind, and the sweep that cleans up after it drops them
    (:func:`drop_spend_reservations`). '' for a coordinator that runs alone without a lease:
    then it must drop ``''``'s reservations itself at startup. The tables are created by
    :meth:`JobLog.create`.
    """

    def __init__(self, *, job_log: JobLog, replica_id: str = "") -> None:
        self._pool = job_log.pool
        self._replica_id = replica_id

    async def admit(
        self, buyer: Buyer, amount: int, *, job_id: str | None = None
    ) -> SpendHold | None:
        """Counts ``amount`` against the key's spend limit, or raises :class:`SpendLimitError`.

        None when the key has no spend limit (or the request is free): nothing to track. The
        limit is the one ``buyer`` carries from authentication, so a key without one costs no
        query (the key store forgets a cached key as soon as its limit changes). Otherwise one
        statement (two more on the key's first check). ``job_id``: the job whose logging
        settles this reservation (see the class docstring).
        """
        if amount == 0:
            return None
        key_id, limit = buyer.key_id, buyer.spend_limit
        if limit is None:
            return None
        # Shielded: a request cancelled while its reservation commits must not leave it behind.
        admitting = asyncio.ensure_future(self._admit(key_id, amount, limit, job_id))
        try:
            return await asyncio.shield(admitting)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                hold = await admitting
                await self.finished(hold)
            raise

    async def _admit(self, key_id: str, amount: int, limit: int, job_id: str | None) -> SpendHold:
        arguments = (key_id, amount, limit, self._replica_id, job_id)
        row = await self._pool.fetchrow(_ADMIT, *arguments)
        assert row is not None
        if row["spent"] is None:  # the key's first check
            await self._pool.execute(_FIRST_USE, key_id)
            row = await self._pool.fetchrow(_ADMIT, *arguments)
            assert row is not None
        if row["reservation_id"] is None:
            spent, held = row["spent"], row["held"]
            raise SpendLimitError(
                f"spend limit reached: this request may cost up to {format_credits(amount)}; "
                f"the key's limit is {format_credits(limit)}, with {format_credits(spent)} "
                f"spent and {format_credits(held)} held by requests in flight"
            )
        return SpendHold(key_id, amount, row["reservation_id"])

    async def finished(self, hold: SpendHold) -> None:
        """The request is over, and its job, if any, logged: what it still holds goes."""
        await self._pool.execute(_FINISHED, hold.reservation_id)


async def drop_spend_reservations(pool: asyncpg.Pool[asyncpg.Record], replica_id: str) -> int:
    """Drops every spend reservation of replica ``replica_id`` (gone: its requests died with
    it), and what they held, atomically; returns how many. A cleanup of
    ``coordinator.replicas.lease.ReplicaLease``; idempotent."""
    try:
        dropped = await pool.fetchval(_DROP_REPLICA, replica_id)
    except asyncpg.UndefinedTableError:
        return 0  # no job log was ever created in this database: nothing was reserved
    if dropped:
        logger.warning("dropped %d spend reservations of replica %s", dropped, replica_id)
    return int(dropped)
