"""Re-scoring a finished job: what a spot check asks of a miner other than the one that ran it.

The checked miner claims it sampled ``completion`` from ``prompt`` with the reference sampler
(``miner.sampler``). The scorer runs the same model once over ``prompt + completion[:-1]``
(teacher forcing: the logits at every position come from one prefill, about as costly as the
checked job's own prefill) and reports, for each claimed token:

- its **log-probability** under the scorer's fp32 logits at temperature 1, to be compared with
  the log-probability the miner claimed;
- its **margin**: ``max(scores) - scores[token]``, where ``scores`` is the row the reference
  sampler takes the argmax of (scaled, truncated logits plus the job's Gumbel noise). An honest
  miner's token has margin 0 up to floating-point differences between devices; a substituted
  token usually has a margin of the order of the noise itself (about 1); a token outside top-k
  or top-p has an infinite margin.

The coordinator judges these numbers (``coordinator/verification/judge.py``); a miner only
computes them.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from miner import sampler
from miner.engine.base import SamplingParams, TokenScores


def teacher_forced_logits(
    model: Any, prompt: Sequence[int], completion: Sequence[int], *, device: torch.device
) -> torch.Tensor:
    """Rows of logits, one per completion token: row ``i`` is what predicts ``completion[i]``.

    One forward pass over ``prompt + completion[:-1]``; call it under ``torch.inference_mode``.
    Only the completion's rows are computed when the model takes ``logits_to_keep`` (a long
    prompt's rows over a large vocabulary would otherwise cost gigabytes).
    """
    if not prompt:
        raise ValueError("the prompt is empty")
    if not completion:
        return torch.empty((0, 0))
    ids = torch.tensor([list(prompt) + list(completion[:-1])], dtype=torch.long, device=device)
    extra = (
        {"logits_to_keep": len(completion)}
        if "logits_to_keep" in inspect.signature(model.forward).parameters
        else {}
    )
    logits: torch.Tensor = model(input_ids=ids, use_cache=False, **extra).logits[0]
    return logits[-len(completion) :]


def score_rows(
    logits: torch.Tensor,
    completion: Sequence[int],
    params: SamplingParams,
    *,
    noise_job_id: str,
) -> TokenScores:
    """Log-probabilities and margins of ``completion`` given its rows of ``logits``.

    ``logits`` has one row per completion token (any dtype, any device); the noise for row ``i``
    is the sampler's for position ``i`` of job ``noise_job_id``.
    """
    if logits.shape[0] != len(completion):
        raise ValueError(f"{logits.shape[0]} rows of logits for {len(completion)} tokens")
    if not completion:
        return TokenScores(logprobs=(), margins=())
    tokens = torch.tensor(list(completion), dtype=torch.long, device=logits.device)
    logprobs = sampler.logprobs_fp32(logits).gather(1, tokens[:, None])[:, 0]
    margins = []
    for position, token in enumerate(completion):
        scores = sampler.sampling_scores(
            logits[position], params, job_id=noise_job_id, position=position
        )
        margins.append(float((scores.max() - scores[token]).item()))
    return TokenScores(logprobs=tuple(logprobs.tolist()), margins=tuple(margins))
