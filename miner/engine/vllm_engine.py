"""An engine that runs the model with vLLM (``pip install 'meshmint[vllm]'``, CUDA only).

vLLM brings its own continuous batching, paged attention kernels and CUDA graphs; what it does
not bring is a sampler anyone else can replay. So it runs the forward passes and
:mod:`miner.engine.vllm_processor` picks every token with the reference sampler (a logits
processor that leaves vLLM one allowed token per row); vLLM reports log-probabilities of the
raw logits (``logprobs_mode="raw_logprobs"``), as receipts define them.

Scoring a spot check is one prefill of ``prompt + completion[:-1]`` asking for the full
vocabulary's log-probabilities at the completion's rows (``prompt_logprobs=-1`` from
``prompt_logprob_start``) and at the one sampled row (``logprobs=-1``); log-probabilities are
logits up to a constant per row, which changes neither margins nor logprobs, so
:func:`miner.scorer.score_rows` scores them as it scores logits. Scoring requests never read the
prefix cache (vLLM's rule for prompt log-probabilities), so a score is computed from this
prompt alone; generation uses the prefix cache, which changes values only within the
floating-point noise that batching already brings.

Pinned to vLLM 0.34's interfaces (Model Runner V2 logits processors, ``FlatLogprobs``). What
goes to vLLM and what comes back is translated in ``miner.engine.vllm_translation``; this
module imports vLLM only when an engine loads, so it imports (and fails clearly) without it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

from miner import scorer
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
from miner.engine.forced_choice import KeyedJob
from miner.engine.model_source import ModelSource, context_length, resolve_source, vocab_size
from miner.engine.request_checks import checked_generation, checked_scoring
from miner.engine.torch_engine import DTYPES, default_dtype
from miner.engine.vllm_translation import (
    engine_arguments,
    generated_tokens,
    generation_parameters,
    position_logprobs,
    scoring_parameters,
    scoring_rows,
)

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'meshmint[vllm]'"


class VllmEngine:
    """Serves one model with vLLM's ``AsyncLLM``. Build it with :meth:`load`."""

    def __init__(self, llm: Any, info: ModelInfo) -> None:
        self._llm = llm
        self._info = info
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
    ) -> AsyncIterator[VllmEngine]:
        """Starts vLLM on ``source`` and yields the engine; shuts vLLM down on exit.

        Same arguments as ``TorchEngine.load``. The device must be CUDA (``None``, ``"cuda"``
        or ``"cuda:0"``; pick another card with ``CUDA_VISIBLE_DEVICES``). Without
        ``kv_cache_tokens`` vLLM sizes its KV cache from the free GPU memory. Raises
        :class:`ModelLoadError` when vLLM is missing or cannot serve ``source``.
        """
        batching = BatchingConfig(
            max_batch_size=max_concurrency,
            max_batch_tokens=max_batch_tokens,
            kv_cache_tokens=kv_cache_tokens,
        )
        try:
            import vllm
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise ModelLoadError(f"the vLLM engine needs vLLM: {INSTALL_HINT} ({exc})") from exc
        check_device(device)
        dtype_name = _dtype_for_cuda(dtype)
        resolved, model_vocab, model_context = await asyncio.to_thread(
            _inspect_source, source, cache_dir=cache_dir
        )
        arguments = engine_arguments(resolved.directory, dtype=dtype_name, batching=batching)
        logger.info("starting vLLM %s for %s from %s", vllm.__version__, name, resolved.describe())
        try:
            llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**arguments))
        except Exception as exc:  # vLLM raises ValueError, RuntimeError, OOM, ... at start
            raise ModelLoadError(
                f"vLLM cannot serve {resolved.describe()}: {type(exc).__name__}: {exc}"
            ) from exc
        engine: VllmEngine | None = None
        try:
            info = ModelInfo(
                name=name,
                weights_sha256=resolved.weights_sha256,
                vocab_size=model_vocab,
                context_length=min(model_context, int(llm.model_config.max_model_len)),
                dtype=dtype_name,
                device="cuda:0",
                engine=f"vllm/{vllm.__version__}",
            )
            engine = cls(llm, info)
            yield engine
        finally:
            if engine is not None:
                engine._closed = True
            llm.shutdown()
            logger.info("unloaded model %s", name)

    @property
    def info(self) -> ModelInfo:
        """The model this engine serves."""
        return self._info

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GeneratedToken, None]:
        """Yields the job's tokens as vLLM produces them (see ``Engine.generate``).

        Raises :class:`GenerationError` for a request that cannot be served, when vLLM fails it,
        or when a token's log-probability is not finite (non-finite logits fail this job).
        Closing the iterator aborts the request in vLLM, which frees its KV blocks.
        """
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        self._check_open()
        prompt = checked_generation(request, self._info)
        limit = min(request.sampling.max_tokens, self._info.context_length - len(prompt))
        job = KeyedJob(job_id=request.job_id, sampling=request.sampling, prompt_length=len(prompt))
        params = VllmSamplingParams(
            **generation_parameters(job, max_tokens=limit),
            output_kind=RequestOutputKind.DELTA,
        )
        request_id = f"{request.job_id}-{uuid.uuid4().hex[:12]}"
        stream = self._llm.generate(TokensPrompt(prompt_token_ids=prompt), params, request_id)
        finished = False
        try:
            async for output in stream:
                completion = output.outputs[0]
                positions = position_logprobs(completion.logprobs)
                for token in generated_tokens(
                    completion.token_ids, positions, alternatives=request.sampling.top_logprobs
                ):
                    if not math.isfinite(token.logprob):
                        raise GenerationError(
                            f"job {request.job_id}: the model's logits are not finite"
                        )
                    yield token
                finished = bool(output.finished)
                if finished:
                    return
        except (GenerationError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:  # vLLM's own errors: validation, a dead engine core, ...
            raise GenerationError(f"vLLM failed job {request.job_id}: {exc}") from exc
        finally:
            await stream.aclose()
            if not finished:
                with suppress(Exception):
                    await self._llm.abort(request_id)

    async def score(self, request: ScoreRequest) -> TokenScores:
        """Scores another job's claimed tokens from full-vocabulary log-probabilities."""
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        self._check_open()
        checked = checked_scoring(request, self._info)
        prompt, completion = checked.prompt, checked.completion
        if not completion:
            return TokenScores(logprobs=(), margins=())
        params = VllmSamplingParams(
            **scoring_parameters(len(prompt), len(completion)),
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        request_id = f"score-{request.noise_job_id}-{uuid.uuid4().hex[:12]}"
        fed = prompt + completion[:-1]
        final: Any = None
        try:
            async for output in self._llm.generate(
                TokensPrompt(prompt_token_ids=fed), params, request_id
            ):
                final = output
        except Exception as exc:
            raise GenerationError(
                f"vLLM failed to score job {request.noise_job_id}: {exc}"
            ) from exc
        if final is None:
            raise GenerationError(f"vLLM returned nothing for scoring job {request.noise_job_id}")
        rows = scoring_rows(
            prompt_logprobs=position_logprobs(final.prompt_logprobs),
            sampled_logprobs=position_logprobs(final.outputs[0].logprobs),
            completion_length=len(completion),
            vocab_size=self._info.vocab_size,
        )
        try:
            return await asyncio.to_thread(
                scorer.score_rows,
                rows,
                completion,
                request.sampling,
                noise_job_id=request.noise_job_id,
                claimed_top_ids=checked.claimed_top_ids,
            )
        except ValueError as exc:
            raise GenerationError(str(exc)) from exc

    def _check_open(self) -> None:
        if self._closed:
            raise GenerationError("the engine is closed")


def check_device(device: str | None) -> None:
    """Refuses a device vLLM will not run on, with the way out in the message."""
    if device in (None, "cuda", "cuda:0"):
        return
    if device is not None and device.startswith("cuda:"):
        raise ModelLoadError(
            f"the vLLM engine runs on the first visible GPU; for {device}, set "
            f"CUDA_VISIBLE_DEVICES={device.partition(':')[2]} and use --device cuda"
        )
    raise ModelLoadError(f"the vLLM engine needs a CUDA device, not {device!r}; use --engine torch")


def _dtype_for_cuda(dtype: str | None) -> str:
    if dtype is None:
        return default_dtype("cuda")
    if dtype not in DTYPES:
        raise ModelLoadError(f"unsupported dtype {dtype!r}; choose one of {list(DTYPES)}")
    return dtype


def _inspect_source(source: Path, *, cache_dir: Path | None) -> tuple[ModelSource, int, int]:
    """Blocking: the source's directory and digest, its vocabulary and its context length."""
    from transformers import AutoConfig

    resolved = resolve_source(source, cache_dir=cache_dir)
    try:
        config = AutoConfig.from_pretrained(resolved.directory, local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, ...
        raise ModelLoadError(f"cannot read the config of {resolved.describe()}: {exc}") from exc
    text_config = config.get_text_config()
    return resolved, vocab_size(text_config, where=resolved.directory), context_length(text_config)
