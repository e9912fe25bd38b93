"""Generation and scoring for the verification benchmark, through the miner's own code.

Generation picks every token with the reference sampler (``miner.sampler.sample``) from the
logits of a KV-cached forward pass, like ``TorchEngine``: one job at a time, or a batch of jobs
left-padded to a common length with an attention mask and per-row positions (how a batching
server runs). A cheat changes the token a row emits through a ``Pick`` hook, which sees the
row's logits from each of the models run in lockstep.

Scoring is what a scoring miner does: ``miner.scorer.teacher_forced_logits`` on the fp32
reference model, then ``miner.scorer.score_rows``.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bench.verification_models import Job, Vocab
from coordinator.verification.judge import Claim, Scores
from miner import sampler, scorer

# (job, position, that row's logits from each model) -> (token, claimed logprob)
Pick = Callable[[Job, int, Sequence[torch.Tensor]], tuple[int, float]]


@dataclass
class Output:
    """What a miner delivers for one job."""

    job: Job  # the request
    tokens: list[int]  # completion token ids
    logprobs: list[float]  # claimed, one per token
    finish: str  # "stop" or "length"

    def claim(self, vocab: Vocab) -> Claim:
        """The output as the judge sees it."""
        return Claim(
            prompt_token_ids=self.job.prompt,
            token_ids=tuple(self.tokens),
            logprobs=tuple(self.logprobs),
            finish_reason=self.finish,
            max_tokens=self.job.params.max_tokens,
            stop_token_ids=frozenset(vocab.stop_ids),
            vocab_size=vocab.size,
            context_length=vocab.context_length,
        )


def honest_pick(job: Job, position: int, rows: Sequence[torch.Tensor]) -> tuple[int, float]:
    """The reference sampler on the first model's logits."""
    return sampler.sample(rows[0], job.params, job_id=job.job_id, position=position)


def generate(
    models: Sequence[Any],
    jobs: Sequence[Job],
    vocab: Vocab,
    *,
    batch_size: int,
    pick: Pick = honest_pick,
) -> tuple[list[Output], float]:
    """Runs ``jobs`` in batches of ``batch_size``; returns the outputs and the wall seconds."""
    outputs: list[Output] = []
    started = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(jobs), batch_size):
            chunk = jobs[first : first + batch_size]
            outputs.extend(_generate_batch(models, chunk, vocab, pick=pick))
    return outputs, time.perf_counter() - started


def _generate_batch(
    models: Sequence[Any], jobs: Sequence[Job], vocab: Vocab, *, pick: Pick
) -> list[Output]:
    width = max(len(job.prompt) for job in jobs)
    padded = [[vocab.pad_id] * (width - len(job.prompt)) + list(job.prompt) for job in jobs]
    ids = torch.tensor(padded, dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(job.prompt)) + [1] * len(job.prompt) for job in jobs])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # A single job runs exactly as TorchEngine runs it: no mask and default positions.
    single = len(jobs) == 1
    caches: list[Any] = [None] * len(models)
    outputs = [Output(job=job, tokens=[], logprobs=[], finish="length") for job in jobs]
    budgets = [min(job.params.max_tokens, vocab.context_length - len(job.prompt)) for job in jobs]
    done = [budget <= 0 for budget in budgets]
    step = 0
    while not all(done):
        rows = []
        for index, model in enumerate(models):
            extra: dict[str, Any] = {} if single else {"attention_mask": mask}
            if not single:
                extra["position_ids"] = positions
            if caches[index] is None:
                extra["logits_to_keep"] = 1
            name = _cache_argument(model)
            extra[name] = caches[index]
            out = model(input_ids=ids, use_cache=True, **extra)
            caches[index] = getattr(out, name)
            rows.append(out.logits[:, -1])
        next_ids = []
        for row, (job, output) in enumerate(zip(jobs, outputs, strict=True)):
            if done[row]:
                next_ids.append(vocab.pad_id)
                continue
            token, logprob = pick(job, step, [logits[row] for logits in rows])
            output.tokens.append(token)
            output.logprobs.append(logprob)
            next_ids.append(token)
            if token in vocab.stop_ids:
                output.finish = "stop"
                done[row] = True
            elif len(output.tokens) >= budgets[row]:
                done[row] = True
        ids = torch.tensor(next_ids, dtype=torch.long)[:, None]
        mask = torch.cat([mask, torch.ones((len(jobs), 1), dtype=mask.dtype)], dim=1)
        positions = positions[:, -1:] + 1
        step += 1
    return outputs


def _cache_argument(model: Any) -> str:
    # transformers 5.2x renamed past_key_values to cache (and warns on the old name).
    accepts = inspect.signature(model.forward).parameters
    return "cache" if "cache" in accepts else "past_key_values"


@dataclass(frozen=True)
class Scored:
    """A scoring miner's answer for one job, and what it cost."""

    scores: Scores  # what miner.scorer returns
    forward_s: float  # wall seconds of the teacher-forced forward pass
    rows_s: float  # wall seconds of score_rows (noise, truncation, margins)


def score(model: Any, job: Job, tokens: Sequence[int]) -> Scored:
    """Scores ``tokens`` claimed for ``job`` as a scoring miner does (fp32 reference model)."""
    started = time.perf_counter()
    with torch.inference_mode():
        logits = scorer.teacher_forced_logits(model, job.prompt, tokens, device=torch.device("cpu"))
        forward_done = time.perf_counter()
        result = scorer.score_rows(logits, tokens, job.params, noise_job_id=job.job_id)
        rows_done = time.perf_counter()
    return Scored(
        scores=Scores(
            logprobs=result.logprobs, margins=result.margins, stop_margins=result.stop_margins
        ),
        forward_s=forward_done - started,
        rows_s=rows_done - forward_done,
    )
