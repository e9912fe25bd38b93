"""Continuous batching in the torch engine: a job's tokens do not depend on its batch.

Every test compares jobs run inside a busy batch with the same jobs run alone, on the real tiny
model; the batches themselves are observed through a hook on the model's forward pass.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import torch

from miner.engine import model_runner
from miner.engine.base import (
    GeneratedToken,
    GenerationError,
    GenerationRequest,
    ModelLoadError,
    SamplingParams,
    ScoreRequest,
    TokenScores,
)
from miner.engine.torch_engine import TorchEngine
from miner.test_model import create_test_model

CONTEXT_LENGTH = 128
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_test_model(tmp_path_factory.mktemp("tiny"), context_length=CONTEXT_LENGTH)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(model_dir: Path) -> AsyncIterator[TorchEngine]:
    async with TorchEngine.load("tiny", model_dir, max_concurrency=16) as loaded:
        yield loaded


class Passes:
    """The shape ``[rows, tokens]`` of every forward pass of a model."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def record(self, _: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        with self._lock:
            self.shapes.append((int(ids.shape[0]), int(ids.shape[1])))

    @property
    def decode_rows(self) -> list[int]:
        return [rows for rows, tokens in self.shapes if tokens == 1]


@pytest.fixture
def passes(engine: TorchEngine) -> Iterator[Passes]:
    recorder = Passes()
    handle = engine.model.register_forward_pre_hook(recorder.record, with_kwargs=True)
    yield recorder
    handle.remove()


def job(job_id: str, prompt: list[int], **sampling: Any) -> GenerationRequest:
    return GenerationRequest(
        job_id=job_id, prompt_token_ids=prompt, sampling=SamplingParams(**sampling)
    )


async def run(engine: TorchEngine, request: GenerationRequest) -> list[GeneratedToken]:
    return [token async for token in engine.generate(request)]


async def run_until(
    engine: TorchEngine, request: GenerationRequest, count: int
) -> list[GeneratedToken]:
    """The job's first ``count`` tokens, then the stream is closed (a cancellation)."""
    stream = engine.generate(request)
    tokens = [await anext(stream) for _ in range(count)]
    await stream.aclose()
    return tokens


def mixed_jobs() -> list[GenerationRequest]:
    """16 jobs: prompt lengths 1 to 46, greedy and seeded sampling, 3 to 33 tokens, stops."""
    jobs = []
    for n in range(16):
        prompt = [(37 * n + 11 * i) % 250 + 1 for i in range(1 + 3 * n)]
        sampling: dict[str, Any] = {"max_tokens": 3 + 2 * n, "seed": 1000 + n}
        if n % 4 == 0:
            sampling["temperature"] = 0
        elif n % 4 == 1:
            sampling.update(temperature=1.0)
        elif n % 4 == 2:
            sampling.update(temperature=0.7, top_k=20)
        else:
            sampling.update(temperature=1.2, top_p=0.8, stop_token_ids=(10, 32))
        jobs.append(job(f"mixed-{n}", prompt, **sampling))
    return jobs


def same_tokens(batched: list[GeneratedToken], alone: list[GeneratedToken]) -> None:
    assert [t.token_id for t in batched] == [t.token_id for t in alone]
    assert [t.logprob for t in batched] == pytest.approx([t.logprob for t in alone], abs=1e-4)


async def test_a_batch_of_16_gives_every_job_its_tokens_alone(
    engine: TorchEngine, passes: Passes
) -> None:
    jobs = mixed_jobs()
    alone = [await run(engine, request) for request in jobs]
    assert max(passes.decode_rows) == 1
    passes.shapes.clear()
    cancelled = 9  # stopped after 4 of its 21 tokens

    async def batched_run(index: int, request: GenerationRequest) -> list[GeneratedToken]:
        if index == cancelled:
            return await run_until(engine, request, 4)
        return await run(engine, request)

    together = await asyncio.gather(*(batched_run(n, r) for n, r in enumerate(jobs)))
    for n, (batched, single) in enumerate(zip(together, alone, strict=True)):
        same_tokens(batched, single[:4] if n == cancelled else single)
    assert len(alone[cancelled]) > 4
    # The jobs really shared passes: most of the 16 decoded in one batch.
    assert max(passes.decode_rows) >= 8
    assert len(passes.shapes) < sum(len(tokens) for tokens in together)
    stats = engine.stats()
    assert (stats.running, stats.waiting) == (0, 0)
    assert stats.kv_blocks_free == stats.kv_blocks  # every block came back, the cancelled too


async def test_a_cancelled_job_frees_its_slot_for_a_waiting_one(model_dir: Path) -> None:
    async with TorchEngine.load("tiny", model_dir, max_concurrency=1) as single:
        long_job = job("long", [5, 6, 7], temperature=1.0, max_tokens=100)
        waiting = job("next", [8, 9], temperature=0, max_tokens=5)
        expected = await run(single, waiting)
        stream = single.generate(long_job)
        await anext(stream)
        queued = asyncio.create_task(run(single, waiting))
        await asyncio.sleep(0.05)
        assert single.stats().waiting == 1  # the only batch slot is taken
        await stream.aclose()
        same_tokens(await asyncio.wait_for(queued, 30), expected)
        assert single.stats().kv_blocks_free == single.stats().kv_blocks


async def test_long_prompts_are_fed_in_chunks_within_the_step_budget(model_dir: Path) -> None:
    budget = 16
    async with TorchEngine.load(
        "tiny", model_dir, max_concurrency=4, max_batch_tokens=budget
    ) as small_steps:
        passes = Passes()
        small_steps.model.register_forward_pre_hook(passes.record, with_kwargs=True)
        long_prompt = [(7 * i) % 250 + 1 for i in range(100)]
        long_job = job("long-prompt", long_prompt, temperature=0, max_tokens=4)
        decoding = [
            job(f"short-{n}", [n + 1, n + 2], temperature=0, max_tokens=40) for n in range(3)
        ]
        alone = [await run(small_steps, r) for r in (long_job, *decoding)]
        passes.shapes.clear()

        streams = [small_steps.generate(r) for r in decoding]
        firsts = [await anext(stream) for stream in streams]  # all three are decoding now
        started = len(passes.shapes)
        long_tokens = await run(small_steps, long_job)
        rests = [[t async for t in stream] for stream in streams]

    same_tokens(long_tokens, alone[0])
    for first, rest, single in zip(firsts, rests, alone[1:], strict=True):
        same_tokens([first, *rest], single)
    during = passes.shapes[started:]
    prefills = [tokens for rows, tokens in during if tokens > 1]
    # 100 prompt tokens in chunks that leave room for the 3 decode rows of each step ...
    assert sum(prefills) == 100
    assert max(prefills) <= budget - 3
    # ... and no prefill pass without a decode pass right after it: the running jobs got a
    # token every step while the long prompt was admitted.
    for index, (_, tokens) in enumerate(during[:-1]):
        if tokens > 1:
            assert during[index + 1] == (3, 1)


async def test_a_full_kv_cache_preempts_and_recomputes_without_changing_tokens(
    model_dir: Path,
) -> None:
    # Room for one full context (128 positions) only: four jobs of 20 + 60 positions cannot
    # all stay; the newest give their blocks back and are recomputed when room returns.
    async with TorchEngine.load(
        "tiny", model_dir, max_concurrency=4, kv_cache_tokens=CONTEXT_LENGTH
    ) as tight:
        jobs = [
            job(
                f"tight-{n}",
                [(13 * n + i) % 250 + 1 for i in range(20)],
                temperature=1.0,
                seed=n,
                max_tokens=60,
            )
            for n in range(4)
        ]
        alone = [await run(tight, r) for r in jobs]
        assert tight.stats().preemptions == 0
        together = await asyncio.gather(*(run(tight, r) for r in jobs))
        stats = tight.stats()
    for batched, single in zip(together, alone, strict=True):
        same_tokens(batched, single)
    assert stats.preemptions > 0
    assert stats.kv_blocks * 16 == CONTEXT_LENGTH
    assert stats.kv_blocks_free == stats.kv_blocks


async def test_non_finite_logits_fail_one_job_and_not_its_batch(
    engine: TorchEngine, passes: Passes
) -> None:
    healthy = [
        job(f"healthy-{n}", [n + 20, n + 21, n + 22], temperature=0, max_tokens=12)
        for n in range(3)
    ]
    alone = [await run(engine, r) for r in healthy]
    fed = {token for r in healthy for token in r.prompt_token_ids}
    fed |= {t.token_id for tokens in alone for t in tokens}
    poison = next(token for token in range(200, 256) if token not in fed)

    def poisoned(_: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        # Any sequence that feeds the poison token goes NaN from there on (through attention).
        return output.masked_fill((args[0] == poison)[..., None], float("nan"))

    handle = engine.model.get_input_embeddings().register_forward_hook(poisoned)
    try:
        # In a packed prefill with the healthy prompts ...
        in_prefill = job("poisoned-prefill", [1, poison, 3], temperature=0, max_tokens=12)
        results = await asyncio.gather(
            *(run(engine, r) for r in (*healthy, in_prefill)), return_exceptions=True
        )
        assert isinstance(results[-1], GenerationError)
        assert "not finite" in str(results[-1])
        for batched, single in zip(results[:-1], alone, strict=True):
            assert isinstance(batched, list)
            same_tokens(batched, single)
        # ... and as a row of a decode pass (a one-token prompt goes straight to decoding).
        streams = [engine.generate(r) for r in healthy]
        firsts = [await anext(stream) for stream in streams]
        with pytest.raises(GenerationError, match="not finite"):
            await run(engine, job("poisoned-decode", [poison], temperature=0, max_tokens=5))
        rests = [[t async for t in stream] for stream in streams]
    finally:
        handle.remove()
    for first, rest, single in zip(firsts, rests, alone, strict=True):
        same_tokens([first, *rest], single)
    # The poisoned job's blocks were zeroed and reused: later jobs are still right.
    for request, single in zip(healthy, alone, strict=True):
        same_tokens(await run(engine, request), single)


def score_request(index: int) -> ScoreRequest:
    prompt = [(17 * index + i) % 250 + 1 for i in range(5 + 4 * index)]
    completion = [(29 * index + 3 * i) % 250 + 1 for i in range(6 + 2 * index)]
    sampling = SamplingParams(temperature=0.9, top_k=40, seed=index)
    return ScoreRequest(
        noise_job_id=f"checked-{index}",
        prompt_token_ids=prompt,
        completion_token_ids=completion,
        sampling=sampling,
    )


def same_scores(batched: TokenScores, alone: TokenScores) -> None:
    assert batched.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
    assert batched.margins == pytest.approx(alone.margins, abs=1e-4)


async def test_scorings_batch_with_each_other_and_with_generation(engine: TorchEngine) -> None:
    requests = [score_request(n) for n in range(6)]
    alone = [await engine.score(r) for r in requests]
    generations = [
        job(f"busy-{n}", [n + 1, 40, 41], temperature=1.0, max_tokens=30) for n in range(8)
    ]
    results = await asyncio.gather(
        *(engine.score(r) for r in requests), *(run(engine, r) for r in generations)
    )
    for batched, single in zip(results[: len(requests)], alone, strict=True):
        assert isinstance(batched, TokenScores)
        same_scores(batched, single)


async def test_the_kv_cache_must_hold_one_full_context(model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="context length"):
        async with TorchEngine.load("tiny", model_dir, kv_cache_tokens=CONTEXT_LENGTH - 1):
            pass


async def test_a_model_whose_attention_ignores_the_mask_is_refused_at_load(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if the model attended to every key it is given (a kernel that ignores 4-D masks):
    # packed and padded rows would read each other's keys.
    monkeypatch.setattr(
        model_runner,
        "additive_mask",
        lambda visible, dtype: torch.zeros(visible.shape, dtype=dtype),
    )
    with pytest.raises(ModelLoadError, match="batching engine cannot serve"):
        async with TorchEngine.load("tiny", model_dir):
            pass
