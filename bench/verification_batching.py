"""Honest margins under batching: how far a batching miner's tokens are from a scorer's view.

A batched forward pass is not bit for bit an unbatched one (other matrix shapes, other
reduction orders), and a scorer's teacher-forced pass is chunked and packed with other work.
For each model this generates ``--jobs`` chat jobs twice on one ``TorchEngine`` (float32 on the
CPU, or ``--dtype``): alone (one at a time) and all at once in batches of ``--batch``; then
re-scores every batched job on the same engine, again all at once. Reported per run: the
largest margin, the most disagreeing tokens (margin above the judge's 1.0) in a job, the
largest and the mean ``|claimed - scored|`` log-probability per token, and how many tokens
differ between the alone and the batched runs (greedy near-ties may flip).

Run: ``.venv/bin/python -m bench.verification_batching [--model tiny --model smollm2]``
Results: docs/verification.md, "Batching".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.common import model_source
from bench.verification_smollm2 import QUESTIONS
from coordinator.verification.judge import Thresholds

# Greedy, mild and hot sampling, with and without truncation.
SAMPLINGS: tuple[dict[str, float | int], ...] = (
    {"temperature": 0.0},
    {"temperature": 0.7, "top_p": 0.9},
    {"temperature": 1.0},
    {"temperature": 1.0, "top_k": 40},
)


@dataclass(frozen=True)
class MarginReport:
    """One model's honest deviations under batching."""

    model: str
    dtype: str
    jobs: int
    batch: int
    tokens: int  # completion tokens scored
    largest_margin: float
    most_disagreeing_in_a_job: int  # tokens with margin > the judge's margin_limit
    largest_abs_dlogprob: float
    mean_abs_dlogprob: float
    tokens_differing_from_alone: int  # positions where the batched run picked another token


async def measure(
    label: str, *, jobs: int, batch: int, max_tokens: int, dtype: str | None, work: Path
) -> MarginReport:
    from coordinator.api import ChatMessage
    from coordinator.text.tokenization import ModelTokenizer
    from miner.engine.base import GenerationRequest, SamplingParams, ScoreRequest
    from miner.engine.torch_engine import TorchEngine

    source = model_source(label, work)
    tokenizer = ModelTokenizer.from_source(source, name=label)
    requests = []
    for index in range(jobs):
        question = QUESTIONS[index % len(QUESTIONS)]
        prompt = tokenizer.encode_chat([ChatMessage(role="user", content=question)])
        sampling = SamplingParams(max_tokens=max_tokens, seed=index, **SAMPLINGS[index % 4])  # type: ignore[arg-type]
        requests.append(
            GenerationRequest(job_id=f"honest-{index}", prompt_token_ids=prompt, sampling=sampling)
        )
    limit = Thresholds().margin_limit
    async with TorchEngine.load(
        label, source, dtype=dtype, max_concurrency=batch, cache_dir=work / "model-cache"
    ) as engine:

        async def run(request: GenerationRequest) -> list[tuple[int, float]]:
            return [(t.token_id, t.logprob) async for t in engine.generate(request)]

        alone = [await run(request) for request in requests]
        batched = await asyncio.gather(*(run(request) for request in requests))
        scores = await asyncio.gather(
            *(
                engine.score(
                    ScoreRequest(
                        noise_job_id=request.job_id,
                        prompt_token_ids=request.prompt_token_ids,
                        completion_token_ids=[token for token, _ in tokens],
                        sampling=request.sampling,
                    )
                )
                for request, tokens in zip(requests, batched, strict=True)
            )
        )
        info = engine.info
    deviations = [
        abs(claimed - scored)
        for tokens, score in zip(batched, scores, strict=True)
        for (_, claimed), scored in zip(tokens, score.logprobs, strict=True)
    ]
    margins = [margin for score in scores for margin in score.margins]
    differing = sum(
        sum(1 for (a, _), (b, _) in zip(one, other, strict=False) if a != b)
        for one, other in zip(alone, batched, strict=True)
    )
    return MarginReport(
        model=label,
        dtype=info.dtype,
        jobs=jobs,
        batch=batch,
        tokens=len(margins),
        largest_margin=max(margins),
        most_disagreeing_in_a_job=max(sum(m > limit for m in s.margins) for s in scores),
        largest_abs_dlogprob=max(deviations),
        mean_abs_dlogprob=math.fsum(deviations) / len(deviations),
        tokens_differing_from_alone=differing,
    )


def table(reports: Sequence[MarginReport]) -> str:
    lines = [
        "| model | dtype | jobs x batch | tokens | largest margin | most disagreeing in a job "
        "| largest abs dlogprob | mean abs dlogprob | tokens differing from alone |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in reports:
        lines.append(
            f"| {r.model} | {r.dtype} | {r.jobs} x {r.batch} | {r.tokens} "
            f"| {r.largest_margin:.4f} | {r.most_disagreeing_in_a_job} "
            f"| {r.largest_abs_dlogprob:.4f} | {r.mean_abs_dlogprob:.5f} "
            f"| {r.tokens_differing_from_alone} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="tiny, smollm2 or a path (repeatable)")
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", help="float32 (default on CPU), bfloat16 or float16")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    reports = []
    with tempfile.TemporaryDirectory(prefix="meshmint-bench-") as scratch:
        for label in args.model or ["tiny", "smollm2"]:
            reports.append(
                asyncio.run(
                    measure(
                        label,
                        jobs=args.jobs,
                        batch=args.batch,
                        max_tokens=args.max_tokens,
                        dtype=args.dtype,
                        work=Path(scratch),
                    )
                )
            )
    import sys

    sys.stdout.write(table(reports))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in reports], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
