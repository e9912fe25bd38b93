"""The closed loop of ``bench/engine.py`` and what it makes of the requests' timings.

At concurrency N, N clients each send a request, read it to its last token, and send the next:
first one warm-up request, then ``per_client`` measured ones. The warm-up requests have
staggered lengths (client ``c`` asks for ``(c + 1) / N`` of ``max_tokens``), so the clients'
measured requests start out of phase, as independent users' do. Without that, requests of one
length keep the N clients in lock-step: all N finish on the same step and all N prompts arrive
together, so every first token waits for an N-prompt prefill, which is a static batch, not the
steady state of a server.

Aggregate tokens/s is taken over the *steady window*: from the moment the last client sends its
first measured request to the moment the first client has its last measured token, the span in
which exactly N clients are in their measured requests (no warm-up token and no drain at the end
counts). Tokens are counted by their arrival times. TTFT and per-sequence decode rates are taken
over the requests sent inside that window. At concurrency 1 the window is simply the first send
to the last token. With one measured request per client there may be no such window; then the
whole span of the measured requests is used.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # installed with pgserver; no stubs here

from bench.common import percentile
from bench.load_stack import machine_busy_s, process_cpu


@dataclass(frozen=True)
class Timing:
    """One request as its client saw it (``time.perf_counter`` seconds)."""

    sent: float  # the request was made
    token_times: tuple[float, ...]  # when each token arrived (tokens of one SSE chunk share one)
    end: float  # the stream was exhausted (through the coordinator: after the usage chunk)

    @property
    def tokens(self) -> int:
        return len(self.token_times)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.sent


One = Callable[[int, int, int], Awaitable[Timing]]
"""Sends one request ``(client, index, max_tokens)`` (index -1: the warm-up) and reads it to the
end; raises when it fails."""


async def closed_loop(
    one: One, *, clients: int, per_client: int, max_tokens: int
) -> list[list[Timing]]:
    """Each client's measured requests, after its staggered warm-up (see the module docstring).

    A failed request fails the level: a benchmark that quietly drops requests measures less
    work than it reports."""

    async def client(index: int) -> list[Timing]:
        await one(index, -1, max(1, (index + 1) * max_tokens // clients))
        return [await one(index, request, max_tokens) for request in range(per_client)]

    return list(await asyncio.gather(*(client(index) for index in range(clients))))


@dataclass(frozen=True)
class PathFigures:
    """One path (the engine in-process, or through the coordinator) at one concurrency level."""

    requests: int  # measured requests
    tokens_per_request: float  # mean; max_tokens when no request met a stop token
    window_s: float  # the steady window (see the module docstring)
    tokens_per_s: float  # aggregate: tokens that arrived in the window / its length
    window_requests: int  # requests sent inside the window: the percentiles' samples
    ttft_p50_ms: float  # request made to first token
    ttft_p99_ms: float
    decode_tokens_per_s: float  # per sequence, median: (tokens - 1) / (last - first token)
    e2e_p50_ms: float  # request made to end of stream


def figures(per_client: Sequence[Sequence[Timing]]) -> PathFigures:
    """Aggregates one level's timings (see the module docstring for the window)."""
    measured = [timing for timings in per_client for timing in timings]
    if not measured or any(not timing.token_times for timing in measured):
        raise ValueError("every measured request needs at least one token")
    start = max(timings[0].sent for timings in per_client)
    end = min(timings[-1].token_times[-1] for timings in per_client)
    if end <= start:  # one request per client: no span where all of them are measured
        start = min(timing.sent for timing in measured)
        end = max(timing.token_times[-1] for timing in measured)
    in_window = sum(
        1 for timing in measured for arrived in timing.token_times if start <= arrived <= end
    )
    sampled = [timing for timing in measured if start <= timing.sent <= end] or measured
    decode = [
        (timing.tokens - 1) / (timing.token_times[-1] - timing.token_times[0])
        for timing in sampled
        if timing.tokens > 1 and timing.token_times[-1] > timing.token_times[0]
    ]
    ttfts = [timing.ttft for timing in sampled]
    return PathFigures(
        requests=len(measured),
        tokens_per_request=sum(timing.tokens for timing in measured) / len(measured),
        window_s=end - start,
        tokens_per_s=in_window / (end - start),
        window_requests=len(sampled),
        ttft_p50_ms=1000 * percentile(ttfts, 50),
        ttft_p99_ms=1000 * percentile(ttfts, 99),
        decode_tokens_per_s=percentile(decode, 50),
        e2e_p50_ms=1000 * percentile([timing.end - timing.sent for timing in measured], 50),
    )


def requests_per_client(concurrency: int, *, requests: int, min_rounds: int) -> int:
    """Measured requests per client: ``requests`` in all, at least ``min_rounds`` each."""
    return max(min_rounds, -(-requests // concurrency))


def own_peak_rss_mib() -> float:
    """This process's peak resident set so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mib(pid: int) -> float | None:
    """Another process's peak resident set (``VmHWM``, Linux); None where it cannot be read."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return None


class CpuMeter:
    """CPU time of groups of processes from now on (``bench.load_stack.process_cpu``)."""

    def __init__(self, watch: dict[str, list[psutil.Process]]) -> None:
        self._watch = watch
        self._cpu = process_cpu(watch)
        self._busy = machine_busy_s()
        self._started = time.monotonic()

    def read(self) -> tuple[dict[str, float], float]:
        """CPU seconds per second for each group and the machine; the groups' CPU seconds."""
        elapsed = time.monotonic() - self._started
        cpu = process_cpu(self._watch)
        used = {group: cpu[group] - self._cpu[group] for group in self._watch}
        cores = {group: seconds / elapsed for group, seconds in used.items()}
        cores["machine"] = (machine_busy_s() - self._busy) / elapsed
        return cores, sum(used.values())
