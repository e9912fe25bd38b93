"""Choosing the miner for a job: free capacity, measured speed and spot-check trust.

Every candidate (a miner of the model with a free slot, not tried yet for this job, trust above
zero) gets a score, and one is drawn at random with probability proportional to it:

    default:             score = trust x near x (free_share x speed) ** SHARPNESS
    sort="latency":      score = trust x near x ttft_rel ** SORT_SHARPNESS
    sort="throughput":   score = trust x near x rate_rel ** SORT_SHARPNESS
    sort="price":        the default (below)

- ``free_share`` = free slots / slots: load spreads by the share of each miner's capacity in
  use, so a big miner takes more jobs than a small one.
- ``ttft_rel`` = the best time to first token among the candidates / this miner's, and
  ``rate_rel`` = this miner's decode tokens/s / the best; both in (0, 1], from the moving
  averages of :mod:`coordinator.dispatch.speed`. ``speed`` = sqrt(ttft_rel x rate_rel). A
  miner not yet measured counts as the best candidate (an optimistic prior): new miners get
  jobs, and so get measured.
- ``trust`` in [0, 1] comes from spot checks (:func:`trust_from_record`); 0 (banned) is never
  chosen. It scales a miner's share linearly, not sharply: spot checks, not routing, are the
  defence against cheats, and a miner whose last check failed must still get the jobs that
  clear or condemn it (every one of them is checked, and refunded if it fails).
- SHARPNESS = 4 makes clear differences decisive and near-equal miners share: an idle miner
  against one with half its slots busy wins 16 to 1; two miners within 5% split about 55/45.
  A miner half as fast (in both figures) gets about 1/16 of the other's share while both are
  idle, which keeps its figures fresh; once the fast one fills up, free capacity takes over.
- A ``sort`` asks for the best by one figure regardless of load (any free slot will do), but
  still at random among near-equal ones (SORT_SHARPNESS = 16: within 5%, about 70/30).
- ``near`` is 1 for a miner connected to this process and REMOTE_WEIGHT for one reached
  through another replica (``coordinator/replicas/``): the hop over NATS costs about 2 ms of
  time to first token and CPU in two replicas, so among equals a local miner takes the job
  twice as often, while a busy or slow local one still loses to a free, fast remote one.
- Price: every miner of a model sells at the catalog price in this marketplace, so
  ``sort="price"`` has nothing to sort by and falls back to the default; ``max_price`` is
  checked once per request by the service, against the catalog.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection, Sequence

from coordinator.api import ProviderSort
from coordinator.verification.trust import TrustRecord
from coordinator.worker import Worker

SHARPNESS = 4
"""Exponent of the default score: how strongly free capacity and speed decide."""

SORT_SHARPNESS = 16
"""Exponent under ``provider.sort``: nearly strict, still random among near-equal miners."""

REMOTE_WEIGHT = 0.5
"""Share of a miner reached through another replica, against an equal local one."""

LAST_CHECK_FAILED_TRUST = 0.5
"""Trust of a miner whose latest spot check failed (unconfirmed, or confirmed and not banned)."""

_MIN_TTFT_S = 1e-3  # below a millisecond differences are noise; also keeps ratios finite

Trust = Callable[[str], float]
"""Miner id -> trust in [0, 1]."""


def full_trust(miner_id: str) -> float:
    """Every miner fully trusted (no spot-check records: tests, or checks turned off)."""
    return 1.0


def trust_from_record(record: TrustRecord) -> float:
    """A spot-check record as a routing trust.

    Banned: 0, never chosen. Latest check failed (no valid check since a failure): 0.5.
    Otherwise 1, including identities never checked yet: a new miner is not starved (all its
    first jobs are checked anyway).
    """
    if record.banned:
        return 0.0
    if record.consecutive_valid == 0 and record.checks_failed > 0:
        return LAST_CHECK_FAILED_TRUST
    return 1.0


class Router:
    """Picks a miner among candidates (see the module docstring for the score)."""

    def __init__(self, *, rng: random.Random | None = None, trust: Trust = full_trust) -> None:
        self._rng = rng or random.Random()
        self._trust = trust

    def pick(
        self,
        candidates: Sequence[Worker],
        *,
        exclude: Collection[str] = (),
        sort: ProviderSort | None = None,
    ) -> Worker | None:
        """A miner drawn by score; None when no candidate has a free slot and trust."""
        scored = self.scores(candidates, exclude=exclude, sort=sort)
        if not scored:
            return None
        workers = [worker for worker, _ in scored]
        weights = [score for _, score in scored]
        if not sum(weights) > 0:
            # Scores can underflow to 0 only in absurd spreads of speed; stay available.
            return self._rng.choice(workers)
        return self._rng.choices(workers, weights)[0]

    def scores(
        self,
        candidates: Sequence[Worker],
        *,
        exclude: Collection[str] = (),
        sort: ProviderSort | None = None,
    ) -> list[tuple[Worker, float]]:
        """The eligible candidates with their scores (unnormalized), in candidate order."""
        eligible: list[tuple[Worker, float]] = []
        for worker in candidates:
            if worker.miner_id in exclude or worker.free_slots <= 0:
                continue
            trust = min(1.0, max(0.0, self._trust(worker.miner_id)))
            near = 1.0 if worker.is_local else REMOTE_WEIGHT
            if trust > 0:
                eligible.append((worker, trust * near))
        if not eligible:
            return []
        ttfts = [_ttft(worker) for worker, _ in eligible]
        rates = [worker.speed.tokens_per_s for worker, _ in eligible]
        best_ttft = min((t for t in ttfts if t is not None), default=None)
        best_rate = max((r for r in rates if r is not None), default=None)
        scored = []
        for (worker, trust), ttft, rate in zip(eligible, ttfts, rates, strict=True):
            ttft_rel = best_ttft / ttft if best_ttft is not None and ttft is not None else 1.0
            rate_rel = rate / best_rate if best_rate and rate is not None else 1.0
            if sort == "latency":
                score = trust * ttft_rel**SORT_SHARPNESS
            elif sort == "throughput":
                score = trust * rate_rel**SORT_SHARPNESS
            else:
                free_share = worker.free_slots / worker.max_concurrency
                speed = math.sqrt(ttft_rel * rate_rel)
                score = trust * (free_share * speed) ** SHARPNESS
            scored.append((worker, score))
        return scored


def _ttft(worker: Worker) -> float | None:
    ttft = worker.speed.ttft_s
    return None if ttft is None else max(ttft, _MIN_TTFT_S)
