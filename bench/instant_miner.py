"""Runs the real ``meshmint-miner`` CLI with an instant engine instead of torch: bench-only.

The load benchmark (``bench/load.py``) measures what the coordinator itself costs, so the
engine behind it must cost (almost) nothing. :class:`InstantEngine` answers every job at once:
``--tokens`` N ordinary text tokens (fewer when ``max_tokens`` or the context is smaller), then a
stop token when there is room, each after an optional ``--token-delay``. It never loads the
weights and never imports torch; it still hashes the weight files and reads the tokenizer, so the
coordinator admits it exactly like a real miner of that model directory.

Usage (the miner CLI's own arguments follow the engine's)::

    python -m bench.instant_miner [--tokens N] [--token-delay SECONDS] run --coordinator ...

This engine never ships in the CLI: it replaces ``miner.engine.torch_engine`` in
``sys.modules`` of this process only, the way ``tests/e2e/variant_miner.py`` wraps the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import types
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from miner.engine.base import (
    GeneratedToken,
    GenerationError,
    GenerationRequest,
    ModelInfo,
    ScoreRequest,
    TokenScores,
)

ENGINE_NAME = "instant/1"
INSTANT_LOGPROB = -0.5  # the log-probability claimed for every token (a valid, negative value)
DEFAULT_TOKENS = 16
# Visible ASCII text: every token decodes to text on its own, so the first token is the first
# text a buyer sees, and a coordinator's detokenizer never has to hold a byte back.
TEXT = "the quick brown fox jumps over the lazy dog "


class InstantEngine:
    """An :class:`miner.engine.base.Engine` that answers at once; see the module docstring."""

    def __init__(
        self,
        info: ModelInfo,
        *,
        text_ids: Sequence[int],
        tokens: int = DEFAULT_TOKENS,
        token_delay_s: float = 0.0,
    ) -> None:
        if not text_ids:
            raise ValueError("text_ids must name at least one token")
        if tokens < 1 or token_delay_s < 0:
            raise ValueError(
                f"need tokens >= 1 and token_delay_s >= 0, got {tokens}, {token_delay_s}"
            )
        self._info = info
        self._text_ids = tuple(text_ids)
        self._tokens = tokens
        self._token_delay_s = token_delay_s

    @property
    def info(self) -> ModelInfo:
        return self._info

    def planned(self, request: GenerationRequest) -> list[int]:
        """The token ids :meth:`generate` yields for ``request``, in order."""
        sampling = request.sampling
        room = self._info.context_length - len(request.prompt_token_ids)
        if room < 1:
            raise GenerationError(
                f"the prompt has {len(request.prompt_token_ids)} tokens; the context length is "
                f"{self._info.context_length}"
            )
        budget = min(sampling.max_tokens, room)
        ids = [self._text_ids[i % len(self._text_ids)] for i in range(min(self._tokens, budget))]
        # Ending early needs a stop token (a finish reason "stop"); at the budget it is "length".
        if len(ids) < budget and sampling.stop_token_ids:
            ids.append(sampling.stop_token_ids[0])
        return ids

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GeneratedToken]:
        for token_id in self.planned(request):
            # Even at no delay, one event-loop turn per token, as a real engine has: it is where a
            # cancellation lands, and other jobs' tokens interleave.
            await asyncio.sleep(self._token_delay_s)
            yield GeneratedToken(token_id=token_id, logprob=INSTANT_LOGPROB)

    async def score(self, request: ScoreRequest) -> TokenScores:
        count = len(request.completion_token_ids)
        return TokenScores(logprobs=(INSTANT_LOGPROB,) * count, margins=(0.0,) * count)


def load_instant_engine(
    name: str, model_dir: Path, *, tokens: int = DEFAULT_TOKENS, token_delay_s: float = 0.0
) -> InstantEngine:
    """An instant engine that the coordinator takes for a miner of ``model_dir``.

    Reads the tokenizer (vocabulary, context, the ids of :data:`TEXT`) and hashes the weight
    files as a real miner does; loads no weights.
    """
    from coordinator.text.tokenization import ModelTokenizer
    from proto.weights_digest import weights_sha256

    tokenizer = ModelTokenizer.from_dir(model_dir)
    stops = set(tokenizer.stop_token_ids)
    text_ids = [i for i in tokenizer.encode_prompt(TEXT) if i not in stops]
    info = ModelInfo(
        name=name,
        weights_sha256=weights_sha256(model_dir),
        vocab_size=tokenizer.vocab_size,
        context_length=tokenizer.context_length,
        dtype="none",
        device="cpu",
        engine=ENGINE_NAME,
    )
    return InstantEngine(info, text_ids=text_ids, tokens=tokens, token_delay_s=token_delay_s)


def _engine_module(*, tokens: int, token_delay_s: float) -> types.ModuleType:
    """Stands in for ``miner.engine.torch_engine``: the CLI imports ``TorchEngine.load`` from it."""

    class TorchEngine:
        @staticmethod
        @asynccontextmanager
        async def load(
            name: str, model_dir: Path, **options: object
        ) -> AsyncIterator[InstantEngine]:
            yield await asyncio.to_thread(
                load_instant_engine,
                name,
                Path(model_dir),
                tokens=tokens,
                token_delay_s=token_delay_s,
            )

    module = types.ModuleType("miner.engine.torch_engine")
    module.TorchEngine = TorchEngine  # type: ignore[attr-defined]
    return module


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.instant_miner",
        description="meshmint-miner with an instant engine (bench only)",
        allow_abbrev=False,
    )
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="text tokens per job")
    parser.add_argument("--token-delay", type=float, default=0.0, metavar="SECONDS")
    args, miner_argv = parser.parse_known_args(argv)
    if args.tokens < 1 or args.token_delay < 0:
        parser.error("--tokens must be >= 1 and --token-delay >= 0")
    sys.modules["miner.engine.torch_engine"] = _engine_module(
        tokens=args.tokens, token_delay_s=args.token_delay
    )
    from miner.cli import main as miner_main

    return miner_main(list(miner_argv))


if __name__ == "__main__":
    raise SystemExit(main())
