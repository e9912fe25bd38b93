"""The figures of ``bench/scale.py``: one topology at one concurrency level, and the report.

A :class:`ScaleLevel` is what all generator processes of one window saw together (a
``bench.load_report.Level``, whose ``path`` is the topology's name) and what the generators of
each replica saw (``by_replica``). :func:`table` puts the topologies side by side, with the added
TTFT of each against ``single`` (one coordinator without NATS) at the same level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.load_report import Level, combine, cpu_ms_per_request

# CPU groups in report order; "generators" and "machine" come from bench.load.run_generators,
# "others" is the machine less every group: processes outside this benchmark (the host is shared).
GROUPS = ("coordinators", "postgres", "miners", "generators", "nats", "others", "machine")
PER_REQUEST_GROUPS = ("coordinators", "postgres", "miners", "nats")
BASELINE = "single"


@dataclass(frozen=True)
class ScaleLevel:
    """One topology at one concurrency level."""

    total: Level  # every generator process together; total.path is the topology's name
    replicas: int  # coordinator processes
    by_replica: dict[int, Level] = field(default_factory=dict)  # replicas that had buyers

    @property
    def topology(self) -> str:
        return self.total.path

    @property
    def concurrency(self) -> int:
        return self.total.concurrency

    def as_json(self) -> dict[str, Any]:
        return {
            "topology": self.topology,
            "replicas": self.replicas,
            "total": self.total.__dict__,
            "by_replica": {str(index): level.__dict__ for index, level in self.by_replica.items()},
        }


def scale_level(
    topology: str,
    replicas: int,
    concurrency: int,
    outcomes: Sequence[dict[str, Any]],
    homes: Sequence[int],
    cores: dict[str, float],
) -> ScaleLevel:
    """``outcomes[i]`` came from a generator that sent to replica ``homes[i]``."""
    total = combine(topology, concurrency, list(outcomes), cores)
    by_replica = {
        home: combine(
            topology,
            concurrency,
            [outcome for outcome, h in zip(outcomes, homes, strict=True) if h == home],
            {},
        )
        for home in sorted(set(homes))
    }
    return ScaleLevel(total, replicas, by_replica)


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:,.2f}"


def by_replica_text(level: ScaleLevel) -> str:
    """``req/s (TTFT p50 ms)`` per replica that had buyers, e.g. ``70 (6.1) / 68 (6.4)``."""
    if level.replicas == 1 and set(level.by_replica) <= {0}:
        return "-"
    return " / ".join(
        f"r{index}: {x.requests_per_s:,.0f} ({_ms(x.ttft_ms[0])})"
        for index, x in sorted(level.by_replica.items())
    )


def per_request_text(level: Level) -> str:
    return " / ".join(_ms(cpu_ms_per_request(level, group)) for group in PER_REQUEST_GROUPS)


def with_others(cores: dict[str, float]) -> dict[str, float]:
    """``cores`` and "others": the machine's busy cores that no measured group used."""
    if "machine" not in cores:
        return dict(cores)
    measured = sum(value for group, value in cores.items() if group != "machine")
    return {**cores, "others": max(0.0, cores["machine"] - measured)}


def cores_text(cores: dict[str, float], groups: Sequence[str] = GROUPS) -> str:
    full = with_others(cores)
    return " / ".join(_ms(full.get(group, math.nan)) for group in groups)


def added_ttft(level: ScaleLevel, levels: Sequence[ScaleLevel]) -> str:
    """TTFT p50 minus the baseline's at the same level ("-" without a baseline)."""
    base = next(
        (x for x in levels if x.topology == BASELINE and x.concurrency == level.concurrency),
        None,
    )
    if base is None or level.topology == BASELINE:
        return "-"
    return f"{level.total.ttft_ms[0] - base.total.ttft_ms[0]:+.2f}"


def table(levels: Sequence[ScaleLevel]) -> str:
    """The markdown table of the report, in the order measured."""
    lines = [
        "| topology | concurrency | req/s | req/s (TTFT p50 ms) by replica | TTFT p50 / p99 (ms) "
        f"| added TTFT p50 vs {BASELINE} (ms) | end-to-end p50 (ms) | errors | CPU ms/request: "
        "coordinators / PostgreSQL / miners / NATS | CPU cores: coordinators / PostgreSQL / "
        "miners / generators / NATS / others / machine |",
        "|---|---:|---:|---|---:|---:|---:|---:|---|---|",
    ]
    for level in levels:
        total = level.total
        lines.append(
            f"| {level.topology} | {level.concurrency} | {total.requests_per_s:,.0f} | "
            f"{by_replica_text(level)} | {_ms(total.ttft_ms[0])} / {_ms(total.ttft_ms[1])} | "
            f"{added_ttft(level, levels)} | {_ms(total.e2e_ms[0])} | {total.errors} | "
            f"{per_request_text(total)} | "
            f"{cores_text(total.cpu_cores)} |"
        )
    return "\n".join(lines)


IDLE_GROUPS = ("coordinators", "postgres", "miners", "nats", "others", "machine")


def idle_table(idle: dict[str, dict[str, float]]) -> str:
    """CPU cores of each topology with no buyer (miners connected), in the order measured."""
    lines = [
        "| topology | idle CPU cores: coordinators / PostgreSQL / miners / NATS / others / "
        "machine |",
        "|---|---|",
    ]
    for topology, cores in idle.items():
        if cores:
            lines.append(f"| {topology} | {cores_text(cores, IDLE_GROUPS)} |")
    return "\n".join(lines)
