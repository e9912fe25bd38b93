"""What the vLLM engine sends vLLM and how it reads vLLM's answers, as plain data.

Keyword arguments for vLLM's ``AsyncEngineArgs`` and ``SamplingParams``, and the conversion of
its log-probabilities (``FlatLogprobs`` or lists of ``{id: Logprob}``) into our tokens and
scoring rows. Nothing here imports vLLM, so all of it is tested on any machine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from miner.engine.base import BatchingConfig, GeneratedToken, GenerationError
from miner.engine.forced_choice import KeyedJob, job_extra_args

LOGITS_PROCESSOR = "miner.engine.vllm_processor:KeyedGumbelChoice"
"""How vLLM finds our logits processor in the process that runs its sampler."""
KV_BLOCK_SIZE = 16
"""Token positions per vLLM KV block; ``kv_cache_tokens`` is rounded up to whole blocks."""

# One position's log-probabilities: (token id, logprob) pairs, in the host's order.
PositionLogprobs = list[tuple[int, float]]


def engine_arguments(model_dir: Path, *, dtype: str, batching: BatchingConfig) -> dict[str, Any]:
    """Keyword arguments of vLLM's ``AsyncEngineArgs`` for serving ``model_dir`` our way."""
    arguments: dict[str, Any] = {
        "model": str(model_dir),
        "dtype": dtype,
        "max_num_seqs": batching.max_batch_size,
        # vLLM needs room for at least one row per sequence in a step.
        "max_num_batched_tokens": max(batching.max_batch_tokens, batching.max_batch_size),
        "enable_chunked_prefill": True,
        "block_size": KV_BLOCK_SIZE,
        # Our logits processor picks the tokens; log-probabilities of the raw logits, and any
        # number of them (a spot check reads the whole vocabulary).
        "logits_processors": [LOGITS_PROCESSOR],
        "logprobs_mode": "raw_logprobs",
        "max_logprobs": -1,
        # Token ids in, token ids out: no tokenizer, and no sampling defaults from the model's
        # generation_config.json (the coordinator's parameters are the whole truth).
        "skip_tokenizer_init": True,
        "generation_config": "vllm",
        "enable_prefix_caching": True,
        "disable_log_stats": True,
        "enable_log_requests": False,
    }
    if batching.kv_cache_tokens is not None:
        arguments["num_gpu_blocks_override"] = -(-batching.kv_cache_tokens // KV_BLOCK_SIZE)
    return arguments


def generation_parameters(job: KeyedJob, *, max_tokens: int) -> dict[str, Any]:
    """Keyword arguments of vLLM's ``SamplingParams`` for one job (all but ``output_kind``).

    vLLM's own sampling is neutral (temperature 1, no truncation): after our processor only one
    token is left, and it would pick it whatever its settings. Stops are the coordinator's
    alone (``ignore_eos``), and the stop token is part of the output as the protocol wants.
    """
    return {
        "n": 1,
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "stop_token_ids": list(job.sampling.stop_token_ids),
        "ignore_eos": True,
        "logprobs": job.sampling.top_logprobs,
        "flat_logprobs": True,
        "detokenize": False,
        "extra_args": job_extra_args(job),
    }


def scoring_parameters(prompt_length: int, completion_length: int) -> dict[str, Any]:
    """Keyword arguments of vLLM's ``SamplingParams`` for scoring a completion of
    ``completion_length`` tokens after a prompt of ``prompt_length`` (all but ``output_kind``):
    the whole vocabulary's log-probabilities at every row that predicts a completion token."""
    parameters: dict[str, Any] = {
        "n": 1,
        "max_tokens": 1,
        "temperature": 0.0,
        "ignore_eos": True,
        "logprobs": -1,
        "flat_logprobs": True,
        "detokenize": False,
        "skip_reading_prefix_cache": True,
    }
    if completion_length > 1:
        parameters["prompt_logprobs"] = -1
        # The row after the prompt's last token is the first that predicts a completion token.
        parameters["prompt_logprob_start"] = prompt_length - 1
    return parameters


def position_logprobs(container: Any) -> list[PositionLogprobs]:
    """vLLM's per-position log-probabilities (``FlatLogprobs`` or a list of ``{id: Logprob}``;
    None for a position without any) as lists of ``(token id, logprob)``."""
    if container is None:
        return []
    starts = getattr(container, "start_indices", None)
    if starts is not None:
        ids, values = container.token_ids, container.logprobs
        return [
            list(zip(ids[start:end], values[start:end], strict=True))
            for start, end in zip(starts, container.end_indices, strict=True)
        ]
    return [
        [] if position is None else [(int(t), float(lp.logprob)) for t, lp in position.items()]
        for position in container
    ]


def generated_tokens(
    token_ids: Sequence[int], positions: Sequence[PositionLogprobs], *, alternatives: int
) -> list[GeneratedToken]:
    """The tokens of one output delta, each with its logprob and its ``alternatives`` most
    likely tokens (most likely first, ties to the lower id, as ``miner.sampler`` orders them).

    vLLM lists the sampled token and the top ones at each position; a missing position or a
    sampled token without its logprob is a broken output (:class:`GenerationError`).
    """
    if len(positions) != len(token_ids):
        raise GenerationError(
            f"vLLM returned {len(positions)} log-probability entries for {len(token_ids)} tokens"
        )
    tokens: list[GeneratedToken] = []
    for token_id, entries in zip(token_ids, positions, strict=True):
        by_id = dict(entries)
        if token_id not in by_id:
            raise GenerationError(f"vLLM returned no log-probability for token {token_id}")
        ranked = sorted(by_id.items(), key=lambda pair: (-pair[1], pair[0]))[:alternatives]
        tokens.append(
            GeneratedToken(
                token_id=int(token_id),
                logprob=float(by_id[token_id]),
                top_logprobs=tuple((int(t), float(lp)) for t, lp in ranked),
            )
        )
    return tokens


def scoring_rows(
    *,
    prompt_logprobs: Sequence[PositionLogprobs],
    sampled_logprobs: Sequence[PositionLogprobs],
    completion_length: int,
    vocab_size: int,
) -> torch.Tensor:
    """``[completion_length, vocab_size]`` float32 log-probabilities, row ``i`` predicting
    completion token ``i``: the last ``completion_length - 1`` prompt positions, then the
    sampled position. Raises :class:`GenerationError` unless every row covers the vocabulary."""
    wanted = list(prompt_logprobs[len(prompt_logprobs) - (completion_length - 1) :])
    if len(wanted) != completion_length - 1 or len(sampled_logprobs) < 1:
        raise GenerationError("vLLM returned fewer log-probability rows than completion tokens")
    wanted.append(sampled_logprobs[0])
    rows = torch.full((completion_length, vocab_size), -math.inf, dtype=torch.float32)
    for index, entries in enumerate(wanted):
        distinct = {token for token, _ in entries}
        if len(distinct) < vocab_size or min(distinct) < 0 or max(distinct) >= vocab_size:
            raise GenerationError(
                f"vLLM returned {len(distinct)} log-probabilities in [0, {vocab_size}) "
                "for a scored row, not the whole vocabulary"
            )
        ids = torch.tensor([token for token, _ in entries], dtype=torch.long)
        rows[index, ids] = torch.tensor([value for _, value in entries], dtype=torch.float32)
    return rows
