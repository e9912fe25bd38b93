"""The cheating variants of tests/e2e/variant_miner.py on the fake engine (no model, no network)."""

from __future__ import annotations

import pytest

from miner.engine.base import GenerationRequest, SamplingParams, ScoreRequest
from tests.e2e.variant_miner import LYING_LOGPROB_SHIFT, LYING_MARGIN, VariantEngine
from tests.miner_daemon.fake_gateway import VOCAB_SIZE, FakeEngine, fake_logprob, fake_tokens

PROMPT = (1, 2, 3)
STOP = 998  # never one of fake_tokens(PROMPT, ...): the fake runs to max_tokens


def generation(job_id: str = "job", *, max_tokens: int = 64) -> GenerationRequest:
    sampling = SamplingParams(temperature=0.7, max_tokens=max_tokens, stop_token_ids=(STOP, 999))
    return GenerationRequest(job_id=job_id, prompt_token_ids=PROMPT, sampling=sampling)


async def run(variant: str, request: GenerationRequest) -> list[tuple[int, float]]:
    engine = VariantEngine(FakeEngine(), variant)
    return [(token.token_id, token.logprob) async for token in engine.generate(request)]


async def test_substitute_replaces_about_the_fraction_with_valid_non_stop_tokens() -> None:
    honest = fake_tokens(PROMPT, 64)
    tokens = await run("substitute:0.25", generation())
    assert len(tokens) == 64
    replaced = [position for position, (token, _) in enumerate(tokens) if token != honest[position]]
    assert 4 <= len(replaced) <= 32  # 16 expected; the draw is fixed by the job id
    assert all(0 <= token < VOCAB_SIZE and token not in (STOP, 999) for token, _ in tokens)
    # The streamed log-probability is the original token's: the cheat does not recompute it.
    assert [logprob for _, logprob in tokens] == [fake_logprob(p) for p in range(64)]
    assert await run("substitute:0.25", generation()) == tokens, "seeded by the job id"
    assert await run("substitute:0.25", generation("other")) != tokens


@pytest.mark.parametrize(("fraction", "replaced"), [("0", 0), ("1", 16)])
async def test_substitute_fraction_bounds(fraction: str, replaced: int) -> None:
    honest = fake_tokens(PROMPT, 16)
    tokens = await run(f"substitute:{fraction}", generation(max_tokens=16))
    assert sum(token != honest[p] for p, (token, _) in enumerate(tokens)) == replaced


async def test_a_stop_token_is_never_substituted() -> None:
    honest = fake_tokens(PROMPT, 8)
    request = GenerationRequest(
        job_id="job",
        prompt_token_ids=PROMPT,
        sampling=SamplingParams(max_tokens=8, stop_token_ids=(honest[5],)),
    )
    tokens = await run("substitute:1", request)
    assert [token for token, _ in tokens][-1] == honest[5] and len(tokens) == 6


async def test_random_streams_max_tokens_random_non_stop_ids() -> None:
    tokens = await run("random", generation(max_tokens=40))
    assert len(tokens) == 40
    assert all(0 <= token < VOCAB_SIZE and token not in (STOP, 999) for token, _ in tokens)
    assert all(logprob == -1.0 for _, logprob in tokens)
    assert len({token for token, _ in tokens}) > 20
    assert [token for token, _ in tokens] != fake_tokens(PROMPT, 40)


@pytest.mark.parametrize("max_tokens", [1, 9, 10])
async def test_truncate_streams_half_the_real_tokens_then_a_forged_stop(max_tokens: int) -> None:
    tokens = await run("truncate", generation(max_tokens=max_tokens))
    half = max_tokens // 2
    assert [token for token, _ in tokens] == [*fake_tokens(PROMPT, half), STOP]


async def test_only_the_lying_scorer_misreports_scores() -> None:
    completion = fake_tokens(PROMPT, 5)
    completion[1] += 1
    request = ScoreRequest(
        noise_job_id="job",
        prompt_token_ids=PROMPT,
        completion_token_ids=completion,
        sampling=SamplingParams(),
    )
    honest = await FakeEngine().score(request)
    for variant in ("honest", "substitute:0.5", "random", "truncate", "skip-stop"):
        assert await VariantEngine(FakeEngine(), variant).score(request) == honest
    lying = await VariantEngine(FakeEngine(), "lying-scorer").score(request)
    assert lying.margins == (LYING_MARGIN,) * 5
    assert lying.logprobs == tuple(lp + LYING_LOGPROB_SHIFT for lp in honest.logprobs)
    # ... while it generates honestly.
    tokens = await run("lying-scorer", generation(max_tokens=6))
    assert [token for token, _ in tokens] == fake_tokens(PROMPT, 6)
