"""Engine against engine on one device: ``TorchEngine`` and ``VllmEngine`` side by side.

For each model and level N, the closed loop of ``bench/engine_load.py`` (N clients, staggered
warm-up, steady window) runs on each engine in turn, loaded fresh with ``max_concurrency`` N;
the levels alternate between the engines so drift on a shared machine hits both alike. Both
sample with ``miner.sampler`` (greedy, the workload of ``bench/engine.py``), so they do the same
work. Reported per level: aggregate tokens/s, TTFT p50/p99, and the ratio of each engine's
tokens/s to the first one's.

Run on a GPU box with ``pip install 'meshmint[vllm]'``::

    python -m bench.engine_compare --model llama25m --model smollm2 --device cuda

Without vLLM, ``--engines torch`` checks the bench itself on any machine.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import model_source, positive_ints, unwind_on_signals
from bench.engine_load import PathFigures, Timing, closed_loop, figures, requests_per_client
from bench.engine_paths import Workload, prepare

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("torch", "vllm")


async def engine_level(
    workload: Workload, engine_kind: str, concurrency: int, per_client: int, *, device: str
) -> PathFigures:
    """The closed loop at ``concurrency`` on a fresh engine of ``engine_kind``."""
    from miner.engine.base import GenerationRequest

    if engine_kind == "vllm":
        from miner.engine.vllm_engine import VllmEngine

        load = VllmEngine.load
    else:
        from miner.engine.torch_engine import TorchEngine

        load = TorchEngine.load  # type: ignore[assignment]
    async with load(
        workload.label,
        workload.source,
        device=device,
        max_concurrency=concurrency,
        kv_cache_tokens=workload.kv_cache_tokens(concurrency),
        cache_dir=workload.cache_dir,
    ) as engine:

        async def one(client: int, index: int, max_tokens: int) -> Timing:
            request = GenerationRequest(
                job_id=f"compare-{engine_kind}-{concurrency}-{client}-{index}",
                prompt_token_ids=workload.prompts[(client + index) % len(workload.prompts)],
                sampling=workload.sampling(max_tokens),
            )
            sent = time.perf_counter()
            arrivals = [time.perf_counter() async for _ in engine.generate(request)]
            return Timing(sent, tuple(arrivals), time.perf_counter())

        timings = await closed_loop(
            one, clients=concurrency, per_client=per_client, max_tokens=workload.max_tokens
        )
    return figures(timings)


def compare(label: str, args: argparse.Namespace) -> list[str]:
    """The table for one model."""
    source = model_source(label, args.work_dir)
    workload = asyncio.run(
        prepare(label, source, max_tokens=args.max_tokens, cache_dir=args.cache_dir)
    )
    columns = [f"{e} tok/s | {e} TTFT p50 / p99 (ms)" for e in args.engines]
    columns += [f"{e} ÷ {args.engines[0]}" for e in args.engines[1:]]
    rows = [
        f"{label}: {workload.parameters / 1e6:.2f}M parameters on {args.device}, "
        f"{len(workload.prompts)} prompts x {args.max_tokens} tokens",
        "| N | " + " | ".join(columns) + " |",
    ]
    for level in sorted(args.concurrency):
        per_client = requests_per_client(level, requests=args.requests, min_rounds=args.min_rounds)
        measured = {
            kind: asyncio.run(engine_level(workload, kind, level, per_client, device=args.device))
            for kind in args.engines
        }
        for kind, result in measured.items():
            print(
                f"   {kind:<6} c={level:<3} {result.tokens_per_s:8.1f} tok/s  TTFT p50 "
                f"{result.ttft_p50_ms:6.0f} ms  p99 {result.ttft_p99_ms:6.0f} ms",
                flush=True,
            )
        base = measured[args.engines[0]].tokens_per_s
        cells = [
            f"{r.tokens_per_s:.1f} | {r.ttft_p50_ms:.0f} / {r.ttft_p99_ms:.0f}"
            for r in measured.values()
        ]
        ratios = [f"{measured[e].tokens_per_s / base:.2f}" for e in args.engines[1:]]
        rows.append(f"| {level} | " + " | ".join(cells + ratios) + " |")
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", action="append", help="tiny, llama25m, smollm2, or a path")
    parser.add_argument("--engines", default=",".join(ENGINES), help="default: torch,vllm")
    parser.add_argument("--device", default="cuda", help="default: cuda")
    parser.add_argument("--concurrency", type=positive_ints, default=[1, 4, 16, 32])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--min-rounds", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "demo-data")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "demo-data" / "model-cache")
    args = parser.parse_args(argv)
    args.engines = [kind.strip() for kind in args.engines.split(",") if kind.strip()]
    if not args.engines or set(args.engines) - set(ENGINES):
        parser.error(f"--engines: any of {','.join(ENGINES)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    unwind_on_signals()
    tables = [compare(label, args) for label in args.model or ["llama25m"]]
    for rows in tables:
        print()
        print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
