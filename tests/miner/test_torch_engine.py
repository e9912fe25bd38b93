"""The torch engine against the real tiny model and Hugging Face's own generate()."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import torch

from miner import sampler
from miner.engine.base import (
    Engine,
    GenerationError,
    GenerationRequest,
    ModelLoadError,
    SamplingParams,
)
from miner.engine.torch_engine import TorchEngine
from miner.test_model import create_test_model
from proto.weights_digest import weights_sha256

PROMPTS = ([256, 72, 101, 108, 108, 111], [258, 117, 115, 101, 114, 10, 104, 105, 259, 10])
CONTEXT_LENGTH = 64

# One event loop for the module, so that one loaded engine serves every test.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_test_model(tmp_path_factory.mktemp("tiny"), context_length=CONTEXT_LENGTH)


@pytest.fixture(scope="module")
def reference_model(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    return model.eval()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(model_dir: Path) -> AsyncIterator[TorchEngine]:
    async with TorchEngine.load("tiny", model_dir, max_concurrency=2) as loaded:
        yield loaded


class ForwardCounter:
    """Counts forward passes of a model and the most that ran at the same time."""

    def __init__(self) -> None:
        self.calls = 0
        self.running = 0
        self.peak = 0
        self._lock = threading.Lock()

    def before(self, *_: Any) -> None:
        with self._lock:
            self.calls += 1
            self.running += 1
            self.peak = max(self.peak, self.running)

    def after(self, *_: Any) -> None:
        with self._lock:
            self.running -= 1


@pytest.fixture
def forwards(engine: TorchEngine) -> Iterator[ForwardCounter]:
    counter = ForwardCounter()
    handles = [
        engine.model.register_forward_pre_hook(counter.before),
        engine.model.register_forward_hook(counter.after),
    ]
    yield counter
    for handle in handles:
        handle.remove()


def request(prompt: list[int], job_id: str = "job", **sampling: Any) -> GenerationRequest:
    return GenerationRequest(
        job_id=job_id, prompt_token_ids=prompt, sampling=SamplingParams(**sampling)
    )


async def tokens_of(engine: TorchEngine, job: GenerationRequest) -> list[int]:
    return [token.token_id async for token in engine.generate(job)]


async def test_info_describes_the_model(engine: TorchEngine, model_dir: Path) -> None:
    assert isinstance(engine, Engine)
    info = engine.info
    assert info.name == "tiny"
    assert info.weights_sha256 == weights_sha256(model_dir)
    assert info.vocab_size == 260
    assert info.context_length == CONTEXT_LENGTH
    assert (info.dtype, info.device) == ("float32", "cpu")
    assert info.engine == f"torch-transformers/{torch.__version__}"


async def test_greedy_matches_hugging_face_generate(
    engine: TorchEngine, reference_model: Any
) -> None:
    eos = tuple(reference_model.generation_config.eos_token_id)
    for prompt in PROMPTS:
        job = request(list(prompt), temperature=0, max_tokens=24, stop_token_ids=eos)
        ours = await tokens_of(engine, job)
        with torch.inference_mode():
            theirs = reference_model.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=24
            )
        assert len(ours) > 2
        assert ours == theirs[0, len(prompt) :].tolist()


async def test_tokens_and_logprobs_match_a_teacher_forced_pass(
    engine: TorchEngine, reference_model: Any
) -> None:
    prompt = list(PROMPTS[1])
    job = request(prompt, temperature=1.0, top_k=40, seed=3, max_tokens=20)
    generated = [token async for token in engine.generate(job)]
    completion = [token.token_id for token in generated]
    with torch.inference_mode():
        logits = reference_model(torch.tensor([prompt + completion])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    for offset, token in enumerate(generated):
        row = len(prompt) - 1 + offset
        assert token.logprob == pytest.approx(float(logprobs[row, token.token_id]), abs=1e-4)
        # What a scorer does: the reference sampler over teacher-forced logits, same position.
        rescored, _ = sampler.sample(logits[row], job.sampling, job_id=job.job_id, position=offset)
        assert rescored == token.token_id


async def test_seed_decides_the_sampled_tokens(engine: TorchEngine) -> None:
    prompt = list(PROMPTS[0])
    first = await tokens_of(engine, request(prompt, temperature=1.0, seed=1, max_tokens=16))
    again = await tokens_of(engine, request(prompt, temperature=1.0, seed=1, max_tokens=16))
    other_seed = await tokens_of(engine, request(prompt, temperature=1.0, seed=2, max_tokens=16))
    other_job = await tokens_of(
        engine, request(prompt, "job-2", temperature=1.0, seed=1, max_tokens=16)
    )
    assert first == again
    assert first != other_seed
    assert first != other_job


async def test_max_tokens_is_respected(engine: TorchEngine) -> None:
    for max_tokens in (1, 5):
        job = request(list(PROMPTS[0]), temperature=1.0, max_tokens=max_tokens)
        assert len(await tokens_of(engine, job)) == max_tokens


async def test_generation_stops_after_a_stop_token(engine: TorchEngine) -> None:
    prompt = list(PROMPTS[0])
    free_run = await tokens_of(engine, request(prompt, temperature=0, max_tokens=16))
    # A token that greedy decoding emits for the first time at index >= 2.
    index = next(i for i, token in enumerate(free_run) if i >= 2 and token not in free_run[:i])
    stopped = await tokens_of(
        engine,
        request(prompt, temperature=0, max_tokens=16, stop_token_ids=(free_run[index], 259)),
    )
    assert stopped == free_run[: index + 1]


async def test_generation_stops_at_the_context_length(engine: TorchEngine) -> None:
    prompt = [65 + i % 26 for i in range(CONTEXT_LENGTH - 3)]
    assert len(await tokens_of(engine, request(prompt, temperature=0, max_tokens=10))) == 3


async def test_concurrent_jobs_match_sequential_runs(
    engine: TorchEngine, forwards: ForwardCounter
) -> None:
    jobs = [
        request(list(PROMPTS[0]), "a", temperature=1.0, seed=5, max_tokens=12),
        request(list(PROMPTS[1]), "b", temperature=0.8, top_p=0.9, seed=6, max_tokens=12),
        request(list(PROMPTS[0]), "c", temperature=0, max_tokens=12),
    ]
    sequential = [await tokens_of(engine, job) for job in jobs]
    assert forwards.peak == 1
    concurrent = await asyncio.gather(*(tokens_of(engine, job) for job in jobs))
    assert concurrent == sequential
    # max_concurrency=2 bounds the forward passes in flight, however many jobs wait.
    assert forwards.peak <= 2
    assert forwards.calls == 2 * 3 * 12


async def test_closing_the_stream_stops_generation(
    engine: TorchEngine, forwards: ForwardCounter
) -> None:
    stream = engine.generate(request(list(PROMPTS[0]), temperature=1.0, max_tokens=30))
    await anext(stream)
    await anext(stream)
    await stream.aclose()
    await asyncio.sleep(0.05)
    assert forwards.calls == 2  # the prefill and one decode step, nothing after
    # The job's slot was released: both slots serve new jobs.
    both = await asyncio.gather(
        *(tokens_of(engine, request(list(PROMPTS[0]), max_tokens=2)) for _ in range(2))
    )
    assert [len(tokens) for tokens in both] == [2, 2]


async def test_cancelling_the_consumer_stops_generation(
    engine: TorchEngine, forwards: ForwardCounter
) -> None:
    first_token = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(request(list(PROMPTS[1]), max_tokens=30)):
            first_token.set()

    task = asyncio.create_task(consume())
    await first_token.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    calls = forwards.calls
    await asyncio.sleep(0.05)
    assert calls <= 3
    assert forwards.calls == calls


@pytest.mark.parametrize(
    ("prompt", "sampling", "message"),
    [
        ([], {}, "empty"),
        ([1, 260], {}, "token ids"),
        ([-1], {}, "token ids"),
        (list(range(CONTEXT_LENGTH)), {}, "context length"),
        ([1, 2], {"max_tokens": 0}, "max_tokens"),
        ([1, 2], {"temperature": -0.5}, "temperature"),
        ([1, 2], {"top_p": 2.0}, "top_p"),
    ],
)
async def test_invalid_requests_raise_generation_error(
    engine: TorchEngine,
    forwards: ForwardCounter,
    prompt: list[int],
    sampling: dict[str, Any],
    message: str,
) -> None:
    with pytest.raises(GenerationError, match=message):
        await tokens_of(engine, request(prompt, **sampling))
    assert forwards.calls == 0


async def test_generate_after_unload_raises(model_dir: Path) -> None:
    async with TorchEngine.load("tiny", model_dir) as loaded:
        pass
    with pytest.raises(GenerationError, match="closed"):
        await tokens_of(loaded, request(list(PROMPTS[0])))


async def test_reduced_precision_loads_and_generates(model_dir: Path) -> None:
    async with TorchEngine.load("tiny", model_dir, dtype="bfloat16") as loaded:
        assert loaded.info.dtype == "bfloat16"
        generated = [t async for t in loaded.generate(request(list(PROMPTS[0]), max_tokens=4))]
    assert len(generated) == 4
    assert all(token.logprob < 0 for token in generated)


def _corrupt_copy(model_dir: Path, target: Path) -> Path:
    target.mkdir()
    (target / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    (target / "model.safetensors").write_bytes(b"not a safetensors file")
    return target


@pytest.mark.parametrize("case", ["missing", "empty", "no-weights", "bad-weights"])
async def test_unloadable_directories_raise_model_load_error(
    model_dir: Path, tmp_path: Path, case: str
) -> None:
    target = tmp_path / case
    if case == "empty":
        target.mkdir()
    elif case == "no-weights":
        target.mkdir()
        (target / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    elif case == "bad-weights":
        _corrupt_copy(model_dir, target)
    with pytest.raises(ModelLoadError, match=re.escape(str(target))):
        async with TorchEngine.load("tiny", target):
            pytest.fail("the engine loaded")


async def test_unknown_dtype_raises_model_load_error(model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="dtype"):
        async with TorchEngine.load("tiny", model_dir, dtype="int3"):
            pytest.fail("the engine loaded")
