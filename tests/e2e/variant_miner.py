"""Runs the real `meshmint-miner` CLI with its engine wrapped by a misbehaving variant.

Test-only: these variants never ship in the CLI. Usage:
    python tests/e2e/variant_miner.py VARIANT [miner CLI args...]
VARIANT is one of:

- ``honest``: the real engine, unchanged.
- ``slow:<seconds per token>``: the real tokens, each after a delay.
- ``die-on-job``: the process exits when it takes a job, before any token.
- ``freeze-on-job``: SIGSTOPs the miner's own process when it takes a job: it stops
  heartbeating, but its TCP connection stays open, like a hung machine.
- ``garbage``: one token id outside the vocabulary.
- ``substitute:<fraction>``: the real model runs, but each token is replaced, with probability
  ``fraction`` (a generator seeded from the job id), by another valid token id that is not a
  stop token, streamed with the original token's log-probability. Generation continues from
  the model's own choice (the cheap cheat: the forgery costs nothing). Stop tokens are never
  replaced, so the job still ends the way an honest one does.
- ``random``: ``max_tokens`` uniformly random non-stop token ids (fewer when the context is
  shorter), each with log-probability -1.0; no forward pass at all.
- ``truncate``: the first half of the real tokens (generated in full first), then
  ``stop_token_ids[0]``: a forged early end that passes the coordinator's structural checks.
- ``skip-stop``: the reference sampler's tokens, except at the first position where it picks a
  stop token: there the best other token (by the sampler's own scores), with its true
  log-probability, and generation goes on from it (:func:`skip_first_stop`). The output is
  padded past its end to bill more tokens, with every token the sampler's best but one. It runs
  its own fp32 copy of the model on the CPU, one full forward pass a token, not the engine.
- ``fake-top``: the real tokens and logprobs, but wherever the job asked for top_logprobs the
  last alternative is replaced by the least likely token of the vocabulary not already named,
  reported with the real last alternative's logprob (made-up alternatives that look plausible).
- ``lying-scorer``: generates honestly, but as a spot-check scorer reports every margin as 5.0
  and every log-probability shifted by -1.0, framing whoever it checks.

Every variant but ``lying-scorer`` scores spot checks honestly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import random
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch

from miner import sampler
from miner.engine.base import (
    Engine,
    GeneratedToken,
    GenerationError,
    GenerationRequest,
    ModelInfo,
    ScoreRequest,
    TokenScores,
)

LYING_MARGIN = 5.0
LYING_LOGPROB_SHIFT = -1.0
RANDOM_LOGPROB = -1.0


def skip_first_stop(
    model: Any, request: GenerationRequest, *, context_length: int, skip: bool = True
) -> Iterator[GeneratedToken]:
    """The reference sampler's tokens for ``request`` on ``model`` (fp32, CPU), except, with
    ``skip``, at the first position where it picks a stop token: there the token with the best
    sampling score among the others (none when every other token is truncated away).

    One full forward pass a token: slow, but it needs nothing of the engine's internals. Each
    token may be asked for on another thread (``inference_mode`` is entered per pass).
    """
    params = request.sampling
    ids = list(request.prompt_token_ids)
    budget = min(params.max_tokens, context_length - len(ids))
    vocab = int(model.config.vocab_size)
    stops = sorted({t for t in params.stop_token_ids if 0 <= t < vocab})
    to_skip = skip
    for position in range(max(0, budget)):
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            scores = sampler.sampling_scores(
                logits, params, job_id=request.job_id, position=position
            )
            token = int(torch.argmax(scores))
            if to_skip and token in stops:
                others = scores.clone()
                others[stops] = -math.inf
                if math.isfinite(float(others.max())):
                    token, to_skip = int(torch.argmax(others)), False
            logprob = float(sampler.logprobs_fp32(logits)[token])
        yield GeneratedToken(token_id=token, logprob=logprob)
        if token in stops:
            return
        ids.append(token)


def _faked_alternatives(token: GeneratedToken, *, vocab_size: int) -> GeneratedToken:
    """``token`` with its last alternative swapped for an unnamed id, keeping its logprob."""
    if not token.top_logprobs:
        return token
    named = {token_id for token_id, _ in token.top_logprobs}
    stranger = next(t for t in range(vocab_size - 1, -1, -1) if t not in named)
    last_logprob = token.top_logprobs[-1][1]
    top = (*token.top_logprobs[:-1], (stranger, last_logprob))
    return dataclasses.replace(token, top_logprobs=top)


def load_reference_model(source: Path) -> Any:
    """An fp32 CPU copy of the Hugging Face model in ``source``, for ``skip-stop``."""
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(
        source, local_files_only=True, dtype=torch.float32
    )
    model.eval()
    return model


class VariantEngine:
    def __init__(self, inner: Engine, variant: str, *, reference: Any = None) -> None:
        self._inner = inner
        self._variant = variant
        self._reference = reference  # skip-stop's own copy of the model

    @property
    def info(self) -> ModelInfo:
        return self._inner.info

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GeneratedToken]:
        if self._variant == "die-on-job":
            os._exit(17)  # the process vanishes after taking a job, before any token
        if self._variant == "freeze-on-job":
            os.kill(os.getpid(), signal.SIGSTOP)  # hangs here until SIGCONT
        if self._variant == "garbage":
            yield GeneratedToken(token_id=self.info.vocab_size + 7, logprob=-1.0)
            return
        if self._variant == "random":
            async for token in self._random(request):
                yield token
            return
        if self._variant == "truncate":
            async for token in self._truncated(request):
                yield token
            return
        if self._variant == "skip-stop":
            if self._reference is None:
                raise GenerationError("skip-stop runs its own copy of the model; none loaded")
            context = self.info.context_length
            tokens = skip_first_stop(self._reference, request, context_length=context)

            def following() -> GeneratedToken | None:
                return next(tokens, None)

            # Streamed as they come, so its time to first token is like an engine's.
            while (streamed := await asyncio.to_thread(following)) is not None:
                yield streamed
            return
        if self._variant == "fake-top":
            async for token in self._inner.generate(request):
                yield _faked_alternatives(token, vocab_size=self.info.vocab_size)
            return
        if self._variant.startswith("substitute:"):
            fraction = float(self._variant.split(":", 1)[1])
            async for token in self._substituted(request, fraction):
                yield token
            return
        delay = float(self._variant.split(":", 1)[1]) if self._variant.startswith("slow:") else 0.0
        async for token in self._inner.generate(request):
            if delay:
                await asyncio.sleep(delay)
            yield token

    async def score(self, request: ScoreRequest) -> TokenScores:
        scores = await self._inner.score(request)
        if self._variant != "lying-scorer":
            return scores
        return dataclasses.replace(
            scores,
            logprobs=tuple(logprob + LYING_LOGPROB_SHIFT for logprob in scores.logprobs),
            margins=(LYING_MARGIN,) * len(scores.margins),
        )

    async def _substituted(
        self, request: GenerationRequest, fraction: float
    ) -> AsyncIterator[GeneratedToken]:
        rng = random.Random(f"substitute/{request.job_id}")
        stops = frozenset(request.sampling.stop_token_ids)
        async for token in self._inner.generate(request):
            # One draw per token whatever happens, so the choices depend on the job id only.
            replace = rng.random() < fraction
            if replace and token.token_id not in stops:
                forged = self._other_token(rng, stops, not_this=token.token_id)
                token = GeneratedToken(token_id=forged, logprob=token.logprob)
            yield token

    async def _random(self, request: GenerationRequest) -> AsyncIterator[GeneratedToken]:
        rng = random.Random(f"random/{request.job_id}")
        stops = frozenset(request.sampling.stop_token_ids)
        room = self.info.context_length - len(request.prompt_token_ids)
        for _ in range(max(0, min(request.sampling.max_tokens, room))):
            yield GeneratedToken(token_id=self._other_token(rng, stops), logprob=RANDOM_LOGPROB)
            await asyncio.sleep(0)  # a cancellation point between tokens, like a real engine

    async def _truncated(self, request: GenerationRequest) -> AsyncIterator[GeneratedToken]:
        real = [token async for token in self._inner.generate(request)]
        keep = len(real) // 2
        for token in real[:keep]:
            yield token
        stops = request.sampling.stop_token_ids
        if stops:
            logprob = real[keep].logprob if keep < len(real) else RANDOM_LOGPROB
            yield GeneratedToken(token_id=stops[0], logprob=logprob)

    def _other_token(
        self, rng: random.Random, stops: frozenset[int], *, not_this: int | None = None
    ) -> int:
        while True:
            token = rng.randrange(self.info.vocab_size)
            if token != not_this and token not in stops:
                return token


def main() -> int:
    # Imported here: the engine is not needed by tests that use VariantEngine on a fake.
    import miner.engine.torch_engine as torch_engine

    variant, argv = sys.argv[1], sys.argv[2:]
    original = torch_engine.TorchEngine.load

    @asynccontextmanager
    async def load(*args: Any, **kwargs: Any) -> AsyncIterator[VariantEngine]:
        reference = None
        if variant == "skip-stop":  # TorchEngine.load(name, source, ...)
            source = Path(kwargs["source"] if "source" in kwargs else args[1])
            reference = await asyncio.to_thread(load_reference_model, source)
        async with original(*args, **kwargs) as engine:
            yield VariantEngine(engine, variant, reference=reference)

    torch_engine.TorchEngine.load = load  # type: ignore[method-assign,assignment]
    from miner.cli import main as miner_main

    return miner_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
