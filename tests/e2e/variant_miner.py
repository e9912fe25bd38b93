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
- ``lying-scorer``: generates honestly, but as a spot-check scorer reports every margin as 5.0
  and every log-probability shifted by -1.0, framing whoever it checks.

Every variant but ``lying-scorer`` scores spot checks honestly.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import miner.engine.torch_engine as torch_engine
from miner.engine.base import (
    Engine,
    GeneratedToken,
    GenerationRequest,
    ModelInfo,
    ScoreRequest,
    TokenScores,
)

LYING_MARGIN = 5.0
LYING_LOGPROB_SHIFT = -1.0
RANDOM_LOGPROB = -1.0


class VariantEngine:
    def __init__(self, inner: Engine, variant: str) -> None:
        self._inner = inner
        self._variant = variant

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
        return TokenScores(
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
    variant, argv = sys.argv[1], sys.argv[2:]
    original = torch_engine.TorchEngine.load

    @asynccontextmanager
    async def load(*args: Any, **kwargs: Any) -> AsyncIterator[VariantEngine]:
        async with original(*args, **kwargs) as engine:
            yield VariantEngine(engine, variant)

    torch_engine.TorchEngine.load = load  # type: ignore[method-assign,assignment]
    from miner.cli import main as miner_main

    return miner_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
