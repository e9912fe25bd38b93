"""Who may see a buyer's prompt: a request's privacy tier, and the miners an operator vetted.

A buyer narrows the miners that see its prompt with OpenRouter's ``provider`` object:

- ``data_collection: "deny"``: only miners whose hello declares they retain nothing
  (``DATA_RETENTION_NONE``; a miner that declares nothing counts as retaining);
- ``trust: "vetted"`` (ours): only miners the operator marked vetted
  (``meshmint-coordinator miners vet MINER_ID``).

The tier binds everyone who sees the prompt: the miner that generates and the miners that
re-score the job for a spot check. When no connected miner of the model meets it, the request
fails closed (503, never charged) rather than going to a miner outside it.

Vetting lives in PostgreSQL (``coordinator_vetted_miners``), so every process agrees on it.
:class:`VettedMiners` keeps the set in memory while :meth:`VettedMiners.watching` runs: it is
reloaded on each ``pg_notify('meshmint_vetted', miner_id)`` that ``vet``/``unvet`` send
(whichever process runs them) and every ``refresh_s`` as a backstop. Until the first load, and
after a reload that failed, it is empty: a vetted-only request then finds no miner, it never
finds one whose vetting was taken back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg

from coordinator.pg_listener import follow

if TYPE_CHECKING:
    from coordinator.worker import Worker

logger = logging.getLogger(__name__)

CHANNEL = "meshmint_vetted"
"""Where vetting changes are announced; the payload is the miner id."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS coordinator_vetted_miners (
    miner_id   text PRIMARY KEY,
    vetted_at  timestamptz NOT NULL DEFAULT now()
);
"""


@dataclass(frozen=True)
class PrivacyPolicy:
    """The miners a request's prompt may reach."""

    vetted_only: bool = False  # provider.trust == "vetted"
    no_retention: bool = False  # provider.data_collection == "deny"

    @property
    def restricted(self) -> bool:
        """Whether the policy excludes any miner at all."""
        return self.vetted_only or self.no_retention

    def admits(self, *, vetted: bool, retains_data: bool) -> bool:
        """Whether a miner that is (or is not) vetted and declares it retains (or not) may see
        the prompt."""
        return (vetted or not self.vetted_only) and not (retains_data and self.no_retention)

    def describe(self) -> str:
        """The tier in words, for an error message."""
        parts = []
        if self.vetted_only:
            parts.append("vetted by the operator (provider.trust: vetted)")
        if self.no_retention:
            parts.append("declaring no data retention (provider.data_collection: deny)")
        return " and ".join(parts) or "any"


Eligible = Callable[["Worker"], bool]
"""Whether a connected miner may see a given request's prompt."""


def anyone(worker: Worker) -> bool:
    """The eligibility of an unrestricted request."""
    return True


def nobody_vetted(miner_id: str) -> bool:
    """The vetting of a coordinator without a vetted-miner store: none is vetted."""
    return False


def eligibility(policy: PrivacyPolicy, *, is_vetted: Callable[[str], bool]) -> Eligible:
    """Whether a connected miner meets ``policy``, judged when asked (vetting may change)."""
    if not policy.restricted:
        return anyone

    def eligible(worker: Worker) -> bool:
        return policy.admits(vetted=is_vetted(worker.miner_id), retains_data=worker.retains_data)

    return eligible


class VettedMiners:
    """The miners the operator vetted, stored in PostgreSQL and mirrored in memory."""

    def __init__(self, pool: asyncpg.Pool, *, refresh_s: float = 5.0) -> None:
        self._pool = pool
        self._refresh_s = refresh_s  # backstop reload period while watching
        self._ids: frozenset[str] = frozenset()

    @classmethod
    async def create(cls, pool: asyncpg.Pool, *, refresh_s: float = 5.0) -> VettedMiners:
        async with pool.acquire() as connection:
            await connection.execute(_SCHEMA)
        return cls(pool, refresh_s=refresh_s)

    def is_vetted(self, miner_id: str) -> bool:
        """From memory: whether ``miner_id`` was vetted at the last load."""
        return miner_id in self._ids

    async def vet(self, miner_id: str) -> bool:
        """Marks ``miner_id`` vetted; False when it already was."""
        row = await self._pool.fetchrow(
            "INSERT INTO coordinator_vetted_miners (miner_id) VALUES ($1) "
            f"ON CONFLICT DO NOTHING RETURNING pg_notify('{CHANNEL}', miner_id)",
            miner_id,
        )
        return row is not None

    async def unvet(self, miner_id: str) -> bool:
        """Takes ``miner_id``'s vetting away; False when it was not vetted."""
        row = await self._pool.fetchrow(
            "DELETE FROM coordinator_vetted_miners WHERE miner_id = $1 "
            f"RETURNING pg_notify('{CHANNEL}', miner_id)",
            miner_id,
        )
        return row is not None

    async def load(self) -> frozenset[str]:
        """Reads the vetted set from the database into memory and returns it."""
        rows = await self._pool.fetch("SELECT miner_id FROM coordinator_vetted_miners")
        self._ids = frozenset(row["miner_id"] for row in rows)
        return self._ids

    @asynccontextmanager
    async def watching(self) -> AsyncIterator[None]:
        """Keeps the in-memory set current while the context runs (see the module docstring)."""
        await self.load()
        task = asyncio.create_task(
            follow(
                self._pool,
                channel=CHANNEL,
                reload=lambda _: self.load(),  # any change: the whole (small) set again
                refresh_s=self._refresh_s,
                what="vetting changes",
                on_reload_failure=self._reload_failed,
            ),
            name="meshmint-vetted-watcher",
        )
        try:
            yield
        finally:
            task.cancel()
            await asyncio.wait([task])

    def _reload_failed(self, error: Exception) -> None:
        # An unvetting this process cannot see must not be ignored: until a reload succeeds
        # nobody counts as vetted (vetted-only requests get a 503). Fail closed, whatever broke.
        self._ids = frozenset()
        logger.warning("cannot reload the vetted miners (%r); treating none as vetted", error)
