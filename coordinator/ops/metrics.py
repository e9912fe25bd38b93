"""The coordinator's Prometheus metrics, served by ``GET /metrics``.

Every :class:`CoordinatorMetrics` owns its own ``CollectorRegistry`` (never the process-wide
default), so several coordinators can run in one process, as they do in tests.

Metrics (all prefixed ``meshmint_``):

- ``time_to_first_token_seconds{model}`` — from the request entering the service to the first
  delta with tokens handed to the HTTP layer (tokenizing, holding and dispatch included);
- ``inter_token_latency_seconds{model}`` — between consecutive deltas with tokens, per token;
- ``request_duration_seconds{model}`` — end to end, from entering the service to settlement;
- ``tokens_billed_total{model,kind}`` — prompt and completion tokens of settled, billed requests;
- ``http_requests_total{endpoint,status}`` — every HTTP response by route template and status
  class (``2xx``, ``4xx``, ``5xx``); a stream that fails after its 200 counts as ``2xx``;
- ``miners_connected{model}`` — computed at scrape time from the live sessions;
- ``queue_depth`` — requests waiting for a free miner slot right now, all models together: one
  unlabelled gauge set by the dispatcher's queue, because what an operator alerts on is that
  anything waits at all (a model short of miners shows in ``miners_connected``);
- ``spot_checks_total{miner,outcome}`` — spot checks of each miner's jobs (miner: the first 16
  hex digits of its key) by outcome: ``run``, ``passed``, ``failed`` (a scorer failed it),
  ``confirmed`` (two scorers failed it: slashed), ``disputed`` (scorers disagreed and no third
  one settled it), ``skipped`` (no other miner could score it);
- ``spot_checks_failed_total`` — failed checks of all miners, for a simple alert;
- ``scorer_contradictions_total{scorer}`` — scorers outvoted by two others (slashed like cheats).

Recording costs one clock read and one histogram observation per delta.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from coordinator.api import TextDelta, Usage

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text exposition format that :meth:`CoordinatorMetrics.render` produces."""

# Latencies of an LLM API span milliseconds (a token) to minutes (a long completion).
_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

MinerCounts = Callable[[], Mapping[str, int]]
"""Connected miners per model, asked at every scrape."""


class _MinersCollector(Collector):
    def __init__(self, miner_counts: MinerCounts) -> None:
        self._miner_counts = miner_counts

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "meshmint_miners_connected", "Miners connected and serving a model", labels=["model"]
        )
        for model, count in sorted(self._miner_counts().items()):
            family.add_metric([model], count)
        yield family


class CoordinatorMetrics:
    """The metric families of one coordinator and the calls that record into them."""

    def __init__(self, *, miner_counts: MinerCounts | None = None) -> None:
        """``miner_counts`` feeds ``miners_connected``; without it the gauge has no samples."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.time_to_first_token = Histogram(
            "meshmint_time_to_first_token_seconds",
            "From the request entering the service to its first delivered token",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "meshmint_inter_token_latency_seconds",
            "Time between delivered tokens, per token",
            ["model"],
            buckets=_INTER_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "meshmint_request_duration_seconds",
            "End-to-end duration of a completion, from entering the service to settlement",
            ["model"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.tokens_billed = Counter(
            "meshmint_tokens_billed",
            "Tokens billed to buyers",
            ["model", "kind"],
            registry=self.registry,
        )
        self.http_requests = Counter(
            "meshmint_http_requests",
            "HTTP responses by route template and status class",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "meshmint_queue_depth",
            "Requests waiting for a free miner slot, all models together",
            registry=self.registry,
        )
        self.spot_checks = Counter(
            "meshmint_spot_checks",
            "Spot checks of miners' work by miner and outcome",
            ["miner", "outcome"],
            registry=self.registry,
        )
        self.spot_checks_failed = Counter(
            "meshmint_spot_checks_failed",
            "Spot checks of miners' work that a scorer failed",
            registry=self.registry,
        )
        self.scorer_contradictions = Counter(
            "meshmint_scorer_contradictions",
            "Scorers outvoted by two other scorers",
            ["scorer"],
            registry=self.registry,
        )
        if miner_counts is not None:
            self.registry.register(_MinersCollector(miner_counts))

    def render(self) -> bytes:
        """The text exposition of every metric, for ``GET /metrics``."""
        return generate_latest(self.registry)

    def request(self, model: str) -> RequestTimer:
        """Starts timing one completion request now."""
        return RequestTimer(self, model)

    def spot_check(self, miner_id: str, outcome: str) -> None:
        """Counts one spot-check outcome for a miner (see the module docstring)."""
        self.spot_checks.labels(miner_id[:16], outcome).inc()
        if outcome == "failed":
            self.spot_checks_failed.inc()

    def scorer_contradicted(self, scorer_id: str) -> None:
        self.scorer_contradictions.labels(scorer_id[:16]).inc()

    def http_response(self, endpoint: str, status: int) -> None:
        self.http_requests.labels(endpoint, f"{status // 100}xx").inc()

    def billed(self, model: str, usage: Usage) -> None:
        """Counts a settled request's tokens; a request that cost nothing was not billed."""
        if usage.cost == 0:
            return
        self.tokens_billed.labels(model, "prompt").inc(usage.prompt_tokens)
        self.tokens_billed.labels(model, "completion").inc(usage.completion_tokens)


class RequestTimer:
    """The clock of one completion request: first token, gaps between tokens, the end."""

    def __init__(self, metrics: CoordinatorMetrics, model: str) -> None:
        self._started = time.perf_counter()
        self._last: float | None = None
        # Children resolved once, so the per-delta path does no label lookup.
        self._ttft = metrics.time_to_first_token.labels(model)
        self._inter_token = metrics.inter_token_latency.labels(model)
        self._duration = metrics.request_duration.labels(model)

    def delivered(self, tokens: int) -> None:
        """A delta carrying ``tokens`` tokens went to the buyer."""
        if tokens <= 0:
            return
        now = time.perf_counter()
        if self._last is None:
            self._ttft.observe(now - self._started)
        else:
            # A delta can carry several tokens (a miner's chunk): spread the gap over them.
            gap = (now - self._last) / tokens
            for _ in range(tokens):
                self._inter_token.observe(gap)
        self._last = now

    def finished(self) -> None:
        self._duration.observe(time.perf_counter() - self._started)

    async def timed(self, deltas: AsyncIterator[TextDelta]) -> AsyncGenerator[TextDelta, None]:
        """``deltas``, passed through, each recorded as it is handed on."""
        async for delta in deltas:
            self.delivered(delta.token_count)
            yield delta
