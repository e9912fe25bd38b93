"""The reference engine: a Hugging Face causal LM run with torch + transformers, batched.

One scheduler task owns the model (``miner.engine.scheduler``): every step it feeds the waiting
prompts in chunks and runs one batched forward pass over every decoding job, with the keys and
values of all jobs in one paged KV cache (``miner.engine.kv_cache``) whose size is fixed at
load. Every token is still chosen by :func:`miner.sampler.sample`, row by row, so a job's tokens
do not depend on what it was batched with beyond floating-point noise: the sampler's randomness
depends only on ``(seed, job id, position)``.

A GGUF file is served from a plain model directory converted from it once and cached
(``miner.engine.gguf_cache``); the engine announces the GGUF file's own digest.

Scoring a spot check (:meth:`TorchEngine.score`) is a teacher-forced pass run by the same
scheduler, in chunks under the same per-step budget. It takes no batch slot, so a miner busy
generating still answers checks.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch

from miner.engine.base import (
    DEFAULT_MAX_BATCH_TOKENS,
    BatchingConfig,
    GeneratedToken,
    GenerationError,
    GenerationRequest,
    ModelInfo,
    ModelLoadError,
    ScoreRequest,
    TokenScores,
)
from miner.engine.kv_cache import BlockPool, PagedKVCache
from miner.engine.model_runner import ModelRunner, UnsupportedModelError
from miner.engine.model_source import context_length, resolve_source, vocab_size
from miner.engine.request_checks import checked_generation, checked_scoring
from miner.engine.scheduler import Scheduler, SchedulerStats

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
BLOCK_SIZE = 16
"""Token positions per KV block."""


def default_device() -> str:
    """``"cuda"`` when a CUDA device is usable, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    """float32 on CPU; bfloat16 on CUDA when the device supports it, else float16."""
    if torch.device(device).type != "cuda":
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


class TorchEngine:
    """Serves one Hugging Face model directory or GGUF file. Build it with :meth:`load`."""

    def __init__(self, model: Any, info: ModelInfo, scheduler: Scheduler) -> None:
        self._model = model
        self._info = info
        self._scheduler = scheduler
        self._closed = False

    @classmethod
    @asynccontextmanager
    async def load(
        cls,
        name: str,
        source: Path,
        *,
        device: str | None = None,
        dtype: str | None = None,
        max_concurrency: int = 1,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        kv_cache_tokens: int | None = None,
        cache_dir: Path | None = None,
    ) -> AsyncIterator[TorchEngine]:
        """Loads ``source`` (in a worker thread) and yields the engine; frees it on exit.

        ``source`` is a Hugging Face model directory or a ``.gguf`` file. A GGUF file is
        converted once into ``cache_dir`` (see ``miner.engine.gguf_cache``) and served from
        there; its :attr:`ModelInfo.weights_sha256` is still the GGUF file's digest. There is no
        default cache: a GGUF source without ``cache_dir`` is a :class:`ModelLoadError`, rather
        than gigabytes written somewhere the caller did not choose.

        ``max_concurrency`` jobs decode together at most; a step feeds ``max_batch_tokens``
        tokens at most; the KV cache holds ``kv_cache_tokens`` positions (see
        :class:`BatchingConfig`), allocated here. ``device`` defaults to
        :func:`default_device`, ``dtype`` to :func:`default_dtype`. Raises
        :class:`ModelLoadError` when the source cannot be served.
        """
        batching = BatchingConfig(
            max_batch_size=max_concurrency,
            max_batch_tokens=max_batch_tokens,
            kv_cache_tokens=kv_cache_tokens,
        )
        model, info = await asyncio.to_thread(
            _load_model, name, Path(source), device=device, dtype=dtype, cache_dir=cache_dir
        )
        scheduler = await asyncio.to_thread(_build_scheduler, model, info, batching)
        engine = cls(model, info, scheduler)
        del model
        scheduler.start()
        try:
            yield engine
        finally:
            await engine._close()

    @property
    def info(self) -> ModelInfo:
        """The model this engine serves."""
        return self._info

    @property
    def model(self) -> Any:
        """The underlying ``transformers`` model, e.g. for a scorer's teacher-forced pass."""
        return self._model

    def stats(self) -> SchedulerStats:
        """The batching scheduler's state now (batch, queue, KV cache)."""
        return self._scheduler.stats()

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GeneratedToken, None]:
        """Yields the job's tokens as they are sampled.

        Raises :class:`GenerationError` (on the first iteration) for a request that cannot be
        served, or when its forward pass fails (non-finite logits fail this job alone). Stops
        after a stop token (which is yielded), after ``max_tokens`` tokens, or when prompt plus
        completion reaches the context length. Closing the iterator takes the job out of the
        batch at the next step and frees its KV blocks.
        """
        self._check_open()
        prompt = checked_generation(request, self._info)
        limit = min(request.sampling.max_tokens, self._info.context_length - len(prompt))
        generation = self._scheduler.submit_generation(request, prompt, limit=limit)
        logger.debug("job %s: %d prompt tokens, up to %d new", request.job_id, len(prompt), limit)
        try:
            while True:
                item = await generation.output.get()
                if item is None:
                    return
                if isinstance(item, GenerationError):
                    raise item
                yield item
        finally:
            self._scheduler.cancel(generation)

    async def score(self, request: ScoreRequest) -> TokenScores:
        """Log-probabilities and margins of another job's claimed tokens (see ``miner.scorer``).

        A teacher-forced pass over prompt + completion run by the scheduler, without a batch
        slot. Raises :class:`GenerationError` for a request that cannot be scored: an empty
        prompt, ids outside the vocabulary, more tokens than the context, bad sampling
        parameters. An empty completion scores to empty tuples without a forward pass.
        """
        self._check_open()
        checked = checked_scoring(request, self._info)
        prompt, completion = checked.prompt, checked.completion
        if not completion:
            return TokenScores(logprobs=(), margins=())
        logger.debug(
            "scoring job %s: %d prompt tokens, %d completion tokens",
            request.noise_job_id,
            len(prompt),
            len(completion),
        )
        scoring = self._scheduler.submit_scoring(request, prompt, completion)
        try:
            return await asyncio.shield(scoring.result)
        finally:
            # A caller that stopped waiting leaves the scoring to be dropped at the next step.
            if not scoring.result.done():
                scoring.result.cancel()

    def _check_open(self) -> None:
        if self._closed:
            raise GenerationError("the engine is closed")

    async def _close(self) -> None:
        self._closed = True
        await self._scheduler.close()
        self._model = None
        gc.collect()
        if self._info.device.startswith("cuda"):
            torch.cuda.empty_cache()
        logger.info("unloaded model %s", self._info.name)


def _build_scheduler(model: Any, info: ModelInfo, batching: BatchingConfig) -> Scheduler:
    """Blocking: allocates the KV cache and checks the model runs over it (worker thread)."""
    kv_tokens = batching.kv_tokens(info.context_length)
    if kv_tokens < info.context_length:
        raise ModelLoadError(
            f"a KV cache of {kv_tokens} tokens cannot hold one request of the model's context "
            f"length ({info.context_length}); give at least that many"
        )
    device = torch.device(info.device)
    pool = BlockPool(-(-kv_tokens // BLOCK_SIZE), block_size=BLOCK_SIZE)
    text_config = model.config.get_text_config()
    cache = PagedKVCache(num_layers=text_config.num_hidden_layers, pool=pool, device=device)
    runner = ModelRunner(model, cache=cache, device=device)
    try:
        with torch.inference_mode():
            runner.self_check(pool, vocab_size=info.vocab_size)
    except UnsupportedModelError as exc:
        raise ModelLoadError(
            f"{info.name}: the batching engine cannot serve this model: {exc}"
        ) from exc
    except torch.OutOfMemoryError as exc:
        raise ModelLoadError(
            f"{info.name}: a KV cache of {kv_tokens} tokens does not fit on {device}: {exc}"
        ) from exc
    logger.info(
        "%s: KV cache of %d tokens (%.1f MiB), batches of up to %d jobs and %d tokens a step",
        info.name,
        pool.num_blocks * BLOCK_SIZE,
        cache.allocated_bytes() / 2**20,
        batching.max_batch_size,
        batching.max_batch_tokens,
    )
    return Scheduler(
        runner,
        pool=pool,
        cache=cache,
        max_batch_size=batching.max_batch_size,
        max_batch_tokens=batching.max_batch_tokens,
        name=info.name,
    )


def _resolve_device(device: str | None) -> torch.device:
    try:
        resolved = torch.device(device or default_device())
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {device!r}: {exc}") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def _resolve_dtype(dtype: str | None, device: torch.device) -> str:
    name = dtype or default_dtype(str(device))
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ModelLoadError(f"unsupported dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return name


def _load_model(
    name: str, source: Path, *, device: str | None, dtype: str | None, cache_dir: Path | None
) -> tuple[Any, ModelInfo]:
    """Blocking: hashes (and converts a GGUF file) and loads the model. Runs on a worker thread."""
    from transformers import AutoModelForCausalLM

    resolved_device = _resolve_device(device)
    dtype_name = _resolve_dtype(dtype, resolved_device)
    resolved = resolve_source(source, cache_dir=cache_dir)
    logger.info(
        "loading %s from %s on %s as %s", name, resolved.directory, resolved_device, dtype_name
    )
    try:
        # Any: transformers' own annotations of from_pretrained/.to() confuse mypy.
        model: Any = AutoModelForCausalLM.from_pretrained(
            resolved.directory, local_files_only=True, dtype=DTYPES[dtype_name]
        )
        model = model.to(resolved_device).eval()
    except Exception as exc:  # transformers raises OSError, ValueError, SafetensorError, ...
        raise ModelLoadError(
            f"cannot load {resolved.describe()}: {type(exc).__name__}: {exc}"
        ) from exc
    text_config = model.config.get_text_config()
    info = ModelInfo(
        name=name,
        weights_sha256=resolved.weights_sha256,
        vocab_size=vocab_size(text_config, where=resolved.directory),
        context_length=context_length(text_config),
        dtype=dtype_name,
        device=str(resolved_device),
        engine=f"torch-transformers/{torch.__version__}",
    )
    return model, info
