"""The in-process paths of ``bench/engine.py`` and the workload every path shares.

* **engine**: ``TorchEngine`` in this process, loaded per level with ``max_concurrency`` N and
  a KV cache that holds every client's sequence, driven by the closed loop of
  ``bench/engine_load.py``;
* **hf**: then transformers' ``generate`` on that engine's model, one static, left-padded
  batch of N.

(The coordinator path is ``bench/engine_coordinator.py``.) Every request is greedy with the
model's stop tokens (the coordinator always sends them), on a prompt whose greedy completion has
no stop token within ``max_tokens`` (:func:`prepare` screens the candidates), so every request
on every path does the same work.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]  # installed with pgserver; no stubs here

from bench.engine_load import (
    CpuMeter,
    PathFigures,
    Timing,
    closed_loop,
    figures,
    own_peak_rss_mib,
)

# Candidate prompts; the ones whose greedy completion meets a stop token are left out.
QUESTIONS = (
    "What is the capital of France?",
    "Explain photosynthesis in one sentence.",
    "Write a haiku about the sea.",
    "Give me three tips for learning Python.",
    "Why is the sky blue?",
    "What is a prime number?",
    "Describe a cat to someone who has never seen one.",
    "How do airplanes stay in the air?",
    "Name three rivers in Africa.",
    "What does a compiler do?",
    "Summarise the plot of Hamlet.",
    "How many legs does a spider have?",
    "Suggest a name for a bakery.",
    "What is the boiling point of water?",
    "Translate 'good morning' into Spanish.",
    "Why do leaves change colour in autumn?",
)
MIN_PROMPTS = 4  # fewer full-length prompts than this and the workload is too narrow to trust


@dataclass(frozen=True)
class Workload:
    """One model's requests: the same on every path."""

    label: str
    source: Path  # model directory or GGUF file
    questions: tuple[str, ...]  # user messages whose greedy completion has no stop token
    prompts: tuple[tuple[int, ...], ...]  # their chat-rendered token ids
    stop_token_ids: tuple[int, ...]
    max_tokens: int
    context_length: int
    cache_dir: Path  # converted GGUF weights
    parameters: int  # the model's parameter count

    def kv_cache_tokens(self, concurrency: int) -> int:
        """Room for every client's sequence, so no request is preempted; and at least one full
        context, which the engine requires. The default (2,048 positions a slot) would allocate
        gigabytes for SmolLM2 at concurrency 32 that the workload never touches."""
        longest = max(len(prompt) for prompt in self.prompts) + self.max_tokens
        per_sequence = -(-longest // 16) * 16  # whole KV blocks of 16 positions
        return max(self.context_length, concurrency * per_sequence)

    def sampling(self, max_tokens: int) -> Any:
        from miner.engine.base import SamplingParams

        return SamplingParams(
            temperature=0, max_tokens=max_tokens, stop_token_ids=self.stop_token_ids
        )


async def prepare(label: str, source: Path, *, max_tokens: int, cache_dir: Path) -> Workload:
    """Renders the candidate prompts and keeps those whose greedy completion reaches
    ``max_tokens`` (one batched run, which also warms the process up)."""
    from coordinator.api import ChatMessage
    from coordinator.text.tokenization import ModelTokenizer
    from miner.engine.base import GenerationRequest, SamplingParams
    from miner.engine.torch_engine import TorchEngine

    tokenizer = ModelTokenizer.from_source(source, name=label)
    prompts = [
        tuple(tokenizer.encode_chat([ChatMessage(role="user", content=question)]))
        for question in QUESTIONS
    ]
    stops = tuple(tokenizer.stop_token_ids)
    sampling = SamplingParams(temperature=0, max_tokens=max_tokens, stop_token_ids=stops)
    longest = max(len(prompt) for prompt in prompts) + max_tokens
    async with TorchEngine.load(
        label,
        source,
        device="cpu",
        max_concurrency=len(prompts),
        kv_cache_tokens=max(tokenizer.context_length, len(prompts) * (longest + 16)),
        cache_dir=cache_dir,
    ) as engine:

        async def tokens(index: int) -> int:
            request = GenerationRequest(
                job_id=f"screen-{index}", prompt_token_ids=prompts[index], sampling=sampling
            )
            return len([token async for token in engine.generate(request)])

        counts = await asyncio.gather(*(tokens(index) for index in range(len(prompts))))
        parameters = sum(parameter.numel() for parameter in engine.model.parameters())
    kept = [index for index, count in enumerate(counts) if count == max_tokens]
    if len(kept) < MIN_PROMPTS:
        raise RuntimeError(
            f"{label}: only {len(kept)} of {len(prompts)} prompts run {max_tokens} tokens "
            f"without a stop token; lower --max-tokens"
        )
    return Workload(
        label=label,
        source=source,
        questions=tuple(QUESTIONS[index] for index in kept),
        prompts=tuple(prompts[index] for index in kept),
        stop_token_ids=stops,
        max_tokens=max_tokens,
        context_length=tokenizer.context_length,
        cache_dir=cache_dir,
        parameters=int(parameters),
    )


# --- engine: in this process -------------------------------------------------------------------


@dataclass(frozen=True)
class EngineLevel:
    """The engine path at one level: the client's figures and the scheduler's."""

    figures: PathFigures
    largest_decode_batch: int  # the most rows one decode pass had (warm-up included)
    tokens_per_step: float  # tokens sampled per engine step, warm-up included: the mean batch
    preemptions: int
    kv_cache_mib: float  # the paged KV pool, allocated at load
    peak_rss_mib: float  # this process's peak so far (screening and lower levels included)
    hf_tokens_per_s: float | None  # transformers' generate, one static batch of N
    # Over the level's whole loop (warm-up included): CPU seconds per second of this process
    # ("bench") and of the whole machine, and this process's CPU milliseconds per token.
    cpu_cores: dict[str, float]
    cpu_ms_per_token: float


async def engine_level(
    workload: Workload, concurrency: int, per_client: int, *, hf: bool
) -> EngineLevel:
    """The closed loop on a fresh engine; then, with ``hf``, transformers' generate on its
    model (the engine idle), as a static batch of ``concurrency``."""
    from miner.engine.base import GenerationRequest
    from miner.engine.torch_engine import BLOCK_SIZE, TorchEngine

    async with TorchEngine.load(
        workload.label,
        workload.source,
        device="cpu",
        max_concurrency=concurrency,
        kv_cache_tokens=workload.kv_cache_tokens(concurrency),
        cache_dir=workload.cache_dir,
    ) as engine:
        generated = 0

        async def one(client: int, index: int, max_tokens: int) -> Timing:
            nonlocal generated
            request = GenerationRequest(
                job_id=f"bench-{concurrency}-{client}-{index}",
                prompt_token_ids=workload.prompts[(client + index) % len(workload.prompts)],
                sampling=workload.sampling(max_tokens),
            )
            sent = time.perf_counter()
            arrivals = [time.perf_counter() async for _ in engine.generate(request)]
            generated += len(arrivals)
            return Timing(sent, tuple(arrivals), time.perf_counter())

        watch = {"bench": [psutil.Process()]}
        cpu = CpuMeter(watch)
        timings = await closed_loop(
            one, clients=concurrency, per_client=per_client, max_tokens=workload.max_tokens
        )
        cores, cpu_s = cpu.read()
        stats = engine.stats()
        kv_bytes = (stats.kv_blocks + 1) * BLOCK_SIZE * kv_bytes_per_token(engine.model)
        peak_rss = own_peak_rss_mib()  # before generate's own allocations
        hf_rate = None
        if hf:
            hf_generate(engine.model, workload.prompts, batch=1, max_tokens=2)  # warm-up
            hf_rate = hf_generate(
                engine.model, workload.prompts, batch=concurrency, max_tokens=workload.max_tokens
            )
    return EngineLevel(
        figures=figures(timings),
        largest_decode_batch=stats.largest_decode_batch,
        tokens_per_step=generated / max(1, stats.steps),
        preemptions=stats.preemptions,
        kv_cache_mib=kv_bytes / 2**20,
        peak_rss_mib=peak_rss,
        hf_tokens_per_s=hf_rate,
        cpu_cores=cores,
        cpu_ms_per_token=1000 * cpu_s / max(1, generated),
    )


def kv_bytes_per_token(model: Any) -> int:
    """Keys and values of one position across layers (the null block included by the caller)."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(2 * config.num_hidden_layers * kv_heads * head_dim * model.dtype.itemsize)


# --- hf: transformers' generate ----------------------------------------------------------------


def hf_generate(
    model: Any, prompts: Sequence[Sequence[int]], *, batch: int, max_tokens: int
) -> float:
    """Greedy ``generate`` over one left-padded batch, exactly ``max_tokens`` each: tokens/s."""
    import torch

    pad = 0
    rows = [list(prompts[i % len(prompts)]) for i in range(batch)]
    width = max(len(row) for row in rows)
    ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            pad_token_id=pad,
        )
    generated = int(output.shape[1]) - width
    return generated * batch / (time.perf_counter() - started)
