"""The vLLM engine's pieces that run without vLLM: the forced choice, the translation of vLLM's
log-probabilities into tokens and scoring rows, the arguments it starts vLLM with.

The engine itself needs vLLM and CUDA: tests/miner/test_vllm_gpu.py (marked ``gpu``).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from miner import sampler, scorer
from miner.engine.base import BatchingConfig, GenerationError, ModelLoadError, SamplingParams
from miner.engine.forced_choice import (
    KeyedJob,
    force_choices,
    job_extra_args,
    job_from_extra_args,
)
from miner.engine.vllm_engine import VllmEngine, check_device
from miner.engine.vllm_translation import (
    KV_BLOCK_SIZE,
    LOGITS_PROCESSOR,
    engine_arguments,
    generated_tokens,
    position_logprobs,
    scoring_parameters,
    scoring_rows,
)

VOCAB = 64
JOBS = [
    KeyedJob(job_id="greedy", sampling=SamplingParams(temperature=0.0), prompt_length=5),
    KeyedJob(job_id="seeded", sampling=SamplingParams(temperature=0.8, seed=7), prompt_length=3),
    KeyedJob(
        job_id="truncated",
        sampling=SamplingParams(temperature=1.3, top_k=9, top_p=0.7, seed=2**64 - 1),
        prompt_length=1,
    ),
]


def _logits(rows: int, *, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=generator) * 3


def test_forced_rows_leave_only_the_reference_samplers_token() -> None:
    logits = _logits(4)
    original = logits.clone()
    rows = [(0, JOBS[0], 0), (2, JOBS[1], 5), (3, JOBS[2], 11)]
    force_choices(logits, rows)
    for row, job, position in rows:
        expected, _ = sampler.sample(
            original[row], job.sampling, job_id=job.job_id, position=position
        )
        finite = torch.isfinite(logits[row]).nonzero().flatten().tolist()
        assert finite == [expected]
        # Whatever the host samples with afterwards (its own temperature and noise), it is this.
        noisy = logits[row] / 0.5 + torch.empty(VOCAB).exponential_().log().neg()
        assert int(torch.argmax(noisy)) == expected
    assert torch.equal(logits[1], original[1])  # not one of ours: untouched


def test_positions_count_from_the_first_generated_token() -> None:
    job = JOBS[0]  # a prompt of 5 tokens: the row fed token 4 predicts completion token 0
    assert job.completion_position(4) == 0
    assert job.completion_position(9) == 5
    assert job.completion_position(3) is None  # a prompt chunk's row


def test_jobs_travel_as_plain_extra_arguments() -> None:
    for job in JOBS:
        assert job_from_extra_args(job_extra_args(job)) == job
    assert job_from_extra_args(None) is None
    assert job_from_extra_args({"other": 1}) is None
    with pytest.raises(ValueError, match="malformed"):
        job_from_extra_args({"meshmint": {"job_id": "x"}})
    bad = job_extra_args(JOBS[0])
    bad["meshmint"]["top_p"] = 2.0
    with pytest.raises(ValueError, match="top_p"):
        job_from_extra_args(bad)


def _flat(positions: list[list[tuple[int, float]] | None]) -> SimpleNamespace:
    """vLLM's FlatLogprobs layout, from per-position lists."""
    flat = SimpleNamespace(start_indices=[], end_indices=[], token_ids=[], logprobs=[])
    for entries in positions:
        flat.start_indices.append(len(flat.logprobs))
        for token, value in entries or []:
            flat.token_ids.append(token)
            flat.logprobs.append(value)
        flat.end_indices.append(len(flat.logprobs))
    return flat


def _dicts(positions: list[list[tuple[int, float]] | None]) -> list[dict[int, Any] | None]:
    """vLLM's other layout: a list of {token id: Logprob} (None for an empty position)."""
    return [
        None if entries is None else {t: SimpleNamespace(logprob=v) for t, v in entries}
        for entries in positions
    ]


@pytest.mark.parametrize("layout", [_flat, _dicts])
def test_generated_tokens_carry_the_sampled_logprob_and_ordered_alternatives(layout: Any) -> None:
    # vLLM lists the sampled token first, then the top ones; ties must go to the lower id.
    positions = [[(5, -2.0), (9, -0.5), (3, -0.5), (5, -2.0)], [(1, -0.1), (1, -0.1), (0, -3.0)]]
    tokens = generated_tokens([5, 1], position_logprobs(layout(positions)), alternatives=2)
    assert [t.token_id for t in tokens] == [5, 1]
    assert [t.logprob for t in tokens] == [-2.0, -0.1]
    assert tokens[0].top_logprobs == ((3, -0.5), (9, -0.5))
    assert tokens[1].top_logprobs == ((1, -0.1), (0, -3.0))
    assert (
        generated_tokens([5], position_logprobs(layout(positions[:1])), alternatives=0)[
            0
        ].top_logprobs
        == ()
    )
    with pytest.raises(GenerationError, match="no log-probability for token 7"):
        generated_tokens([7], position_logprobs(layout(positions[:1])), alternatives=0)
    with pytest.raises(GenerationError, match="2 log-probability entries for 1 tokens"):
        generated_tokens([5], position_logprobs(layout(positions)), alternatives=0)


def _full_vocab(row: torch.Tensor, sampled: int) -> list[tuple[int, float]]:
    """A full-vocabulary position as vLLM lists it: the token first, then by rank."""
    ranked = torch.argsort(row, descending=True).tolist()
    return [(sampled, float(row[sampled])), *((t, float(row[t])) for t in ranked)]


@pytest.mark.parametrize("completion_length", [1, 2, 7])
@pytest.mark.parametrize("job", JOBS, ids=lambda job: job.job_id)
def test_scoring_full_vocabulary_logprobs_matches_scoring_the_logits(
    job: KeyedJob, completion_length: int
) -> None:
    prompt_length = 4
    logits = _logits(prompt_length + completion_length - 1, seed=completion_length)
    logprobs = torch.log_softmax(logits, dim=-1)
    # Causal rows: row r predicts token r + 1. The completion is the rows' own sampled tokens.
    completion = [
        sampler.sample(logits[prompt_length - 1 + i], job.sampling, job_id="c", position=i)[0]
        for i in range(completion_length)
    ]
    completion_rows = logits[prompt_length - 1 :]
    # What vLLM returns for prompt + completion[:-1] fed with prompt_logprob_start = P - 1:
    # None before the start, one full row per fed token from it; then the sampled row.
    fed = prompt_length + completion_length - 1
    prompt_positions: list[list[tuple[int, float]] | None] = [None] * prompt_length
    for token_index in range(prompt_length, fed):
        prompt_positions.append(
            _full_vocab(logprobs[token_index - 1], completion[token_index - prompt_length])
        )
    sampled = [_full_vocab(logprobs[fed - 1], 0)]
    rows = scoring_rows(
        prompt_logprobs=position_logprobs(_flat(prompt_positions)),
        sampled_logprobs=position_logprobs(_flat(sampled)),
        completion_length=completion_length,
        vocab_size=VOCAB,
    )
    claimed = [[int(torch.argmax(r))] for r in completion_rows]
    from_logprobs = scorer.score_rows(
        rows, completion, job.sampling, noise_job_id="c", claimed_top_ids=claimed
    )
    from_logits = scorer.score_rows(
        completion_rows, completion, job.sampling, noise_job_id="c", claimed_top_ids=claimed
    )
    for mine, theirs in [
        (from_logprobs.logprobs, from_logits.logprobs),
        (from_logprobs.margins, from_logits.margins),
        (from_logprobs.stop_margins, from_logits.stop_margins),
        (from_logprobs.top_thresholds, from_logits.top_thresholds),
    ]:
        assert len(mine) == len(theirs) == completion_length
        for a, b in zip(mine, theirs, strict=True):
            assert (math.isinf(a) and a == b) or abs(a - b) < 1e-4
    assert all(margin == 0 for margin in from_logprobs.margins)  # the sampled tokens pass


def test_scoring_rows_refuse_a_partial_vocabulary() -> None:
    partial = [[(0, -0.1), (1, -2.0)]]
    with pytest.raises(GenerationError, match="not the whole vocabulary"):
        scoring_rows(
            prompt_logprobs=[], sampled_logprobs=partial, completion_length=1, vocab_size=VOCAB
        )
    with pytest.raises(GenerationError, match="fewer log-probability rows"):
        scoring_rows(
            prompt_logprobs=[], sampled_logprobs=partial, completion_length=3, vocab_size=VOCAB
        )


def test_scoring_asks_for_the_completion_rows_only() -> None:
    assert "prompt_logprobs" not in scoring_parameters(5, 1)
    many = scoring_parameters(5, 3)
    assert many["prompt_logprobs"] == -1 and many["prompt_logprob_start"] == 4
    assert many["logprobs"] == -1 and many["skip_reading_prefix_cache"] is True


def test_engine_arguments_follow_the_miners_batching_flags(tmp_path: Path) -> None:
    batching = BatchingConfig(max_batch_size=16, max_batch_tokens=8, kv_cache_tokens=1000)
    arguments = engine_arguments(tmp_path, dtype="bfloat16", batching=batching)
    assert arguments["max_num_seqs"] == 16
    assert arguments["max_num_batched_tokens"] == 16  # at least one row per sequence
    assert arguments["num_gpu_blocks_override"] * KV_BLOCK_SIZE >= 1000
    assert arguments["logprobs_mode"] == "raw_logprobs"
    assert arguments["logits_processors"] == [LOGITS_PROCESSOR]
    module = LOGITS_PROCESSOR.partition(":")[0]
    assert importlib.util.find_spec(module) is not None  # vLLM imports it by this name
    assert "num_gpu_blocks_override" not in engine_arguments(
        tmp_path, dtype="float16", batching=BatchingConfig(max_batch_size=2)
    )


def test_devices_other_than_the_first_gpu_are_refused_with_the_way_out() -> None:
    for device in (None, "cuda", "cuda:0"):
        check_device(device)
    with pytest.raises(ModelLoadError, match="CUDA_VISIBLE_DEVICES=1"):
        check_device("cuda:1")
    with pytest.raises(ModelLoadError, match="--engine torch"):
        check_device("cpu")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
async def test_without_vllm_loading_says_how_to_install_it(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"pip install 'meshmint\[vllm\]'"):
        async with VllmEngine.load("tiny", tmp_path):
            pass
