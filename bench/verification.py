"""Calibrates and checks the spot-check judge (``coordinator/verification/judge.py``).

Every variant of ``bench/verification_variants.py`` (honest miners on other dtypes, batch sizes
and thread counts; cheats) answers the same fixed-seed jobs with the reference sampler; each
output is re-scored as a scoring miner does (``miner.scorer`` on the fp32 model, one job at a
time) and judged with ``Thresholds()`` (the defaults) or the values given on the command line.

Reported per variant: the fraction of jobs that fail (for a cheat, of the jobs it tampered
with), the fraction of ``MINERS`` simulated miners flagged within their first ``--miner-jobs``
checked jobs (job verdicts or the pooled verdict after each job; each miner's jobs a seeded
random draw of the variant's), token statistics, and the cost of scoring relative to generating
the same jobs. The exit status is 1 when a target of issue 4 is missed (listed on stderr).

``--raw`` dumps what the judge saw, for ``bench/verification_rejudge.py``. Results are in
docs/benchmarks.md, "Verification".

Run: ``.venv/bin/python -m bench.verification [--jobs 200] [--model demo|tiny|smollm2]
[--json FILE]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bench.common import load_average, unwind_on_signals
from bench.verification_generate import Output, Scored, score
from bench.verification_models import ROOT, load_model, make_jobs, prepare_model_dir
from bench.verification_variants import Context, Variant, variants
from coordinator.verification.judge import (
    PooledStats,
    Thresholds,
    Verdict,
    judge_job,
    structure_problems,
)

GROSS = ("smaller model", "10% substitution", "truncation", "random tokens", "replay")
SUBTLE = ("int4 weights", "5% weight noise", "1% substitution")
GROSS_TARGET, SUBTLE_TARGET, COST_TARGET = 0.99, 0.95, 0.1
MINERS = 500  # simulated miners per variant, each checked on a random draw of its jobs


@dataclass
class Row:
    """One variant's figures."""

    name: str  # the variant
    honest: bool  # must never fail
    jobs: int  # jobs answered
    tampered: int  # jobs the cheat changed (all, for a changed model)
    failed: int  # of the counted jobs (tampered ones for a cheat, all for honest), how many failed
    miners: int  # simulated miners
    miners_flagged: int  # flagged within their first miner_jobs checked jobs
    pool_all_passed: bool | None  # honest only: the pool of all its jobs passes
    tokens: int  # completion tokens scored
    mean_abs_dlogprob: float  # over all its tokens
    disagreeing_fraction: float  # over all its tokens
    max_finite_margin: float  # largest finite margin of any of its tokens
    # largest finite stop margin of a claimed non-stop token (> 0: the sampler would have
    # stopped there); None when no stop token was ever in reach
    max_stop_margin: float | None
    max_job_mean_dlogprob: float  # largest per-job mean |dlogprob|
    generate_s: float  # wall seconds generating
    score_s: float  # wall seconds scoring
    score_forward_s: float  # of which in the teacher-forced forward pass
    reasons: list[str]  # a few failure reasons, as the miner would see them

    @property
    def counted(self) -> int:
        return self.jobs if self.honest else self.tampered

    @property
    def fail_rate(self) -> float:
        return self.failed / self.counted if self.counted else float("nan")

    @property
    def miner_rate(self) -> float:
        return self.miners_flagged / self.miners if self.miners else float("nan")


def flagged_miners(
    verdicts: Sequence[Verdict],
    thresholds: Thresholds,
    *,
    per_miner: int,
    seed: int,
    miners: int = MINERS,
) -> int:
    """How many of ``miners`` simulated miners are flagged within their ``per_miner`` checked
    jobs (a failed job, or a failed pooled verdict after any job). Each miner's checked jobs are
    a seeded random draw of distinct jobs of the variant, in random order."""
    rng = random.Random(seed)
    flagged = 0
    for _ in range(miners if len(verdicts) >= per_miner else 0):
        pool = PooledStats()
        for index in rng.sample(range(len(verdicts)), per_miner):
            pool.add(verdicts[index])
            pooled = pool.verdict(thresholds)
            if not verdicts[index].passed or (pooled is not None and not pooled.passed):
                flagged += 1
                break
    return flagged


def run_variant(
    variant: Variant,
    ctx: Context,
    thresholds: Thresholds,
    *,
    per_miner: int,
    raw: list[Any] | None,
) -> Row:
    """Runs one variant, scores and judges every answer, and simulates its miners."""
    result = variant.run(ctx)
    verdicts, score_s, score_forward_s, max_margin, job_means = [], 0.0, 0.0, 0.0, []
    max_stop = -math.inf
    for output, tampered in zip(result.outputs, result.tampered, strict=True):
        scored = score(ctx.model, output.job, output.tokens)
        score_s += scored.forward_s + scored.rows_s
        score_forward_s += scored.forward_s
        scores = scored.scores
        claim = output.claim(ctx.vocab)
        verdict = judge_job(claim, scores, thresholds)
        verdicts.append(verdict)
        finite = [m for m in scores.margins if math.isfinite(m)]
        max_margin = max([max_margin, *finite])
        stops = output.job.params.stop_token_ids
        max_stop = max(
            [
                max_stop,
                *(
                    value
                    for token, value in zip(output.tokens, scores.stop_margins, strict=False)
                    if token not in stops and math.isfinite(value)
                ),
            ]
        )
        if verdict.tokens:
            job_means.append(verdict.sum_abs_dlogprob / verdict.tokens)
        if raw is not None:
            raw.append(_raw_record(variant, output, scored, structure_problems(claim), tampered))
    counted = [v for v, t in zip(verdicts, result.tampered, strict=True) if variant.honest or t]
    pool_all = PooledStats()
    for verdict in verdicts:
        pool_all.add(verdict)
    overall = pool_all.verdict(thresholds)
    miners = MINERS if len(verdicts) >= per_miner else 0
    flagged = flagged_miners(verdicts, thresholds, per_miner=per_miner, seed=ctx.seed)
    tokens = max(pool_all.tokens, 1)
    return Row(
        name=variant.name,
        honest=variant.honest,
        jobs=len(verdicts),
        tampered=sum(result.tampered),
        failed=sum(not v.passed for v in counted),
        miners=miners,
        miners_flagged=flagged,
        pool_all_passed=(overall is None or overall.passed) if variant.honest else None,
        tokens=pool_all.tokens,
        mean_abs_dlogprob=pool_all.sum_abs_dlogprob / tokens,
        disagreeing_fraction=pool_all.disagreeing / tokens,
        max_finite_margin=max_margin,
        max_stop_margin=max_stop if math.isfinite(max_stop) else None,
        max_job_mean_dlogprob=max(job_means, default=0.0),
        generate_s=result.generate_s,
        score_s=score_s,
        score_forward_s=score_forward_s,
        reasons=sorted({r for v in counted for r in v.reasons})[:3],
    )


def _raw_record(
    variant: Variant, output: Output, scored: Scored, structure: list[str], tampered: bool
) -> dict[str, Any]:
    params = output.job.params

    def plain(values: Sequence[float] | None) -> list[float | str]:
        return [v if math.isfinite(v) else str(v) for v in values or ()]

    return {
        "variant": variant.name,
        "honest": variant.honest,
        "tampered": tampered,
        "job_id": output.job.job_id,
        "sampling": [params.temperature, params.top_p, params.top_k],
        "finish": output.finish,
        "stop_last": bool(output.tokens) and output.tokens[-1] in params.stop_token_ids,
        "margins": plain(scored.scores.margins),
        "stop_margins": plain(scored.scores.stop_margins),
        "dlogprobs": plain(
            [c - s for c, s in zip(output.logprobs, scored.scores.logprobs, strict=False)]
        ),
        "structure": structure,
    }


def misses(rows: Sequence[Row]) -> list[str]:
    """The targets of issue 4 that these rows miss."""
    found = []
    by_name = {row.name: row for row in rows}
    for row in rows:
        if row.honest and (row.failed or row.miners_flagged or row.pool_all_passed is False):
            found.append(f"{row.name}: honest miner failed ({row.failed} jobs)")
    for name in GROSS:
        if name in by_name and not by_name[name].fail_rate >= GROSS_TARGET:
            found.append(f"{name}: per-job detection {by_name[name].fail_rate:.1%} < 99%")
    for name in SUBTLE:
        if name in by_name and not by_name[name].miner_rate >= SUBTLE_TARGET:
            found.append(f"{name}: per-miner detection {by_name[name].miner_rate:.1%} < 95%")
    ratio = cost_ratio(rows)
    if not math.isnan(ratio) and ratio > COST_TARGET:
        found.append(f"scoring costs {ratio:.3f} of generation > {COST_TARGET}")
    return found


def cost_ratio(rows: Sequence[Row], name: str = "fp32 batch 1", *, forward: bool = False) -> float:
    """Scoring wall time (or only its forward pass) over generation wall time, same jobs."""
    row = next((r for r in rows if r.name == name), None)
    if row is None or not row.generate_s:
        return float("nan")
    return (row.score_forward_s if forward else row.score_s) / row.generate_s


def markdown(rows: Sequence[Row], *, per_miner: int) -> str:
    lines = [
        f"| variant | jobs (tampered) | jobs failed | miners flagged in {per_miner} jobs "
        "| mean abs dlogprob | disagreeing | max finite margin | max stop margin "
        "| max job mean dlogprob |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        jobs = f"{row.jobs}" if row.honest else f"{row.jobs} ({row.tampered})"
        kind = "honest: " if row.honest else "cheat: "
        lines.append(
            f"| {kind}{row.name} | {jobs} | {row.failed}/{row.counted} ({row.fail_rate:.1%}) "
            f"| {row.miners_flagged}/{row.miners} ({row.miner_rate:.0%}) "
            f"| {row.mean_abs_dlogprob:.4f} | {row.disagreeing_fraction:.2%} "
            f"| {row.max_finite_margin:.3f} | {_optional(row.max_stop_margin)} "
            f"| {row.max_job_mean_dlogprob:.4f} |"
        )
    return "\n".join(lines)


def _optional(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200, help="jobs per variant")
    parser.add_argument("--model", choices=("demo", "tiny", "smollm2"), default="demo")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "demo-data", help="model cache")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--miner-jobs", type=int, default=10, help="checked jobs per miner")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", help="comma-separated names to run (default: all)")
    parser.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a Thresholds field, e.g. margin_limit=0.5 (repeatable)",
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--raw", type=Path, help="write per-token margins and dlogprobs here")
    args = parser.parse_args(argv)
    unwind_on_signals()
    thresholds = parse_thresholds(args.threshold)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    load = load_average(warn=True)
    model_dir = prepare_model_dir(args.model, args.work_dir)
    model, vocab = load_model(model_dir, args.model)
    jobs = make_jobs(model_dir, vocab, count=args.jobs, seed=args.seed, kind=args.model)
    ctx = Context(model=model, vocab=vocab, jobs=jobs, batch_size=args.batch_size, seed=args.seed)
    wanted = set(args.variants.split(",")) if args.variants else None
    rows: list[Row] = []
    raw: list[Any] = []
    started = time.perf_counter()
    for variant in variants(args.seed):
        if wanted is not None and variant.name not in wanted and variant.name != "fp32 batch 8":
            continue
        row = run_variant(
            variant,
            ctx,
            thresholds,
            per_miner=args.miner_jobs,
            raw=raw if args.raw else None,
        )
        rows.append(row)
        print(
            f"{row.name}: {row.failed}/{row.counted} failed, {row.miners_flagged}/{row.miners}"
            f" miners flagged (gen {row.generate_s:.1f} s, score {row.score_s:.1f} s)",
            file=sys.stderr,
        )
    wall = time.perf_counter() - started
    print(markdown(rows, per_miner=args.miner_jobs))
    ratio, batched = cost_ratio(rows), cost_ratio(rows, "fp32 batch 8")
    print(
        f"\nscoring / generation wall time: {ratio:.3f} against one job at a time,"
        f" {batched:.3f} against batches of {args.batch_size};"
        f" the forward pass alone: {cost_ratio(rows, forward=True):.3f}"
    )
    print(f"model {args.model} ({model_dir}), {args.jobs} jobs per variant, {wall:.0f} s")
    print(f"thresholds: {thresholds}")
    missed = misses(rows)
    for line in missed:
        print(f"target missed: {line}", file=sys.stderr)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "date": datetime.now(UTC).isoformat(timespec="seconds"),
                    "machine": f"{platform.machine()} {platform.processor()}".strip(),
                    "load_average": load,
                    "torch": torch.__version__,
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "thresholds": dataclasses.asdict(thresholds),
                    "cost_ratio": {
                        "batch_1": ratio,
                        "batched": batched,
                        "forward_only_batch_1": cost_ratio(rows, forward=True),
                    },
                    "rows": [dataclasses.asdict(row) for row in rows],
                    "missed": missed,
                },
                indent=2,
            )
            + "\n"
        )
    if args.raw:
        args.raw.write_text(json.dumps(raw) + "\n")
    return 1 if missed else 0


def parse_thresholds(overrides: Sequence[str]) -> Thresholds:
    values: dict[str, Any] = {}
    fields = {field.name: field.type for field in dataclasses.fields(Thresholds)}
    for item in overrides:
        name, _, text = item.partition("=")
        if name not in fields:
            raise SystemExit(f"unknown threshold {name!r}; one of {sorted(fields)}")
        kind = str(fields[name])
        values[name] = (
            int(text)
            if kind == "int"
            else text.lower() in ("1", "true")
            if kind == "bool"
            else float(text)
        )
    return Thresholds(**values)


if __name__ == "__main__":
    raise SystemExit(main())
