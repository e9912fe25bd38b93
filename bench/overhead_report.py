"""`bench/overhead.py`'s report: agreement between paths, the tables, the --json document.

Paths: ``direct`` (the engine in-process), ``coordinator`` (plaintext HTTP and gRPC on loopback)
and, unless ``--no-tls``, ``tls`` (the same stack over HTTPS and TLS gRPC, certificates from
``meshmint-coordinator tls-init``). The TLS column compares ``tls`` with ``coordinator`` from the
same run: what encryption adds, as TTFT milliseconds and a throughput ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from bench.common import percentile

if TYPE_CHECKING:
    from bench.overhead import Batch, Sample

PATHS = ("direct", "coordinator", "tls")


def mismatches(direct: Batch, other: Batch, prompts: Sequence[str], *, name: str) -> list[str]:
    problems = []
    for prompt, a, b in zip(prompts, direct.samples, other.samples, strict=True):
        if a is not None and b is not None and (a.tokens != b.tokens or a.text != b.text):
            problems.append(
                f"{prompt!r}: direct {a.tokens} tokens {a.text[:40]!r}, "
                f"{name} {b.tokens} tokens {b.text[:40]!r}"
            )
    return problems


def summary(batches: Mapping[str, Batch]) -> dict[str, float]:
    """Percentiles and throughput per path; ``*_added_ms`` is coordinator - direct, and
    ``tls_*_added_ms`` is tls - coordinator (plaintext)."""

    def ms(batch: Batch, field: str, q: float) -> float:
        return 1000 * percentile([getattr(sample, field) for sample in batch.done], q)

    figures: dict[str, float] = {}
    for path, batch in batches.items():
        for key, field, q in (
            ("ttft_p50", "ttft_s", 50),
            ("ttft_p99", "ttft_s", 99),
            ("e2e_p50", "e2e_s", 50),
        ):
            figures[f"{key}_{path}_ms"] = ms(batch, field, q)
        figures[f"tokens_per_s_{path}"] = batch.tokens_per_s
        figures[f"completion_tokens_{path}"] = float(batch.tokens)
        figures[f"failed_{path}"] = float(len(batch.errors))
    for key in ("ttft_p50", "ttft_p99", "e2e_p50"):
        figures[f"{key}_added_ms"] = figures[f"{key}_coordinator_ms"] - figures[f"{key}_direct_ms"]
        if "tls" in batches:
            figures[f"tls_{key}_added_ms"] = (
                figures[f"{key}_tls_ms"] - figures[f"{key}_coordinator_ms"]
            )
    figures["throughput_ratio"] = (
        figures["tokens_per_s_coordinator"] / figures["tokens_per_s_direct"]
    )
    if "tls" in batches:
        figures["tls_throughput_ratio"] = (
            figures["tokens_per_s_tls"] / figures["tokens_per_s_coordinator"]
        )
    return figures


def table(level: int, figures: dict[str, float], *, tls: bool) -> str:
    paths = [path for path in PATHS if path != "tls" or tls]
    counts = ", ".join(f"{figures[f'completion_tokens_{path}']:.0f} {path}" for path in paths)
    failed = ", ".join(f"{figures[f'failed_{path}']:.0f} {path}" for path in paths)
    header = f"  {'':22}{'direct':>10}{'coordinator':>13}{'added':>10}"
    if tls:
        header += f"{'TLS':>10}{'TLS added':>11}"
    lines = [f"concurrency {level}: completion tokens {counts}; failed requests {failed}", header]
    for label, key in (
        ("TTFT p50 (ms)", "ttft_p50"),
        ("TTFT p99 (ms)", "ttft_p99"),
        ("end-to-end p50 (ms)", "e2e_p50"),
    ):
        line = (
            f"  {label:22}{figures[key + '_direct_ms']:10.1f}"
            f"{figures[key + '_coordinator_ms']:13.1f}{figures[key + '_added_ms']:+10.1f}"
        )
        if tls:
            line += f"{figures[key + '_tls_ms']:10.1f}{figures['tls_' + key + '_added_ms']:+11.1f}"
        lines.append(line)
    line = (
        f"  {'tokens/s':22}{figures['tokens_per_s_direct']:10.1f}"
        f"{figures['tokens_per_s_coordinator']:13.1f}"
        f"{'':3}ratio {figures['throughput_ratio']:.2f}"
    )
    if tls:
        line += (
            f"{figures['tokens_per_s_tls']:8.1f}{'':4}ratio {figures['tls_throughput_ratio']:.2f}"
        )
    lines.append(line)
    return "\n".join(lines)


def _timings(sample: Sample | None) -> dict[str, float] | None:
    if sample is None:
        return None
    return {"ttft_s": sample.ttft_s, "e2e_s": sample.e2e_s, "tokens": sample.tokens}


def report(
    args: argparse.Namespace,
    prompts: Sequence[str],
    paths: Mapping[str, dict[int, Batch]],
    server_errors: Sequence[str],
    load: tuple[float, float],
) -> bool:
    """Prints the tables, writes --json; False when a request failed or the paths disagreed.
    ``paths`` maps each path that ran ("direct", "coordinator", maybe "tls") to its batches."""
    import torch

    ok = True
    tls = "tls" in paths
    figures_by_level: dict[str, Any] = {}
    print()
    for level in args.concurrency:
        batches = {path: by_level[level] for path, by_level in paths.items()}
        problems = [
            problem
            for path, batch in batches.items()
            if path != "direct"
            for problem in mismatches(batches["direct"], batch, prompts, name=path)
        ]
        for problem in problems:
            print(f"MISMATCH at concurrency {level}: {problem}", file=sys.stderr)
        for path, batch in batches.items():
            for error in batch.errors:
                print(f"FAILED at concurrency {level}, {path}: {error}", file=sys.stderr)
        ok = ok and not problems and not any(batch.errors for batch in batches.values())
        figures = summary(batches)
        figures_by_level[str(level)] = {
            **figures,
            "mismatches": len(problems),
            "errors": {path: batch.errors for path, batch in batches.items()},
            **{
                path: [_timings(sample) for sample in batch.samples]
                for path, batch in batches.items()
            },
        }
        print(table(level, figures, tls=tls))
        print()
    for error in server_errors:
        print(f"SERVER ERROR {error}", file=sys.stderr)
    ok = ok and not server_errors
    print("TTFT = first visible text; added = coordinator - direct; ratio = coordinator/direct.")
    if tls:
        print("TLS = HTTPS + TLS gRPC; TLS added = TLS - coordinator; its ratio = TLS/coordinator.")
    print("The coordinator path's coordinator, miner and client share this machine's cores.")
    print(f"load average (1 min) before {load[0]:.2f}, after {load[1]:.2f}")
    if args.json:
        document = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average_before_after": list(load),
            "model": args.model,
            "requests": len(prompts),
            "max_tokens": args.max_tokens,
            "levels": figures_by_level,
            "server_errors": list(server_errors),
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    if not ok:
        print("FAILED: a request or the server failed, or the paths disagreed", file=sys.stderr)
    return ok
