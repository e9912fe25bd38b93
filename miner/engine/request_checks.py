"""The checks every engine runs on a job before it reaches the model.

An engine refuses what it cannot serve with :class:`GenerationError` and a message the
coordinator can pass on: an empty prompt, token ids outside the vocabulary, more tokens than the
context, sampling parameters the reference sampler rejects. Keeping them here means a buyer gets
the same answer whichever engine the miner runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from miner import sampler
from miner.engine.base import (
    GenerationError,
    GenerationRequest,
    ModelInfo,
    SamplingParams,
    ScoreRequest,
)


@dataclass(frozen=True)
class CheckedScoring:
    """A score request whose token ids are known to fit the model."""

    prompt: list[int]  # never empty
    completion: list[int]  # may be empty: nothing to score
    claimed_top_ids: tuple[tuple[int, ...], ...]  # empty, or one entry per completion token


def checked_generation(request: GenerationRequest, info: ModelInfo) -> list[int]:
    """The prompt of a job that ``info``'s model can serve (and at least one token of room)."""
    prompt = checked_prompt(request.prompt_token_ids, info)
    if len(prompt) >= info.context_length:
        raise GenerationError(
            f"the prompt has {len(prompt)} tokens; the context length is {info.context_length}"
        )
    if request.sampling.max_tokens < 1:
        raise GenerationError(f"max_tokens must be >= 1, got {request.sampling.max_tokens}")
    check_sampling(request.sampling)
    return prompt


def checked_scoring(request: ScoreRequest, info: ModelInfo) -> CheckedScoring:
    """The token ids of a spot check that ``info``'s model can score."""
    prompt = checked_prompt(request.prompt_token_ids, info)
    completion = checked_ids(request.completion_token_ids, info, what="completion")
    if len(prompt) + len(completion) > info.context_length:
        raise GenerationError(
            f"prompt and completion have {len(prompt) + len(completion)} tokens; "
            f"the context length is {info.context_length}"
        )
    check_sampling(request.sampling)
    claimed = request.claimed_top_ids
    if claimed and len(claimed) != len(completion):
        raise GenerationError(f"{len(claimed)} top_logprobs entries for {len(completion)} tokens")
    claimed_top_ids = tuple(tuple(checked_ids(ids, info, what="top_logprobs")) for ids in claimed)
    return CheckedScoring(prompt=prompt, completion=completion, claimed_top_ids=claimed_top_ids)


def checked_prompt(token_ids: Sequence[int], info: ModelInfo) -> list[int]:
    """``token_ids`` as a list, refused when empty or outside the vocabulary."""
    prompt = checked_ids(token_ids, info, what="prompt")
    if not prompt:
        raise GenerationError("the prompt is empty")
    return prompt


def checked_ids(token_ids: Sequence[int], info: ModelInfo, *, what: str) -> list[int]:
    """``token_ids`` as a list, refused unless every id is in the vocabulary."""
    ids = [int(token) for token in token_ids]
    if not all(0 <= token < info.vocab_size for token in ids):
        raise GenerationError(f"{what} token ids must be in [0, {info.vocab_size})")
    return ids


def check_sampling(params: SamplingParams) -> None:
    """Refuses parameters the reference sampler cannot sample with."""
    try:
        sampler.validate(params)
    except ValueError as exc:
        raise GenerationError(str(exc)) from exc
