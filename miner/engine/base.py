"""The narrow boundary between the miner daemon and whatever runs the model.

The daemon only sees :class:`Engine`. The torch + transformers engine lives in
``miner.engine.torch_engine``; an adapter for an external engine (vLLM, llama.cpp) implements
the same protocol. Engines generate from token ids: they never see text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

DEFAULT_MAX_BATCH_TOKENS = 512
"""Tokens (prefill chunks plus decode rows) one step feeds by default."""
_DEFAULT_KV_TOKENS_PER_SEQUENCE = 2048


@dataclass(frozen=True)
class BatchingConfig:
    """How much one engine batches; the miner CLI builds it from its flags."""

    # Jobs decoded together in one forward pass at most (the miner's --max-concurrency).
    max_batch_size: int = 1
    # Tokens one step feeds: decode rows plus prompt chunks (--max-batch-tokens). Bounds how long
    # admitting a long prompt can hold up the running jobs.
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    # Token positions the KV cache holds across all jobs (--kv-cache-tokens); None: room for
    # max_batch_size jobs of min(context, 2048) tokens, and at least one of the full context.
    kv_cache_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < 1:
            raise ValueError(f"kv_cache_tokens must be >= 1, got {self.kv_cache_tokens}")

    def kv_tokens(self, context_length: int) -> int:
        """The KV cache's size in tokens for a model with ``context_length``."""
        if self.kv_cache_tokens is not None:
            return self.kv_cache_tokens
        per_sequence = min(context_length, _DEFAULT_KV_TOKENS_PER_SEQUENCE)
        return max(context_length, self.max_batch_size * per_sequence)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token; see ``miner.sampler`` for the exact reference procedure."""

    temperature: float = 1.0  # 0 is greedy argmax
    top_p: float = 1.0  # 1.0 disables nucleus sampling
    top_k: int = 0  # 0 disables top-k
    max_tokens: int = 16  # generated tokens, stop token included
    seed: int = 0  # keys the Gumbel noise with the job id and the position
    stop_token_ids: tuple[int, ...] = ()  # generation ends after emitting one of these
    # Alternatives reported with each token (0-20, OpenAI's top_logprobs): the most likely
    # tokens under the same fp32 log-softmax as ``logprob``. They never change the choice.
    top_logprobs: int = 0


@dataclass(frozen=True)
class GenerationRequest:
    """One job for an engine."""

    job_id: str  # part of the noise key, so two jobs with the same seed differ
    prompt_token_ids: Sequence[int]  # already tokenized by the coordinator
    sampling: SamplingParams  # the coordinator's sampling parameters


@dataclass(frozen=True)
class GeneratedToken:
    """One sampled token."""

    token_id: int  # the chosen token
    logprob: float  # log-softmax of the fp32 logits at temperature 1, for the chosen token
    # The request's top_logprobs most likely (token id, logprob) pairs, most likely first.
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class ScoreRequest:
    """A finished job to re-score: one teacher-forced pass over prompt + completion."""

    noise_job_id: str  # the job id that keyed the checked job's Gumbel noise
    prompt_token_ids: Sequence[int]  # the checked job's prompt
    completion_token_ids: Sequence[int]  # the tokens the checked miner claims it sampled
    sampling: SamplingParams  # the checked job's sampling parameters
    # When the checked job reported top_logprobs: one tuple per completion token, the
    # alternatives it claimed there; empty otherwise.
    claimed_top_ids: Sequence[Sequence[int]] = ()


@dataclass(frozen=True)
class TokenScores:
    """What a scorer finds for each claimed completion token (see ``miner.scorer``)."""

    logprobs: tuple[float, ...]  # log-softmax of the scorer's fp32 logits, temperature 1
    margins: tuple[float, ...]  # max(scores) - scores[token]; 0 = same pick, inf = truncated away
    # Where the reference sampler picks a stop token: that token's margin; elsewhere the best
    # stop token's score minus the pick's (< 0; -inf: none can be picked). Empty: not computed
    # (an engine that predates it); the coordinator then treats skipped stops as unknown.
    stop_margins: tuple[float, ...] = ()
    # One per claimed_top_ids entry (or none): the scorer's logprobs of the claimed
    # alternatives, same order ...
    top_logprobs: tuple[tuple[float, ...], ...] = ()
    # ... and its k-th largest logprob at the position, k the number claimed there.
    top_thresholds: tuple[float, ...] = ()


@dataclass(frozen=True)
class ModelInfo:
    """What an engine serves; the daemon announces it in Hello."""

    name: str  # the catalog name the coordinator knows the model by
    weights_sha256: bytes  # proto.weights_digest.weights_sha256 of the model directory or GGUF
    vocab_size: int  # logits width; token ids are in [0, vocab_size)
    context_length: int  # prompt + generated tokens may not exceed this
    dtype: str  # compute dtype, e.g. "float32"
    device: str  # e.g. "cpu" or "cuda:0"
    engine: str  # engine implementation and version, e.g. "torch-transformers/2.13.0"


class EngineError(Exception):
    """Root of engine failures.

    EngineError
    ├── ModelLoadError     the model directory is missing, incomplete or unsupported
    ├── GenerationError    a request could not be served (e.g. prompt longer than the context)
    └── UnsupportedModelError  the model cannot run over the paged KV cache (model_runner.py;
                               the torch engine reports it as a ModelLoadError)
    """


class ModelLoadError(EngineError):
    """The model directory is missing, incomplete or unsupported."""


class GenerationError(EngineError):
    """A request could not be served."""


@runtime_checkable
class Engine(Protocol):
    """Runs one model. Implementations are async context managers that free the model on exit."""

    @property
    def info(self) -> ModelInfo:
        """The model this engine serves."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GeneratedToken]:
        """Yields tokens as they are produced.

        Ends after a stop token, after ``max_tokens`` tokens, or at the context length.
        Closing the iterator early (``aclose()``) cancels generation promptly. Many calls may
        run at once; the engine decides how to share the device.
        """
        ...

    async def score(self, request: ScoreRequest) -> TokenScores:
        """Scores another job's claimed tokens under the reference sampler (a spot check).

        One teacher-forced forward pass over prompt + completion: no sampling, no KV cache
        kept. Raises :class:`GenerationError` for a request that cannot be scored.
        """
        ...


class EngineLoader(Protocol):
    """How the miner starts an engine: ``TorchEngine.load`` and ``VllmEngine.load``.

    Loads ``source`` (a Hugging Face directory, or a GGUF file converted once into
    ``cache_dir``) and yields the engine; frees it on exit. Raises :class:`ModelLoadError`.
    """

    def __call__(
        self,
        name: str,
        source: Path,
        *,
        device: str | None = None,
        dtype: str | None = None,
        max_concurrency: int = 1,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        kv_cache_tokens: int | None = None,
        cache_dir: Path | None = None,
    ) -> AbstractAsyncContextManager[Engine]: ...
