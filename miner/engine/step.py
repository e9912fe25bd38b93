"""One step of the batching engine, as the model thread runs it.

The scheduler (``miner.engine.scheduler``) plans a :class:`StepPlan` on the event loop: prompt
chunks to prefill (packed into one pass) and rows to decode (one padded pass). A
:class:`StepRunner` runs it on the model thread and returns a :class:`StepOutcome`: sampled
tokens, kept logits, finished scores and failures, which the scheduler applies back on the
loop. Nothing here touches the scheduler's queues.

Failures stay with their work: a pass that raises fails the work in it; non-finite logits fail
their sequence alone. A packed prefill is the one place where a NaN can spread (a masked score
is NaN plus a large negative number), so a packed pass with a poisoned chunk is re-run chunk by
chunk, which rewrites the healthy chunks' keys and values and pins down the culprit. The keys
and values a failed sequence wrote are zeroed before its blocks are reused.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from miner import sampler
from miner.engine.base import (
    GeneratedToken,
    GenerationError,
    GenerationRequest,
    ScoreRequest,
    TokenScores,
)
from miner.engine.kv_cache import PagedKVCache
from miner.engine.model_runner import ModelRunner, Row
from miner.scorer import score_rows

logger = logging.getLogger(__name__)

END = None
"""What a generation's output queue holds after its last token."""


@dataclass(eq=False)
class Generation:
    """A job being generated; its consumer reads :attr:`output`."""

    request: GenerationRequest
    tokens: list[int]  # the prompt, then every token generated so far
    prompt_length: int
    limit: int  # tokens to generate at most (max_tokens within the context)
    # Tokens, then END; or a GenerationError.
    output: asyncio.Queue[GeneratedToken | GenerationError | None] = field(
        default_factory=asyncio.Queue
    )
    blocks: list[int] = field(default_factory=list)
    computed: int = 0  # positions whose keys and values are in the cache
    cancelled: bool = False
    done: bool = False

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_length


@dataclass(eq=False)
class Scoring:
    """A spot check's teacher-forced pass; :attr:`result` resolves to its scores."""

    request: ScoreRequest
    tokens: list[int]  # prompt + completion[:-1]
    first_row: int  # the position whose logits predict completion[0]
    completion: list[int]
    result: asyncio.Future[TokenScores]
    blocks: list[int] = field(default_factory=list)
    computed: int = 0
    rows: list[torch.Tensor] = field(default_factory=list)  # logits kept so far


@dataclass(frozen=True)
class Chunk:
    """The next piece of one generation's or scoring's prefill."""

    work: Generation | Scoring
    start: int
    token_ids: list[int]
    blocks: list[int]
    keep: int  # rows of logits kept (the generation's last; the scoring's completion rows)
    final: bool  # the work's last chunk


@dataclass(frozen=True)
class StepPlan:
    """What one step runs: packed prefill chunks, then one decode pass."""

    chunks: list[Chunk]
    decode: list[tuple[Generation, Row]]


@dataclass
class StepOutcome:
    """What one step produced, keyed by ``id(work)``."""

    tokens: dict[int, GeneratedToken] = field(default_factory=dict)  # id(work) -> token
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # id(scoring) -> logits
    scores: dict[int, TokenScores] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)  # id(work) -> why
    # Blocks of failed work whose keys and values may hold NaN: zeroed on the model thread.
    poisoned_blocks: list[int] = field(default_factory=list)


class StepRunner:
    """Runs planned steps over one model and its KV cache."""

    def __init__(self, runner: ModelRunner, *, cache: PagedKVCache) -> None:
        self._runner = runner
        self._cache = cache

    def run(self, plan: StepPlan) -> StepOutcome:
        """Runs one step's passes and samples; blocking, on the model thread."""
        outcome = StepOutcome()
        with torch.inference_mode():
            if plan.chunks:
                self._prefill(plan.chunks, outcome)
            if plan.decode:
                self._decode(plan.decode, outcome)
            self._cache.scrub(outcome.poisoned_blocks)
        return outcome

    def _prefill(self, chunks: list[Chunk], outcome: StepOutcome) -> None:
        rows = [Row(chunk.token_ids, chunk.start, chunk.blocks) for chunk in chunks]
        failure = "the model's output is not finite"
        try:
            logits = self._runner.prefill(rows, keep=[chunk.keep for chunk in chunks])
            poisoned = [
                self._runner.poisoned(r, kept) for r, kept in zip(rows, logits, strict=True)
            ]
        except Exception as exc:
            logger.exception("a prefill forward pass over %d chunks failed", len(chunks))
            failure = f"the forward pass failed: {exc}"
            poisoned = [True] * len(chunks)
            logits = []
        if any(poisoned) and len(chunks) > 1:
            # One chunk's NaN (or error) spreads through the packed pass: run them one by one,
            # which rewrites the healthy chunks' keys and values and tells the culprit.
            logger.warning(
                "a packed prefill went non-finite; running its %d chunks apart", len(chunks)
            )
            for chunk in chunks:
                self._prefill([chunk], outcome)
            return
        if any(poisoned):
            outcome.failures[id(chunks[0].work)] = failure
            outcome.poisoned_blocks.extend(chunks[0].blocks)
            return
        for chunk, rows_kept in zip(chunks, logits, strict=True):
            work = chunk.work
            if isinstance(work, Generation):
                if chunk.final:
                    self._sample(work, rows_kept[-1], outcome, blocks=chunk.blocks)
                continue
            if not chunk.final:
                outcome.rows[id(work)] = rows_kept
                continue
            try:
                outcome.scores[id(work)] = score_rows(
                    torch.cat([*work.rows, rows_kept]),
                    work.completion,
                    work.request.sampling,
                    noise_job_id=work.request.noise_job_id,
                    claimed_top_ids=work.request.claimed_top_ids,
                )
            except ValueError as exc:
                outcome.failures[id(work)] = str(exc)

    def _decode(self, decode: list[tuple[Generation, Row]], outcome: StepOutcome) -> None:
        try:
            logits = self._runner.decode([row for _, row in decode])
        except Exception as exc:
            logger.exception("a decode forward pass over %d rows failed", len(decode))
            for generation, row in decode:
                outcome.failures[id(generation)] = f"the forward pass failed: {exc}"
                outcome.poisoned_blocks.extend(row.blocks)
            return
        for index, (generation, row) in enumerate(decode):
            self._sample(generation, logits[index], outcome, blocks=row.blocks)

    @staticmethod
    def _sample(
        generation: Generation, logits: torch.Tensor, outcome: StepOutcome, *, blocks: Sequence[int]
    ) -> None:
        if bool(torch.isnan(logits).any()) or bool(torch.isposinf(logits).any()):
            outcome.failures[id(generation)] = "the model's logits are not finite"
            outcome.poisoned_blocks.extend(blocks)
            return
        token, logprob, top = sampler.sample_with_alternatives(
            logits,
            generation.request.sampling,
            job_id=generation.request.job_id,
            position=generation.generated,
            alternatives=generation.request.sampling.top_logprobs,
        )
        outcome.tokens[id(generation)] = GeneratedToken(
            token_id=token, logprob=logprob, top_logprobs=top
        )
