"""The reference sampler deciding tokens inside an engine whose sampler is not ours (vLLM).

Such an engine computes the logits and then samples with its own code, whose randomness no
scorer could replay. So it is left no choice: before its sampler runs, each of our rows is
replaced by one whose only finite entry is the token :mod:`miner.sampler` picks (0 there,
``-inf`` elsewhere). Whatever the host does next (temperature, top-k, top-p, its own Gumbel
noise, argmax) it emits that token. The log-probabilities it reports must come from the
untouched logits (vLLM's ``raw_logprobs`` mode), as the reference sampler defines them.

A job's parameters travel inside the host's request as plain data (:func:`job_extra_args`), so
that the host can ship them to the process running its sampler. Nothing here imports the host.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from miner import sampler
from miner.engine.base import SamplingParams

EXTRA_ARGS_KEY = "meshmint"
"""The key of a job's parameters in the host request's free-form extra arguments."""


@dataclass(frozen=True)
class KeyedJob:
    """What the reference sampler needs to pick one job's tokens."""

    job_id: str  # keys the Gumbel noise, with the seed and the position
    sampling: SamplingParams  # temperature, top-k, top-p and seed; the rest is the host's job
    prompt_length: int  # tokens before the first generated one: turns positions into indexes

    def completion_position(self, input_position: int) -> int | None:
        """The index in the completion of the token predicted by the row whose input token is
        at ``input_position`` of the sequence; None while the prompt is still being fed."""
        position = input_position + 1 - self.prompt_length
        return position if position >= 0 else None


def job_extra_args(job: KeyedJob) -> dict[str, Any]:
    """``job`` as the host request's extra arguments (plain, serialisable values)."""
    params = job.sampling
    return {
        EXTRA_ARGS_KEY: {
            "job_id": job.job_id,
            "prompt_length": job.prompt_length,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "seed": params.seed,
        }
    }


def job_from_extra_args(extra_args: Mapping[str, Any] | None) -> KeyedJob | None:
    """The job carried by a host request; None for a request that is not ours to decide (a
    scoring pass). Raises ValueError for malformed arguments."""
    if not extra_args or EXTRA_ARGS_KEY not in extra_args:
        return None
    fields = extra_args[EXTRA_ARGS_KEY]
    try:
        job = KeyedJob(
            job_id=str(fields["job_id"]),
            sampling=SamplingParams(
                temperature=float(fields["temperature"]),
                top_p=float(fields["top_p"]),
                top_k=int(fields["top_k"]),
                seed=int(fields["seed"]),
            ),
            prompt_length=int(fields["prompt_length"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed {EXTRA_ARGS_KEY} sampling arguments: {exc}") from exc
    sampler.validate(job.sampling)
    if job.prompt_length < 1:
        raise ValueError(f"prompt_length must be >= 1, got {job.prompt_length}")
    return job


def reference_choice(row: torch.Tensor, job: KeyedJob, *, position: int) -> int:
    """The token the reference sampler picks from one row of logits."""
    scores = sampler.sampling_scores(row, job.sampling, job_id=job.job_id, position=position)
    return int(torch.argmax(scores).item())


def force_choices(logits: torch.Tensor, rows: Sequence[tuple[int, KeyedJob, int]]) -> torch.Tensor:
    """Rewrites ``logits`` (``[rows, vocab]``, in place) so that each listed row, given as
    ``(row index, job, completion position)``, allows only its reference choice. Rows not listed
    are left as they are. Returns ``logits``.

    A row with non-finite logits still gets a choice (whatever argmax makes of it): the engine
    reports the token's raw log-probability, which is then non-finite too, and the adapter fails
    that job alone.
    """
    if not rows:
        return logits
    indexes = [row for row, _, _ in rows]
    tokens = [reference_choice(logits[row], job, position=position) for row, job, position in rows]
    forced = torch.full(
        (len(rows), logits.shape[-1]), -math.inf, dtype=logits.dtype, device=logits.device
    )
    forced[
        torch.arange(len(rows), device=logits.device), torch.tensor(tokens, device=logits.device)
    ] = 0.0
    logits[torch.tensor(indexes, device=logits.device)] = forced
    return logits
