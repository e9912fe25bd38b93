"""The vLLM engine on a GPU: the same tokens as the reference engine, batched or not, and
scores that pass its own output and the reference engine's.

Marked ``gpu``; skipped unless vLLM and a CUDA device are present (``make test-all`` on a GPU
box with ``pip install 'meshmint[vllm]'``). float32 on both engines, so the only differences are
the kernels' rounding.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import torch

from miner.engine.base import (
    GeneratedToken,
    GenerationRequest,
    SamplingParams,
    ScoreRequest,
)
from miner.engine.torch_engine import TorchEngine
from miner.scorer import TOLERANCE
from miner.test_model import create_test_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM"),
    pytest.mark.asyncio(loop_scope="module"),
]

STOP = 2
PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=24),
    SamplingParams(temperature=0.9, seed=11, max_tokens=24, top_logprobs=3),
    SamplingParams(temperature=1.2, top_k=20, top_p=0.8, seed=5, max_tokens=24),
    SamplingParams(temperature=1.0, seed=3, max_tokens=40, stop_token_ids=(STOP,)),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_test_model(tmp_path_factory.mktemp("tiny"), context_length=256)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vllm_engine(model_dir: Path) -> AsyncIterator[object]:
    from miner.engine.vllm_engine import VllmEngine

    async with VllmEngine.load(
        "tiny", model_dir, dtype="float32", max_concurrency=16, kv_cache_tokens=16 * 256
    ) as loaded:
        yield loaded


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def torch_engine(model_dir: Path) -> AsyncIterator[TorchEngine]:
    async with TorchEngine.load(
        "tiny", model_dir, device="cuda", dtype="float32", max_concurrency=16
    ) as loaded:
        yield loaded


def _request(index: int) -> GenerationRequest:
    prompt = [(7 * index + k) % 200 + 3 for k in range(1 + (index * 5) % 40)]
    return GenerationRequest(
        job_id=f"job-{index}", prompt_token_ids=prompt, sampling=PARAMS[index % len(PARAMS)]
    )


async def _collect(engine: object, request: GenerationRequest) -> list[GeneratedToken]:
    return [token async for token in engine.generate(request)]  # type: ignore[attr-defined]


async def test_same_tokens_as_the_reference_engine_alone_and_in_a_batch_of_16(
    vllm_engine: object, torch_engine: TorchEngine
) -> None:
    requests = [_request(index) for index in range(16)]
    alone = [await _collect(vllm_engine, request) for request in requests]
    batched = await asyncio.gather(*(_collect(vllm_engine, request) for request in requests))
    reference = [await _collect(torch_engine, request) for request in requests]
    for mine, together, theirs in zip(alone, batched, reference, strict=True):
        assert [t.token_id for t in mine] == [t.token_id for t in theirs]
        assert [t.token_id for t in together] == [t.token_id for t in theirs]
        for a, b in zip(mine, theirs, strict=True):
            assert abs(a.logprob - b.logprob) < 1e-3
            assert [i for i, _ in a.top_logprobs] == [i for i, _ in b.top_logprobs]
    stopped = alone[3]
    assert stopped[-1].token_id == STOP or len(stopped) == PARAMS[3].max_tokens


async def test_scores_pass_its_own_output_and_agree_with_the_reference_scorer(
    vllm_engine: object, torch_engine: TorchEngine
) -> None:
    for index in range(8):
        request = _request(index)
        tokens = await _collect(vllm_engine, request)
        score = ScoreRequest(
            noise_job_id=request.job_id,
            prompt_token_ids=request.prompt_token_ids,
            completion_token_ids=[t.token_id for t in tokens],
            sampling=request.sampling,
            claimed_top_ids=[[i for i, _ in t.top_logprobs] for t in tokens]
            if request.sampling.top_logprobs
            else (),
        )
        mine = await vllm_engine.score(score)  # type: ignore[attr-defined]
        theirs = await torch_engine.score(score)
        assert max(mine.margins) <= TOLERANCE
        assert max(theirs.margins) <= TOLERANCE
        for a, b in zip(mine.logprobs, theirs.logprobs, strict=True):
            assert abs(a - b) < 1e-3
        for a, claimed in zip(mine.logprobs, tokens, strict=True):
            assert abs(a - claimed.logprob) < 1e-3


async def test_a_closed_stream_leaves_the_engine_serving(vllm_engine: object) -> None:
    request = GenerationRequest(
        job_id="cancelled", prompt_token_ids=[5, 6, 7], sampling=SamplingParams(max_tokens=200)
    )
    stream = vllm_engine.generate(request)  # type: ignore[attr-defined]
    first = [await anext(stream), await anext(stream)]
    await stream.aclose()
    assert len(first) == 2
    after = await _collect(vllm_engine, _request(1))
    assert len(after) == PARAMS[1].max_tokens
