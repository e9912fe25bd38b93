"""The reference sampler: deterministic noise, the documented definition, and correct sampling."""

from __future__ import annotations

import hashlib
import math
import random
import struct
from collections import Counter

import numpy as np
import pytest
import torch

from miner import sampler
from miner.engine.base import SamplingParams

SMALL_LOGITS = torch.tensor([1.5, 0.5, 0.0, -0.5, -1.0, 2.0])

# Philox-4x64-10 constants, restated from the paper so this test does not trust numpy.
_MASK = (1 << 64) - 1
_MULTIPLIERS = (0xD2E7470EE14C6C93, 0xCA5A826395121157)
_WEYL = (0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B)


def _philox_block(counter: list[int], key: list[int]) -> list[int]:
    c, k = list(counter), list(key)
    for _ in range(10):
        p0, p1 = _MULTIPLIERS[0] * c[0], _MULTIPLIERS[1] * c[2]
        c = [(p1 >> 64) ^ c[1] ^ k[0], p1 & _MASK, (p0 >> 64) ^ c[3] ^ k[1], p0 & _MASK]
        k = [(k[0] + _WEYL[0]) & _MASK, (k[1] + _WEYL[1]) & _MASK]
    return c


def _noise_from_the_docstring(
    seed: int, job_id: str, position: int, vocab_size: int
) -> list[float]:
    """An independent reimplementation of the module docstring's definition, in plain Python."""
    job = job_id.encode("utf-8")
    digest = hashlib.sha256(
        b"meshmint/v1/noise\x00" + struct.pack(">Q", seed) + struct.pack(">I", len(job)) + job
    ).digest()
    key = [int.from_bytes(digest[0:8], "big"), int.from_bytes(digest[8:16], "big")]
    words: list[int] = []
    block = 1
    while len(words) < vocab_size:
        words.extend(_philox_block([block, position, 0, 0], key))
        block += 1
    uniforms = [((word >> 12) + 0.5) / 2.0**52 for word in words[:vocab_size]]
    return [-math.log(-math.log(u)) for u in uniforms]


def _draw(logits: torch.Tensor, params: SamplingParams, draws: int) -> Counter[int]:
    return Counter(
        sampler.sample(logits, params, job_id="histogram", position=position)[0]
        for position in range(draws)
    )


def _total_variation(counts: Counter[int], probs: torch.Tensor) -> float:
    total = sum(counts.values())
    return 0.5 * sum(abs(counts[i] / total - float(p)) for i, p in enumerate(probs))


def test_noise_matches_the_documented_definition() -> None:
    for seed, job_id, position in [(0, "job", 0), (2**64 - 1, "jöb-🙂", 12345), (7, "", 2**40)]:
        ours = sampler.gumbel_noise(seed=seed, job_id=job_id, position=position, vocab_size=11)
        reference = _noise_from_the_docstring(seed, job_id, position, 11)
        assert ours.dtype == np.float64
        np.testing.assert_allclose(ours, reference, rtol=1e-13, atol=1e-13)


def test_noise_is_deterministic_and_keyed_by_seed_job_and_position() -> None:
    def noise(seed: int = 1, job_id: str = "a", position: int = 0) -> np.ndarray:
        return sampler.gumbel_noise(seed=seed, job_id=job_id, position=position, vocab_size=64)

    base = noise()
    assert np.array_equal(base, noise())
    for other in (noise(seed=2), noise(job_id="b"), noise(position=1)):
        assert not np.any(base == other)


def test_noise_of_neighbouring_positions_shares_no_values() -> None:
    # A counter layout that put the position where the block index goes would make position
    # p + 1 a shifted copy of position p.
    first = sampler.gumbel_noise(seed=3, job_id="j", position=10, vocab_size=1000)
    second = sampler.gumbel_noise(seed=3, job_id="j", position=11, vocab_size=1000)
    assert not set(first.tolist()) & set(second.tolist())


def test_noise_is_a_function_of_the_key_only() -> None:
    keys = [(seed, job, position) for seed in (0, 9) for job in ("x", "y") for position in range(6)]
    in_order = {
        key: sampler.gumbel_noise(seed=key[0], job_id=key[1], position=key[2], vocab_size=50)
        for key in keys
    }
    shuffled = keys[:]
    random.Random(4).shuffle(shuffled)
    for key in shuffled:
        again = sampler.gumbel_noise(seed=key[0], job_id=key[1], position=key[2], vocab_size=50)
        assert np.array_equal(in_order[key], again)
    # The prefix of a longer draw is the shorter draw: the vocabulary size only truncates.
    longer = sampler.gumbel_noise(seed=0, job_id="x", position=0, vocab_size=77)
    assert np.array_equal(longer[:50], in_order[(0, "x", 0)])


def test_noise_is_standard_gumbel() -> None:
    noise = sampler.gumbel_noise(seed=5, job_id="stats", position=0, vocab_size=200_000)
    assert np.all(np.isfinite(noise))
    euler_gamma = 0.5772156649
    assert abs(noise.mean() - euler_gamma) < 0.01
    assert abs(noise.var() - math.pi**2 / 6) < 0.03


def test_temperature_zero_is_argmax_with_ties_to_the_lowest_index() -> None:
    logits = torch.randn(300, generator=torch.Generator().manual_seed(1))
    token, logprob = sampler.sample(logits, SamplingParams(temperature=0), job_id="j", position=3)
    assert token == int(torch.argmax(logits))
    assert logprob == pytest.approx(float(torch.log_softmax(logits, -1)[token]), abs=1e-6)
    tied = torch.tensor([0.0, 3.0, 1.0, 3.0])
    assert sampler.sample(tied, SamplingParams(temperature=0), job_id="j", position=0)[0] == 1


def test_top_k_one_and_tiny_top_p_are_argmax() -> None:
    logits = torch.randn(300, generator=torch.Generator().manual_seed(2))
    best = int(torch.argmax(logits))
    for params in (
        SamplingParams(temperature=1.5, top_k=1, seed=4),
        SamplingParams(temperature=1.5, top_p=1e-6, seed=4),
        SamplingParams(temperature=1.5, top_p=0.0, seed=4),
    ):
        tokens = {sampler.sample(logits, params, job_id="j", position=p)[0] for p in range(50)}
        assert tokens == {best}


def test_temperature_one_samples_from_the_softmax() -> None:
    counts = _draw(SMALL_LOGITS, SamplingParams(temperature=1.0, seed=11), 20_000)
    assert _total_variation(counts, torch.softmax(SMALL_LOGITS, -1)) < 0.03


def test_temperature_rescales_the_distribution() -> None:
    counts = _draw(SMALL_LOGITS, SamplingParams(temperature=2.0, seed=12), 10_000)
    assert _total_variation(counts, torch.softmax(SMALL_LOGITS / 2.0, -1)) < 0.03


def test_top_k_samples_from_the_renormalised_top_k() -> None:
    counts = _draw(SMALL_LOGITS, SamplingParams(temperature=1.0, top_k=3, seed=13), 10_000)
    kept = torch.tensor([1.5, 0.5, -math.inf, -math.inf, -math.inf, 2.0])
    assert set(counts) == {0, 1, 5}
    assert _total_variation(counts, torch.softmax(kept, -1)) < 0.03


def test_top_p_keeps_the_smallest_prefix_reaching_p() -> None:
    logits = torch.log(torch.tensor([0.15, 0.5, 0.05, 0.3]))
    # Cumulative in order 1, 3, 0, 2: 0.5, 0.8, 0.95, 1.0.
    assert set(_draw(logits, SamplingParams(top_p=0.45, seed=14), 500)) == {1}
    assert set(_draw(logits, SamplingParams(top_p=0.75, seed=14), 2000)) == {1, 3}
    counts = _draw(logits, SamplingParams(top_p=0.85, seed=14), 10_000)
    assert set(counts) == {0, 1, 3}
    assert _total_variation(counts, torch.tensor([0.15, 0.5, 0.0, 0.3]) / 0.95) < 0.03


def test_top_k_keeps_ties_at_the_threshold() -> None:
    z = sampler.truncate(torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0]), top_k=2, top_p=1.0)
    assert torch.isfinite(z).tolist() == [False, True, True, True, False]


def test_logprob_is_untruncated_temperature_one() -> None:
    params = SamplingParams(temperature=0.7, top_k=2, top_p=0.5, seed=3)
    token, logprob = sampler.sample(SMALL_LOGITS, params, job_id="j", position=0)
    assert logprob == pytest.approx(float(torch.log_softmax(SMALL_LOGITS, -1)[token]), abs=1e-6)


def test_the_token_does_not_depend_on_the_logits_dtype() -> None:
    generator = torch.Generator().manual_seed(5)
    for trial in range(20):
        logits = torch.randn(1000, generator=generator)
        logits[trial * 7] = logits.max() + 4.0  # a clear winner, far beyond bf16 rounding
        as_bf16 = logits.to(torch.bfloat16)
        params = SamplingParams(temperature=0)
        assert sampler.sample(logits, params, job_id="j", position=trial)[0] == trial * 7
        assert sampler.sample(as_bf16, params, job_id="j", position=trial)[0] == trial * 7
        assert sampler.sample(as_bf16.float(), params, job_id="j", position=trial)[0] == trial * 7


def test_sampling_is_deterministic_for_a_key() -> None:
    logits = torch.randn(260, generator=torch.Generator().manual_seed(6))
    params = SamplingParams(temperature=1.0, seed=8)
    first = [sampler.sample(logits, params, job_id="k", position=p)[0] for p in range(40)]
    again = [sampler.sample(logits, params, job_id="k", position=p)[0] for p in range(40)]
    other_job = [sampler.sample(logits, params, job_id="l", position=p)[0] for p in range(40)]
    assert first == again
    assert first != other_job


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=-1.0),
        SamplingParams(temperature=math.nan),
        SamplingParams(temperature=math.inf),
        SamplingParams(top_p=1.5),
        SamplingParams(top_p=math.nan),
        SamplingParams(top_k=-1),
        SamplingParams(seed=-1),
        SamplingParams(seed=2**64),
    ],
)
def test_invalid_parameters_are_rejected(params: SamplingParams) -> None:
    with pytest.raises(ValueError):
        sampler.validate(params)
    with pytest.raises(ValueError):
        sampler.sample(SMALL_LOGITS, params, job_id="j", position=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_and_cpu_pick_the_same_tokens() -> None:
    generator = torch.Generator().manual_seed(9)
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=1)
    for position in range(200):
        logits = torch.randn(32_000, generator=generator) * 3
        on_cpu = sampler.sampling_scores(logits, params, job_id="gpu", position=position)
        on_gpu = sampler.sampling_scores(logits.cuda(), params, job_id="gpu", position=position)
        assert torch.equal(on_cpu, on_gpu.cpu())
        assert (
            sampler.sample(logits, params, job_id="gpu", position=position)[0]
            == (sampler.sample(logits.cuda(), params, job_id="gpu", position=position)[0])
        )
