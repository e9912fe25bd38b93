"""Choosing the miner for a job.

Today: the least loaded miner (fewest jobs per slot), ties broken at random so load spreads.
Speed, trust and price come into the choice when miners are measured and spot-checked.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence

from coordinator.gateway.session import MinerSession


class Router:
    """Picks a miner among candidates."""

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(
        self, candidates: Sequence[MinerSession], *, exclude: Collection[str] = ()
    ) -> MinerSession | None:
        eligible = [s for s in candidates if s.miner_id not in exclude and s.free_slots > 0]
        if not eligible:
            return None
        least = min(s.active_jobs / s.max_concurrency for s in eligible)
        best = [s for s in eligible if s.active_jobs / s.max_concurrency == least]
        return self._rng.choice(best)
