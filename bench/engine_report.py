"""The report of ``bench/engine.py``: one table per model, levels as columns, and the targets.

Issue 12's targets on a 2-core CPU: at concurrency 16 the engine makes at least 6x the tokens/s
it makes at 1 (set for the 25M-parameter model; judged for every model), its TTFT p99 at 16 is
at most 3x its TTFT p99 at 1, and through the coordinator the tokens/s are at least 0.9 of the
engine's in-process at every level.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.engine_coordinator import CoordinatorLevel
from bench.engine_paths import EngineLevel, Workload

TARGET_SPEEDUP = 6.0  # tokens/s at TARGET_LEVEL over tokens/s at 1
TARGET_TTFT_GROWTH = 3.0  # TTFT p99 at TARGET_LEVEL over TTFT p99 at 1, at most
TARGET_LEVEL = 16
TARGET_COORDINATOR_RATIO = 0.9  # coordinator tokens/s over engine tokens/s, at least


@dataclass
class ModelResult:
    """Everything measured on one model."""

    workload: Workload
    levels: list[int]
    per_client: dict[int, int]  # measured requests per client, by level
    engine: dict[int, EngineLevel] = field(default_factory=dict)
    coordinator: dict[int, CoordinatorLevel] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        workload = self.workload
        return {
            "model": workload.label,
            "source": str(workload.source),
            "parameters": workload.parameters,
            "prompts": len(workload.prompts),
            "prompt_tokens": sorted({len(prompt) for prompt in workload.prompts}),
            "max_tokens": workload.max_tokens,
            "levels": [
                {
                    "model": workload.label,
                    "concurrency": level,
                    "requests_per_client": self.per_client[level],
                    "kv_cache_tokens": workload.kv_cache_tokens(level),
                    "engine": _as_dict(self.engine.get(level)),
                    "coordinator": _as_dict(self.coordinator.get(level)),
                }
                for level in self.levels
            ],
            "verdict": verdict(self),
        }


def _as_dict(value: EngineLevel | CoordinatorLevel | None) -> dict[str, Any] | None:
    return None if value is None else asdict(value)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def _text(value: float | None, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def table(result: ModelResult) -> str:
    """A markdown table: one column per level, ratios against the lowest level."""
    levels = result.levels
    base = levels[0]
    engine, through = result.engine, result.coordinator

    def engine_value(level: int, read: Callable[[EngineLevel], float]) -> float | None:
        return read(engine[level]) if level in engine else None

    def coordinator_value(level: int, read: Callable[[CoordinatorLevel], float]) -> float | None:
        return read(through[level]) if level in through else None

    def e_rate(level: int) -> float | None:
        return engine_value(level, lambda e: e.figures.tokens_per_s)

    def c_rate(level: int) -> float | None:
        return coordinator_value(level, lambda c: c.figures.tokens_per_s)

    def e_p99(level: int) -> float | None:
        return engine_value(level, lambda e: e.figures.ttft_p99_ms)

    def c_p99(level: int) -> float | None:
        return coordinator_value(level, lambda c: c.figures.ttft_p99_ms)

    def hf_rate(level: int) -> float | None:
        return engine[level].hf_tokens_per_s if level in engine else None

    def pair(first: float | None, second: float | None, pattern: str) -> str:
        return f"{_text(first, pattern)} / {_text(second, pattern)}"

    rows: list[tuple[str, Callable[[int], str]]] = [
        ("engine tok/s", lambda n: _text(e_rate(n), ".1f")),
        (f"engine tok/s ÷ c={base}", lambda n: _text(_ratio(e_rate(n), e_rate(base)), ".2f")),
        (
            "engine TTFT p50 / p99 (ms)",
            lambda n: pair(engine_value(n, lambda e: e.figures.ttft_p50_ms), e_p99(n), ".0f"),
        ),
        (f"engine TTFT p99 ÷ c={base}", lambda n: _text(_ratio(e_p99(n), e_p99(base)), ".2f")),
        (
            "engine decode tok/s per sequence",
            lambda n: _text(engine_value(n, lambda e: e.figures.decode_tokens_per_s), ".1f"),
        ),
        (
            "engine largest decode batch / tokens per step",
            lambda n: pair(
                engine_value(n, lambda e: e.largest_decode_batch),
                engine_value(n, lambda e: e.tokens_per_step),
                ".3g",
            ),
        ),
        ("coordinator tok/s", lambda n: _text(c_rate(n), ".1f")),
        (f"coordinator tok/s ÷ c={base}", lambda n: _text(_ratio(c_rate(n), c_rate(base)), ".2f")),
        (
            "coordinator TTFT p50 / p99 (ms)",
            lambda n: pair(coordinator_value(n, lambda c: c.figures.ttft_p50_ms), c_p99(n), ".0f"),
        ),
        (
            f"coordinator TTFT p99 ÷ c={base}",
            lambda n: _text(_ratio(c_p99(n), c_p99(base)), ".2f"),
        ),
        ("**coordinator / engine tok/s**", lambda n: _text(_ratio(c_rate(n), e_rate(n)), ".2f")),
        ("hf generate tok/s (static batch)", lambda n: _text(hf_rate(n), ".1f")),
        ("engine / hf tok/s", lambda n: _text(_ratio(e_rate(n), hf_rate(n)), ".2f")),
        ("KV cache (MiB)", lambda n: _text(engine_value(n, lambda e: e.kv_cache_mib), ".1f")),
        (
            "peak RSS: bench process / miner (MiB)",
            lambda n: pair(
                engine_value(n, lambda e: e.peak_rss_mib),
                coordinator_value(n, lambda c: c.miner_peak_rss_mib or 0.0),
                ".0f",
            ),
        ),
        (
            "CPU ms per token: engine process / coordinator path (all its processes)",
            lambda n: pair(
                engine_value(n, lambda e: e.cpu_ms_per_token),
                coordinator_value(n, lambda c: c.cpu_ms_per_token),
                ".2f",
            ),
        ),
        (
            "CPU cores: engine path bench / machine",
            lambda n: pair(
                engine_value(n, lambda e: e.cpu_cores["bench"]),
                engine_value(n, lambda e: e.cpu_cores["machine"]),
                ".2f",
            ),
        ),
        (
            "CPU cores: coordinator path miner / coordinator / postgres / client / machine",
            lambda n: _cores(through.get(n)),
        ),
        (
            "measured requests (sent in window): engine / coordinator",
            lambda n: _requests(result, n),
        ),
    ]
    header = f"| {result.workload.label} | " + " | ".join(f"c={n}" for n in levels) + " |"
    lines = [header, "|---|" + "---:|" * len(levels)]
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(n) for n in levels) + " |")
    return "\n".join(lines)


def _cores(level: CoordinatorLevel | None) -> str:
    if level is None:
        return "-"
    groups = ("miner", "coordinator", "postgres", "client", "machine")
    return " / ".join(f"{level.cpu_cores.get(group, 0.0):.2f}" for group in groups)


def _requests(result: ModelResult, level: int) -> str:
    cells = []
    for path in (result.engine.get(level), result.coordinator.get(level)):
        cells.append(
            "-" if path is None else f"{path.figures.requests} ({path.figures.window_requests})"
        )
    return " / ".join(cells)


def verdict(result: ModelResult) -> list[str]:
    """One line per target that this run's levels and paths can judge."""
    lines = []
    engine, through = result.engine, result.coordinator
    if 1 in engine and TARGET_LEVEL in engine:
        one, at = engine[1].figures, engine[TARGET_LEVEL].figures
        speedup = at.tokens_per_s / one.tokens_per_s
        lines.append(
            f"{result.workload.label}: engine tokens/s at {TARGET_LEVEL} = {speedup:.2f}x "
            f"at 1 ({at.tokens_per_s:.1f} / {one.tokens_per_s:.1f}); target >= "
            f"{TARGET_SPEEDUP:g}x (set for the 25M model): {_met(speedup >= TARGET_SPEEDUP)}"
        )
        growth = at.ttft_p99_ms / one.ttft_p99_ms
        lines.append(
            f"{result.workload.label}: engine TTFT p99 at {TARGET_LEVEL} = {growth:.2f}x at 1 "
            f"({at.ttft_p99_ms:.0f} / {one.ttft_p99_ms:.0f} ms); target <= "
            f"{TARGET_TTFT_GROWTH:g}x: {_met(growth <= TARGET_TTFT_GROWTH)}"
        )
    shared = [level for level in result.levels if level in engine and level in through]
    if shared:
        ratios = {
            level: through[level].figures.tokens_per_s / engine[level].figures.tokens_per_s
            for level in shared
        }
        worst = min(shared, key=lambda level: ratios[level])
        missed = [f"c={level}" for level in shared if ratios[level] < TARGET_COORDINATOR_RATIO]
        lines.append(
            f"{result.workload.label}: coordinator / engine tokens/s "
            + ", ".join(f"{ratios[level]:.2f}" for level in shared)
            + f" (worst {ratios[worst]:.2f} at c={worst}); target >= "
            f"{TARGET_COORDINATOR_RATIO:g} at every level: "
            + _met(not missed)
            + (f" ({', '.join(missed)})" if missed else "")
        )
    return lines


def _met(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def summary_lines(results: Sequence[ModelResult]) -> list[str]:
    return [line for result in results for line in verdict(result)]
