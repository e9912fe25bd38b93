"""The torch engine against the real tiny model and Hugging Face's own generate()."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import torch

from miner import sampler
from miner.engine.base import (
    Engine,
    GeneratedToken,
    GenerationError,
    GenerationRequest,
    ModelLoadError,
    SamplingParams,
    ScoreRequest,
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
    """Counts forward passes of a model, the most that ran at the same time, and the most rows
    (sequences) one pass had."""

    def __init__(self) -> None:
        self.calls = 0
        self.running = 0
        self.peak = 0
        self.widest = 0
        self._lock = threading.Lock()

    def before(self, _: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        with self._lock:
            self.calls += 1
            self.running += 1
            self.peak = max(self.peak, self.running)
            if ids is not None:
                self.widest = max(self.widest, int(ids.shape[0]))

    def after(self, *_: Any) -> None:
        with self._lock:
            self.running -= 1


@pytest_asyncio.fixture(loop_scope="module")
async def forwards(engine: TorchEngine) -> AsyncIterator[ForwardCounter]:
    # A job an earlier test closed leaves the batch at the scheduler's next step: wait for
    # that, so its last pass is not counted here.
    for _ in range(500):
        stats = engine.stats()
        if not (stats.running or stats.waiting or stats.scoring):
            break
        await asyncio.sleep(0.01)
    counter = ForwardCounter()
    handles = [
        engine.model.register_forward_pre_hook(counter.before, with_kwargs=True),
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


async def generated_and_teacher_forced(
    engine: TorchEngine, reference_model: Any, job: GenerationRequest
) -> tuple[list[GeneratedToken], torch.Tensor]:
    """The engine's tokens for ``job`` and the reference model's logits over prompt + them."""
    generated = [token async for token in engine.generate(job)]
    completion = [token.token_id for token in generated]
    ids = torch.tensor([list(job.prompt_token_ids) + completion])
    with torch.inference_mode():
        return generated, reference_model(ids).logits[0]


async def test_tokens_and_logprobs_match_a_teacher_forced_pass(
    engine: TorchEngine, reference_model: Any
) -> None:
    prompt = list(PROMPTS[1])
    job = request(prompt, temperature=1.0, top_k=40, seed=3, max_tokens=20)
    generated, logits = await generated_and_teacher_forced(engine, reference_model, job)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    for offset, token in enumerate(generated):
        row = len(prompt) - 1 + offset
        assert token.logprob == pytest.approx(float(logprobs[row, token.token_id]), abs=1e-4)
        # What a scorer does: the reference sampler over teacher-forced logits, same position.
        rescored, _ = sampler.sample(logits[row], job.sampling, job_id=job.job_id, position=offset)
        assert rescored == token.token_id


async def test_top_logprobs_are_the_most_likely_tokens_of_a_teacher_forced_pass(
    engine: TorchEngine, reference_model: Any
) -> None:
    prompt = list(PROMPTS[0])
    job = request(prompt, temperature=1.0, seed=8, max_tokens=12, top_logprobs=5)
    generated, logits = await generated_and_teacher_forced(engine, reference_model, job)
    completion = [token.token_id for token in generated]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    for offset, token in enumerate(generated):
        row = logprobs[len(prompt) - 1 + offset]
        ids = [token_id for token_id, _ in token.top_logprobs]
        values = [value for _, value in token.top_logprobs]
        assert ids == torch.topk(row, 5).indices.tolist()
        assert values == pytest.approx(row[ids].tolist(), abs=1e-4)
        assert values == sorted(values, reverse=True)
        # Sampling picks from the whole distribution, so the chosen token may be outside the
        # five; inside, it is reported with the same logprob.
        if token.token_id in ids:
            assert values[ids.index(token.token_id)] == token.logprob
    # Without top_logprobs nothing extra is reported, and the tokens are the same.
    plain = [
        token
        async for token in engine.generate(request(prompt, temperature=1.0, seed=8, max_tokens=12))
    ]
    assert [t.token_id for t in plain] == completion
    assert all(t.top_logprobs == () for t in plain)


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
    assert forwards.widest == 1
    concurrent = await asyncio.gather(*(tokens_of(engine, job) for job in jobs))
    assert concurrent == sequential
    # One pass at a time, over a batch of at most max_concurrency=2 jobs, however many wait.
    assert forwards.peak == 1
    assert forwards.widest == 2


async def test_closing_the_stream_stops_generation(
    engine: TorchEngine, forwards: ForwardCounter
) -> None:
    stream = engine.generate(request(list(PROMPTS[0]), temperature=1.0, max_tokens=30))
    await anext(stream)
    await anext(stream)
    await stream.aclose()
    await asyncio.sleep(0.05)
    calls = forwards.calls
    await asyncio.sleep(0.1)
    # The job left the batch at the next step: passes stopped long before its 30 tokens.
    assert forwards.calls == calls < 30
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
    await asyncio.sleep(0.05)
    calls = forwards.calls
    await asyncio.sleep(0.1)
    assert forwards.calls == calls < 30


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
        ([1, 2], {"top_logprobs": 21}, "top_logprobs"),
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
    with pytest.raises(GenerationError, match="closed"):
        await loaded.score(score_request(list(PROMPTS[0]), [1, 2]))


def score_request(
    prompt: list[int], completion: list[int], job_id: str = "job", **sampling: Any
) -> ScoreRequest:
    return ScoreRequest(
        noise_job_id=job_id,
        prompt_token_ids=prompt,
        completion_token_ids=completion,
        sampling=SamplingParams(**sampling),
    )


HONEST_SAMPLING: list[dict[str, Any]] = [
    {"temperature": 0, "max_tokens": 20},
    {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": 11, "max_tokens": 20},
]


@pytest.mark.parametrize("sampling", HONEST_SAMPLING)
async def test_an_honest_completion_scores_zero_margins_and_its_own_logprobs(
    engine: TorchEngine, forwards: ForwardCounter, sampling: dict[str, Any]
) -> None:
    prompt = list(PROMPTS[1])
    job = request(prompt, "honest", **sampling)
    generated = [token async for token in engine.generate(job)]
    completion = [token.token_id for token in generated]
    calls = forwards.calls
    scores = await engine.score(score_request(prompt, completion, "honest", **sampling))
    assert forwards.calls == calls + 1, "scoring is one forward pass"
    assert len(scores.logprobs) == len(scores.margins) == len(completion) == 20
    assert scores.margins == (0.0,) * len(completion)
    for token, logprob in zip(generated, scores.logprobs, strict=True):
        assert abs(token.logprob - logprob) < 1e-4


async def test_a_substituted_token_has_a_positive_margin(engine: TorchEngine) -> None:
    sampling = HONEST_SAMPLING[1]
    prompt = list(PROMPTS[0])
    completion = await tokens_of(engine, request(prompt, "cheat", **sampling))
    honest = await engine.score(score_request(prompt, completion, "cheat", **sampling))
    position = 5
    forged = list(completion)
    # Any other token: the scorer's own pick is the honest one, which had margin 0.
    forged[position] = (completion[position] + 1) % engine.info.vocab_size
    scores = await engine.score(score_request(prompt, forged, "cheat", **sampling))
    assert scores.margins[:position] == (0.0,) * position
    assert scores.margins[position] > 0
    assert scores.logprobs[position] != honest.logprobs[position]
    # The same tokens under another job's noise are not an honest sample either.
    elsewhere = await engine.score(score_request(prompt, completion, "other-job", **sampling))
    assert any(margin > 0 for margin in elsewhere.margins)


async def test_a_token_outside_top_k_has_an_infinite_margin(engine: TorchEngine) -> None:
    prompt = list(PROMPTS[0])
    with torch.inference_mode():
        row = engine.model(input_ids=torch.tensor([prompt])).logits[0, -1]
    least_likely = int(torch.argmin(row).item())
    scores = await engine.score(
        score_request(prompt, [least_likely], temperature=1.0, top_k=5, seed=1)
    )
    assert scores.margins == (float("inf"),)
    assert scores.logprobs[0] == pytest.approx(float(torch.log_softmax(row, -1)[least_likely]))


async def test_scoring_runs_while_every_generation_slot_is_taken(engine: TorchEngine) -> None:
    prompt = list(PROMPTS[0])
    streams = [
        engine.generate(request(prompt, f"busy-{n}", temperature=1.0, max_tokens=40))
        for n in range(2)
    ]
    try:
        for stream in streams:
            await anext(stream)  # each stream now holds one of the engine's two slots
        # Waiting for a slot would deadlock: the streams are not consumed until this is done.
        scores = await asyncio.wait_for(engine.score(score_request(prompt, [1, 2, 3])), 60)
    finally:
        for stream in streams:
            await stream.aclose()
    assert len(scores.margins) == 3


async def test_an_empty_completion_scores_to_nothing_without_a_forward_pass(
    engine: TorchEngine, forwards: ForwardCounter
) -> None:
    scores = await engine.score(score_request(list(PROMPTS[0]), []))
    assert (scores.logprobs, scores.margins) == ((), ())
    assert forwards.calls == 0


@pytest.mark.parametrize(
    ("prompt", "completion", "sampling", "message"),
    [
        ([], [1], {}, "empty"),
        ([1, 260], [1], {}, "prompt token ids"),
        ([1, 2], [5, 260], {}, "completion token ids"),
        ([1, 2], [-1], {}, "completion token ids"),
        ([1] * (CONTEXT_LENGTH - 2), [1, 2, 3], {}, "context length"),
        ([1, 2], [3], {"temperature": float("nan")}, "temperature"),
        ([1, 2], [3], {"top_k": -1}, "top_k"),
    ],
)
async def test_invalid_score_requests_raise_generation_error(
    engine: TorchEngine,
    forwards: ForwardCounter,
    prompt: list[int],
    completion: list[int],
    sampling: dict[str, Any],
    message: str,
) -> None:
    with pytest.raises(GenerationError, match=message):
        await engine.score(score_request(prompt, completion, **sampling))
    assert forwards.calls == 0


async def test_a_completion_filling_the_context_exactly_can_be_scored(
    engine: TorchEngine,
) -> None:
    prompt = [65 + i % 26 for i in range(CONTEXT_LENGTH - 3)]
    completion = await tokens_of(engine, request(prompt, temperature=0, max_tokens=10))
    assert len(prompt) + len(completion) == CONTEXT_LENGTH
    scores = await engine.score(score_request(prompt, completion, temperature=0))
    assert scores.margins == (0.0,) * 3


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


async def test_scoring_checks_claimed_alternatives(engine: TorchEngine) -> None:
    prompt = list(PROMPTS[1])
    job = request(prompt, "alts", temperature=1.0, seed=4, max_tokens=10, top_logprobs=4)
    generated = [token async for token in engine.generate(job)]
    claimed = [[token_id for token_id, _ in token.top_logprobs] for token in generated]
    honest = ScoreRequest(
        noise_job_id="alts",
        prompt_token_ids=prompt,
        completion_token_ids=[token.token_id for token in generated],
        sampling=job.sampling,
        claimed_top_ids=claimed,
    )
    scores = await engine.score(honest)
    for token, scored, threshold in zip(
        generated, scores.top_logprobs, scores.top_thresholds, strict=True
    ):
        values = [value for _, value in token.top_logprobs]
        assert scored == pytest.approx(values, abs=1e-4)
        assert threshold == pytest.approx(values[-1], abs=1e-4)
    # An alternative that is not among the four most likely scores well below the threshold.
    fake = [[*ids[:-1], next(t for t in range(260) if t not in ids)] for ids in claimed]
    faked = await engine.score(dataclasses.replace(honest, claimed_top_ids=fake))
    assert any(
        values[-1] < threshold - 0.1
        for values, threshold in zip(faked.top_logprobs, faked.top_thresholds, strict=True)
    )
    with pytest.raises(GenerationError, match="top_logprobs"):
        await engine.score(dataclasses.replace(honest, claimed_top_ids=claimed[:-1]))
    with pytest.raises(GenerationError, match="top_logprobs token ids"):
        await engine.score(dataclasses.replace(honest, claimed_top_ids=[[300]] * len(claimed)))
