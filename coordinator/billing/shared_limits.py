"""Rate limits that replicas of the coordinator share: the token buckets in PostgreSQL.

The same buckets as ``coordinator.billing.limits.RateLimiter`` (a minute's allowance, refilled
evenly, tokens reserved on admission and corrected after), one row per key in an UNLOGGED
table, refilled by elapsed database time (``clock_timestamp()``, one clock for every replica).
Each check, correction or cancel is one statement: a call of ``coordinator_rate_take``, which
locks the key's row, refills it and takes (or gives back) atomically, and returns the levels
the x-ratelimit-* headers are made of. Losing a bucket update is harmless (a key gets a little
more than its minute, once), so the table is unlogged and the function commits without waiting
for the disk (``synchronous_commit`` off for its transaction); a crash of PostgreSQL empties
the table, which is every bucket full.

A key's buckets are full again a minute after its last request, so :meth:`SharedRateLimits.running`
deletes rows idle for a minute: the table holds the keys active in the last minute or so. Every
replica must run with the same limits: each passes its own with every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import asyncpg

from coordinator.billing.limits import LimitsConfig, Reservation, limit_states, refusal

logger = logging.getLogger(__name__)

_WINDOW_S = 60.0

_SCHEMA = """
CREATE UNLOGGED TABLE IF NOT EXISTS coordinator_rate_buckets (
    key_id     text PRIMARY KEY,
    requests   double precision NOT NULL,  -- what is left of the minute's requests
    tokens     double precision NOT NULL,  -- may be negative after a request over a minute's
    updated_at timestamptz NOT NULL        -- when the levels above were refilled to
);

-- Refills key p_key's buckets to now (limits p_rpm, p_tpm per minute; 0 = unlimited), then:
-- p_admit: takes p_requests and p_tokens if one request and min(p_tokens, p_tpm) tokens are
-- there (else takes nothing and names the limit in refused); not p_admit: gives them back.
-- Returns the levels after (before, when refused), as RateLimiter has them.
CREATE OR REPLACE FUNCTION coordinator_rate_take(
    p_key text, p_requests float8, p_tokens float8, p_rpm float8, p_tpm float8, p_admit boolean,
    OUT refused text, OUT requests_left float8, OUT tokens_left float8
) LANGUAGE plpgsql AS $$
DECLARE
    at timestamptz := clock_timestamp();
    elapsed float8;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    SELECT b.requests, b.tokens, greatest(0, extract(epoch FROM at - b.updated_at))
        INTO requests_left, tokens_left, elapsed
        FROM coordinator_rate_buckets AS b WHERE b.key_id = p_key FOR UPDATE;
    IF NOT FOUND THEN
        IF NOT p_admit THEN  -- forgotten after a minute idle: full already
            requests_left := p_rpm;
            tokens_left := p_tpm;
            RETURN;
        END IF;
        INSERT INTO coordinator_rate_buckets (key_id, requests, tokens, updated_at)
            VALUES (p_key, p_rpm, p_tpm, at) ON CONFLICT (key_id) DO NOTHING;
        -- ours, or the one another replica made meanwhile
        SELECT b.requests, b.tokens, greatest(0, extract(epoch FROM at - b.updated_at))
            INTO requests_left, tokens_left, elapsed
            FROM coordinator_rate_buckets AS b WHERE b.key_id = p_key FOR UPDATE;
    END IF;
    requests_left := least(p_rpm, requests_left + elapsed * p_rpm / 60);
    tokens_left := least(p_tpm, tokens_left + elapsed * p_tpm / 60);
    IF NOT p_admit THEN
        requests_left := least(p_rpm, requests_left + p_requests);
        tokens_left := least(p_tpm, tokens_left + p_tokens);
    ELSIF p_rpm > 0 AND requests_left < 1 THEN
        refused := 'requests';
    ELSIF p_tpm > 0 AND tokens_left < least(p_tokens, p_tpm) THEN
        refused := 'tokens';
    ELSE
        requests_left := requests_left - p_requests;
        tokens_left := tokens_left - p_tokens;
    END IF;
    UPDATE coordinator_rate_buckets AS b
        SET requests = requests_left, tokens = tokens_left,
            updated_at = greatest(b.updated_at, at)
        WHERE b.key_id = p_key;
END
$$;
"""

# pg_advisory_xact_lock key serialising the schema: CREATE OR REPLACE FUNCTION of replicas
# starting together would otherwise collide ("mmratelm").
_SCHEMA_LOCK_KEY = 0x6D6D726174656C6D

_TAKE = (
    "SELECT refused, requests_left, tokens_left FROM coordinator_rate_take($1, $2, $3, $4, $5, $6)"
)


class SharedRateLimits:
    """:class:`coordinator.billing.limits.RateLimits` in PostgreSQL (module docstring). Use
    ``await SharedRateLimits.create(pool, config)``, and run :meth:`running` to expire rows."""

    def __init__(self, pool: asyncpg.Pool[asyncpg.Record], config: LimitsConfig) -> None:
        self._pool = pool
        self._config = config

    @classmethod
    async def create(
        cls, pool: asyncpg.Pool[asyncpg.Record], config: LimitsConfig
    ) -> SharedRateLimits:
        """Creates the table and its function (or brings the function up to date)."""
        async with pool.acquire() as connection, connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK_KEY)
            await connection.execute(_SCHEMA)
        return cls(pool, config)

    async def check(self, key_id: str, *, tokens: int) -> Reservation:
        config = self._config
        rpm, tpm = config.requests_per_minute, config.tokens_per_minute
        if not rpm and not tpm:
            return Reservation(key_id, tokens, {})  # unlimited: no query
        refused, requests, left = await self._take(
            key_id, requests=1 if rpm else 0, tokens=tokens if tpm else 0, admit=True
        )
        if refused is not None:
            error = refusal(config, requests=requests, tokens=left, wanted=tokens)
            assert error is not None and error.limit_kind == refused, (refused, requests, left)
            raise error
        return Reservation(key_id, tokens, limit_states(config, requests=requests, tokens=left))

    async def record_usage(self, reservation: Reservation, *, tokens: int) -> None:
        if not reservation.settled:
            reservation.settled = True
            unused = reservation.tokens - tokens
            if self._config.tokens_per_minute and unused:
                await self._take(reservation.key_id, requests=0, tokens=unused, admit=False)

    async def cancel(self, reservation: Reservation) -> None:
        if not reservation.settled:
            reservation.settled = True
            rpm, tpm = self._config.requests_per_minute, self._config.tokens_per_minute
            if rpm or tpm:
                await self._take(
                    reservation.key_id,
                    requests=1 if rpm else 0,
                    tokens=reservation.tokens if tpm else 0,
                    admit=False,
                )

    async def _take(
        self, key_id: str, *, requests: int, tokens: int, admit: bool
    ) -> tuple[str | None, float, float]:
        row = await self._pool.fetchrow(
            _TAKE,
            key_id,
            float(requests),
            float(tokens),
            float(self._config.requests_per_minute),
            float(self._config.tokens_per_minute),
            admit,
        )
        assert row is not None
        return row["refused"], row["requests_left"], row["tokens_left"]

    async def expire(self) -> int:
        """Deletes the buckets of keys idle for a minute (full again); returns how many."""
        deleted: int = await self._pool.fetchval(
            "WITH gone AS (DELETE FROM coordinator_rate_buckets"
            " WHERE updated_at < clock_timestamp() - make_interval(secs => $1) RETURNING 1)"
            " SELECT count(*) FROM gone",
            _WINDOW_S,
        )
        return deleted

    @contextlib.asynccontextmanager
    async def running(self, *, interval_s: float = _WINDOW_S) -> AsyncIterator[None]:
        """Expires idle keys every ``interval_s`` while the block runs."""
        task = asyncio.create_task(self._expire_forever(interval_s), name="rate-limit-expiry")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _expire_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.expire()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                logger.warning("could not expire idle rate-limit buckets: %s", error)
