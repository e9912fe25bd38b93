"""The miners of the verification benchmark: honest variants and cheats.

Honest variants differ from the reference only in ways real hardware differs (dtype, batching,
threads); cheats save work or tamper with the output. Every variant answers the same jobs; a
cheat's job counts as *tampered* when its output differs in kind from an honest one (a job that
a 1% substitution happened to leave alone is not).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bench import verification_models as models
from bench.verification_generate import Output, Pick, generate, honest_pick
from bench.verification_models import Job, Vocab
from miner import sampler


@dataclass
class Context:
    """What every variant is run with."""

    model: Any  # the fp32 reference model
    vocab: Vocab  # vocabulary facts
    jobs: list[Job]  # the traffic, the same for every variant
    batch_size: int  # rows per batch where a variant batches
    seed: int  # for the cheats' own randomness
    reference: list[Output] | None = None  # honest batched fp32 outputs, once generated


@dataclass
class Result:
    """A variant's outputs for the context's jobs."""

    outputs: list[Output]  # one per job, in order
    tampered: list[bool]  # per job: did the cheat change anything
    generate_s: float  # wall seconds spent generating (0 for outputs made without a model)


@dataclass(frozen=True)
class Variant:
    """One kind of miner."""

    name: str  # short label for the table
    honest: bool  # must never fail
    what: str  # one line for the docs
    run: Callable[[Context], Result]  # produces its outputs


def _plain(
    build: Callable[[Any], Any] | None = None,
    *,
    cheat: bool = False,
    batched: bool = True,
    threads: int = 1,
) -> Callable[[Context], Result]:
    """Generation with the reference sampler on ``build(reference model)``."""

    def run(ctx: Context) -> Result:
        model = build(ctx.model) if build else ctx.model
        torch.set_num_threads(threads)
        try:
            size = ctx.batch_size if batched else 1
            outputs, seconds = generate([model], ctx.jobs, ctx.vocab, batch_size=size)
        finally:
            torch.set_num_threads(1)
        return Result(outputs, [cheat] * len(outputs), seconds)

    return run


def _reference(ctx: Context) -> Result:
    result = _plain()(ctx)
    ctx.reference = result.outputs
    return result


class _Tampering:
    """A ``Pick`` that changes some rows' tokens and remembers which jobs it touched."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.touched: set[str] = set()

    def rng(self, job: Job, salt: str) -> random.Random:
        return random.Random(f"{self.ctx.seed}/{job.job_id}/{salt}")

    def cut(self, job: Job) -> int:
        """Where a truncating cheat stops: a quarter to three quarters of max_tokens."""
        limit = job.params.max_tokens
        return self.rng(job, "cut").randint(limit // 4, 3 * limit // 4)

    def run(self, ctx: Context, pick: Pick, extra: Sequence[Any] = ()) -> Result:
        outputs, seconds = generate(
            [ctx.model, *extra], ctx.jobs, ctx.vocab, batch_size=ctx.batch_size, pick=pick
        )
        return Result(outputs, [o.job.job_id in self.touched for o in outputs], seconds)


def _logprob(row: torch.Tensor, token: int) -> float:
    return float(sampler.logprobs_fp32(row)[token].item())


def _substitution(rate: float) -> Callable[[Context], Result]:
    """Replaces each token with probability ``rate`` by a random other (non-stop) token, reports
    its true log-probability, and goes on from it."""

    def run(ctx: Context) -> Result:
        tampering = _Tampering(ctx)

        def pick(job: Job, position: int, rows: Sequence[torch.Tensor]) -> tuple[int, float]:
            token, logprob = honest_pick(job, position, rows)
            rng = tampering.rng(job, f"sub{position}")
            if rng.random() >= rate:
                return token, logprob
            other = token
            while other == token or other in ctx.vocab.stop_ids:
                other = rng.randrange(ctx.vocab.size)
            tampering.touched.add(job.job_id)
            return other, _logprob(rows[0], other)

        return tampering.run(ctx, pick)

    return run


def _truncation(ctx: Context) -> Result:
    """Stops early with a forged end token (its true log-probability claimed)."""
    tampering = _Tampering(ctx)

    def pick(job: Job, position: int, rows: Sequence[torch.Tensor]) -> tuple[int, float]:
        token, logprob = honest_pick(job, position, rows)
        if position < tampering.cut(job) or token in ctx.vocab.stop_ids:
            return token, logprob
        tampering.touched.add(job.job_id)
        end = ctx.vocab.stop_ids[0]
        return end, _logprob(rows[0], end)

    return tampering.run(ctx, pick)


def _skipped_stop(ctx: Context) -> Result:
    """At the first position where the reference sampler picks a stop token, the best other
    token by the sampler's own scores (its true log-probability claimed), and on from it: the
    output is padded past its end, every token the sampler's best but one."""
    tampering = _Tampering(ctx)
    stops = list(ctx.vocab.stop_ids)

    def pick(job: Job, position: int, rows: Sequence[torch.Tensor]) -> tuple[int, float]:
        token, logprob = honest_pick(job, position, rows)
        if token not in stops or job.job_id in tampering.touched:  # one stop skipped a job
            return token, logprob
        scores = sampler.sampling_scores(rows[0], job.params, job_id=job.job_id, position=position)
        scores[stops] = -math.inf
        if not math.isfinite(float(scores.max())):  # nothing else can be picked
            return token, logprob
        tampering.touched.add(job.job_id)
        other = int(torch.argmax(scores))
        return other, _logprob(rows[0], other)

    return tampering.run(ctx, pick)


def _prefix_then_smaller(ctx: Context) -> Result:
    """The real model for a prefix, then the smaller model for the rest."""
    tampering = _Tampering(ctx)

    def pick(job: Job, position: int, rows: Sequence[torch.Tensor]) -> tuple[int, float]:
        if position < tampering.cut(job):
            return honest_pick(job, position, rows)
        tampering.touched.add(job.job_id)
        return honest_pick(job, position, rows[1:])

    return tampering.run(ctx, pick, extra=[models.fewer_layers(ctx.model)])


def _random_tokens(ctx: Context) -> Result:
    """Random non-stop tokens up to max_tokens, with made-up log-probabilities."""
    outputs = []
    for job in ctx.jobs:
        rng = random.Random(f"{ctx.seed}/{job.job_id}/random")
        budget = min(job.params.max_tokens, ctx.vocab.context_length - len(job.prompt))
        tokens: list[int] = []
        while len(tokens) < budget:
            token = rng.randrange(ctx.vocab.size)
            if token not in ctx.vocab.stop_ids:
                tokens.append(token)
        logprobs = [-rng.uniform(0.05, 3.0) for _ in tokens]
        outputs.append(Output(job=job, tokens=tokens, logprobs=logprobs, finish="length"))
    return Result(outputs, [True] * len(outputs), 0.0)


def _replay(ctx: Context) -> Result:
    """Each job answered with the (honest) answer of the next job's prompt, cut to fit."""
    assert ctx.reference is not None, "the reference variant runs first"
    outputs = []
    for index, job in enumerate(ctx.jobs):
        other = ctx.reference[(index + 1) % len(ctx.reference)]
        budget = min(job.params.max_tokens, ctx.vocab.context_length - len(job.prompt))
        tokens, logprobs = other.tokens[:budget], other.logprobs[:budget]
        finish = other.finish
        if len(other.tokens) > budget:
            finish = "stop" if tokens[-1] in ctx.vocab.stop_ids else "length"
        outputs.append(Output(job=job, tokens=tokens, logprobs=logprobs, finish=finish))
    return Result(outputs, [True] * len(outputs), 0.0)


def variants(seed: int) -> list[Variant]:
    """Every variant, the batched fp32 reference first (replay needs its outputs)."""

    def noisy(model: Any) -> Any:
        return models.noisy_weights(model, fraction=0.05, seed=seed + 1)

    return [
        Variant("fp32 batch 8", True, "fp32, batches of 8, left-padded", _reference),
        Variant("fp32 batch 1", True, "fp32, one job at a time", _plain(batched=False)),
        Variant("fp32 2 threads", True, "fp32, batches of 8, 2 torch threads", _plain(threads=2)),
        Variant("bf16 compute", True, "model cast to bfloat16", _plain(models.bf16_compute)),
        Variant("fp16 compute", True, "model cast to float16", _plain(models.fp16_compute)),
        Variant("bf16 weights", True, "weights rounded to bfloat16", _plain(models.bf16_weights)),
        Variant(
            "smaller model", False, "last block dropped", _plain(models.fewer_layers, cheat=True)
        ),
        Variant(
            "int4 weights", False, "int4, groups of 32", _plain(models.int4_weights, cheat=True)
        ),
        Variant(
            "5% weight noise", False, "noise 5% of each tensor's std", _plain(noisy, cheat=True)
        ),
        Variant("1% substitution", False, "1% of tokens random", _substitution(0.01)),
        Variant("10% substitution", False, "10% of tokens random", _substitution(0.10)),
        Variant("truncation", False, "forged end token", _truncation),
        Variant("skipped stop", False, "goes on past its first stop", _skipped_stop),
        Variant("random tokens", False, "uniform random tokens", _random_tokens),
        Variant("replay", False, "another prompt's answer", _replay),
        Variant("prefix + smaller", False, "honest prefix, then smaller", _prefix_then_smaller),
    ]
