"""Runs the real `meshmint-miner` CLI with its engine wrapped by a misbehaving variant.

Test-only: these variants never ship in the CLI. Usage:
    python tests/e2e/variant_miner.py VARIANT [miner CLI args...]
VARIANT is one of: honest, slow:<seconds per token>, die-on-job, freeze-on-job, garbage.
freeze-on-job SIGSTOPs the miner's own process when it takes a job: it stops heartbeating, but
its TCP connection stays open, like a hung machine.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import miner.engine.torch_engine as torch_engine
from miner.engine.base import Engine, GeneratedToken, GenerationRequest, ModelInfo


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
        delay = float(self._variant.split(":", 1)[1]) if self._variant.startswith("slow:") else 0.0
        async for token in self._inner.generate(request):
            if delay:
                await asyncio.sleep(delay)
            yield token


def main() -> int:
    variant, argv = sys.argv[1], sys.argv[2:]
    original = torch_engine.TorchEngine.load

    @asynccontextmanager
    async def load(*args: Any, **kwargs: Any) -> AsyncIterator[VariantEngine]:
        async with original(*args, **kwargs) as engine:
            yield VariantEngine(engine, variant)

    torch_engine.TorchEngine.load = load  # type: ignore[method-assign]
    from miner.cli import main as miner_main

    return miner_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
