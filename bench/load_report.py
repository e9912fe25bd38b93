"""The figures of ``bench/load.py``: one target at one concurrency level, and the report.

A :class:`Level` is what all generator processes of one window saw together; :func:`table` puts
direct, echo and coordinator side by side (added TTFT = coordinator - direct at the same level)
and :func:`verdict` holds the best throughput and the added TTFT at the lowest level against
issue 5's targets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.common import percentile

PATHS = ("direct", "echo", "coordinator")
TARGET_RPS = 1000.0  # issue 5: one coordinator process on a 2-core machine
TARGET_ADDED_TTFT_MS = 5.0


@dataclass(frozen=True)
class Level:
    """One target at one concurrency level, all generator processes together."""

    path: str  # direct, echo or coordinator
    concurrency: int  # requests kept in flight
    requests_per_s: float  # requests that ended in the window, per second
    ttft_ms: tuple[float, float]  # p50, p99
    e2e_ms: tuple[float, float]  # p50, p99
    samples: int  # requests that started and ended in the window
    tokens: list[int]  # the distinct completion-token counts seen
    errors: int  # failed requests, warm-up included
    error_messages: list[str]  # the first few
    cpu_cores: dict[str, float]  # CPU seconds per second of window, per process group


def combine(
    path: str, concurrency: int, outcomes: list[dict[str, Any]], cores: dict[str, float]
) -> Level:
    samples = [sample for outcome in outcomes for sample in outcome["samples"]]
    ttft = [sample[0] * 1000 for sample in samples]
    e2e = [sample[1] * 1000 for sample in samples]
    window = max(outcome["window_s"] for outcome in outcomes)
    return Level(
        path=path,
        concurrency=concurrency,
        requests_per_s=sum(outcome["completed"] for outcome in outcomes) / window,
        ttft_ms=(percentile(ttft, 50), percentile(ttft, 99)),
        e2e_ms=(percentile(e2e, 50), percentile(e2e, 99)),
        samples=len(samples),
        tokens=sorted({int(sample[2]) for sample in samples}),
        errors=sum(outcome["errors"] for outcome in outcomes),
        error_messages=[m for outcome in outcomes for m in outcome["error_messages"]][:10],
        cpu_cores=cores,
    )


def cores_text(cores: dict[str, float]) -> str:
    return ", ".join(f"{group} {value:.2f}" for group, value in cores.items())


def per_request_text(level: Level) -> str:
    groups = [group for group in level.cpu_cores if group != "machine"]
    return ", ".join(f"{group} {cpu_ms_per_request(level, group):.2f}" for group in groups)


def _figure(levels: list[Level], path: str, concurrency: int) -> Level | None:
    return next((x for x in levels if x.path == path and x.concurrency == concurrency), None)


def _ms(level: Level | None, index: int) -> str:
    return f"{level.ttft_ms[index]:.2f}" if level is not None else "-"


def _rps(level: Level | None) -> str:
    return f"{level.requests_per_s:,.0f}" if level is not None else "-"


def cpu_ms_per_request(level: Level, group: str = "coordinator") -> float:
    """CPU milliseconds ``group`` spent per completed request in the window."""
    if level.requests_per_s == 0:
        return math.nan
    return 1000 * level.cpu_cores.get(group, math.nan) / level.requests_per_s


def table(levels: list[Level], concurrencies: Sequence[int]) -> str:
    """The markdown table of the report."""
    lines = [
        "| concurrency | req/s direct | req/s echo | req/s coordinator | TTFT p50 direct / echo / "
        "coordinator (ms) | TTFT p99 direct / echo / coordinator (ms) | added TTFT p50 (ms) | "
        "coordinator CPU ms/request | "
        "CPU cores: coordinator / PostgreSQL / miners / generators / machine |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for concurrency in concurrencies:
        direct, echo, through = (_figure(levels, path, concurrency) for path in PATHS)
        added = (
            f"{through.ttft_ms[0] - direct.ttft_ms[0]:+.2f}"
            if through is not None and direct is not None
            else "-"
        )
        cores, per_request = "-", "-"
        if through is not None:
            per_request = f"{cpu_ms_per_request(through):.2f}"
            cpu = through.cpu_cores
            cores = " / ".join(
                f"{cpu.get(group, math.nan):.2f}"
                for group in ("coordinator", "postgres", "miners", "generators", "machine")
            )
        lines.append(
            f"| {concurrency} | {_rps(direct)} | {_rps(echo)} | {_rps(through)} | "
            f"{_ms(direct, 0)} / {_ms(echo, 0)} / {_ms(through, 0)} | "
            f"{_ms(direct, 1)} / {_ms(echo, 1)} / {_ms(through, 1)} | {added} | {per_request} | "
            f"{cores} |"
        )
    return "\n".join(lines)


def verdict(levels: list[Level]) -> list[str]:
    """Whether the issue's targets are met, one line each (only with direct and coordinator)."""
    through = [x for x in levels if x.path == "coordinator"]
    if not through:
        return []
    best = max(through, key=lambda x: x.requests_per_s)
    lines = [
        f"best coordinator throughput {best.requests_per_s:,.0f} req/s at concurrency "
        f"{best.concurrency}: target >= {TARGET_RPS:,.0f}: "
        + ("MET" if best.requests_per_s >= TARGET_RPS else "NOT MET")
    ]
    lowest = min(through, key=lambda x: x.concurrency)
    direct = _figure(levels, "direct", lowest.concurrency)
    if direct is not None:
        added = lowest.ttft_ms[0] - direct.ttft_ms[0]
        lines.append(
            f"added TTFT p50 at concurrency {lowest.concurrency} {added:.2f} ms: target < "
            f"{TARGET_ADDED_TTFT_MS:g} ms: "
            + ("MET" if added < TARGET_ADDED_TTFT_MS else "NOT MET")
        )
    return lines
