"""Iteration-level (continuous) batching: one task owns the model and runs it a step at a time.

Work is of two kinds: *generations* (a job's prompt, then one token per step) and *scorings*
(a spot check's teacher-forced pass over prompt + completion, keeping the rows that predict the
completion). A generation holds one of ``max_batch_size`` batch slots from admission to its
end; scorings hold none. Both hold KV blocks (``miner.engine.kv_cache``) for their positions.

Each step, planned on the event loop and run on the engine's one model thread:

1. Cancelled generations and abandoned scorings leave; their blocks go back to the pool.
2. Each decoding generation gets the slot of its next position. When the pool has no block
   left, the newest running generation is *preempted*: its blocks are freed and it goes back to
   the head of the queue; when it returns, a prefill over prompt + the tokens it already sent
   rebuilds its cache and it goes on from where it stopped. Its tokens depend only on
   ``(seed, job id, position)`` (``miner.sampler``), so preemption changes nothing but rounding.
3. Prefill, first come first served: generations already prefilling, then scorings under way,
   then new generations (while a batch slot and blocks for the whole prompt are free), then new
   scorings (blocks for all their positions). Prompts go in chunks so that prefill tokens plus
   the decode rows stay within ``max_batch_tokens``: a long prompt never holds the running
   sequences up for more than one step's budget.
4. One batched forward over every decoding generation (one new token each); row by row,
   ``miner.sampler.sample`` picks each token.

Steps run on the model thread through ``miner.engine.step``, which keeps failures with their
work: non-finite logits fail one generation, never its batch or the engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from miner.engine.base import GeneratedToken, GenerationError, GenerationRequest, ScoreRequest
from miner.engine.kv_cache import BlockPool, PagedKVCache
from miner.engine.model_runner import ModelRunner, Row
from miner.engine.step import END, Chunk, Generation, Scoring, StepOutcome, StepPlan, StepRunner

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot of the scheduler, for logs, benchmarks and tests."""

    running: int  # generations holding a batch slot
    waiting: int  # generations queued for one
    scoring: int  # scorings admitted or queued
    kv_blocks: int  # blocks in the pool
    kv_blocks_free: int  # blocks not held by any work
    steps: int  # steps run since start
    preemptions: int  # generations preempted because the KV cache was full
    largest_decode_batch: int  # the most rows one decode pass has had


class Scheduler:
    """Owns one model's forward passes: generations and scorings are submitted to it."""

    def __init__(
        self,
        runner: ModelRunner,
        *,
        pool: BlockPool,
        cache: PagedKVCache,
        max_batch_size: int,
        max_batch_tokens: int,
        name: str,
    ) -> None:
        self._steps_runner = StepRunner(runner, cache=cache)
        self._pool = pool
        self._cache = cache
        self._max_batch_size = max_batch_size
        self._max_batch_tokens = max_batch_tokens
        self._name = name
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{name}")
        self._waiting: deque[Generation] = deque()
        self._running: list[Generation] = []  # admission order
        self._score_waiting: deque[Scoring] = deque()
        self._scoring: list[Scoring] = []
        self._wakeup = asyncio.Event()
        self._closed = False
        self._steps = 0
        self._preemptions = 0
        self._largest_decode_batch = 0
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the scheduling task (on the running loop)."""
        self._task = asyncio.create_task(self._loop(), name="engine-scheduler")

    async def close(self) -> None:
        """Stops stepping, fails whatever was submitted, and waits for the model thread."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        closed = GenerationError("the engine is closed")
        for generation in [*self._waiting, *self._running]:
            self._fail(generation, closed)
        for scoring in [*self._score_waiting, *self._scoring]:
            self._fail(scoring, closed)
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    def stats(self) -> SchedulerStats:
        """The scheduler's state now."""
        return SchedulerStats(
            running=len(self._running),
            waiting=len(self._waiting),
            scoring=len(self._scoring) + len(self._score_waiting),
            kv_blocks=self._pool.num_blocks,
            kv_blocks_free=self._pool.free_blocks,
            steps=self._steps,
            preemptions=self._preemptions,
            largest_decode_batch=self._largest_decode_batch,
        )

    # -- submissions -------------------------------------------------------------------------

    def submit_generation(
        self, request: GenerationRequest, prompt: list[int], *, limit: int
    ) -> Generation:
        """Queues a generation; its tokens arrive on the returned object's ``output``."""
        self._check_fits(len(prompt) + 1)
        generation = Generation(
            request=request, tokens=list(prompt), prompt_length=len(prompt), limit=limit
        )
        self._waiting.append(generation)
        self._wakeup.set()
        return generation

    def submit_scoring(
        self, request: ScoreRequest, prompt: list[int], completion: list[int]
    ) -> Scoring:
        """Queues a scoring (of a non-empty completion); await its ``result``."""
        tokens = prompt + completion[:-1]
        self._check_fits(len(tokens))
        scoring = Scoring(
            request=request,
            tokens=tokens,
            first_row=len(prompt) - 1,
            completion=completion,
            result=asyncio.get_running_loop().create_future(),
        )
        self._score_waiting.append(scoring)
        self._wakeup.set()
        return scoring

    def cancel(self, generation: Generation) -> None:
        """The consumer is gone: the generation leaves at the next step (a no-op once done)."""
        if not generation.done:
            generation.cancelled = True
            self._wakeup.set()

    def _check_fits(self, positions: int) -> None:
        if self._closed:
            raise GenerationError("the engine is closed")
        if self._pool.blocks_for(positions) > self._pool.num_blocks:
            raise GenerationError(
                f"{positions} positions do not fit in the KV cache "
                f"({self._pool.num_blocks * self._pool.block_size} tokens)"
            )

    # -- the loop ----------------------------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            plan = self._plan()
            if plan is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            self._steps += 1
            if len(plan.decode) > self._largest_decode_batch:
                self._largest_decode_batch = len(plan.decode)
                # Once per new record: operators see how far batching goes under their traffic.
                logger.info("%s: %d jobs decoded in one batch", self._name, len(plan.decode))
            try:
                outcome = await loop.run_in_executor(self._executor, self._steps_runner.run, plan)
                self._apply(plan, outcome)
            except Exception as exc:  # a bug of ours: fail the step's work, keep serving
                logger.exception("an engine step failed")
                for work in [chunk.work for chunk in plan.chunks] + [g for g, _ in plan.decode]:
                    self._fail(work, GenerationError(f"engine step failed: {exc}"))
            # No yield here: the next step is planned and handed to the model thread at once,
            # and the consumers of this step's tokens (the miner's streaming, signing) run on
            # the loop while it computes, instead of between two forward passes.

    def _plan(self) -> StepPlan | None:
        self._drop_abandoned()
        decode = self._decode_rows()
        budget = max(1, self._max_batch_tokens - len(decode))
        chunks: list[Chunk] = []
        for generation in self._running:
            # More than one token to feed: still prefilling (decode rows feed exactly one).
            if len(generation.tokens) - generation.computed > 1 and budget > 0:
                budget -= self._add_chunk(chunks, generation, budget)
        for scoring in self._scoring:
            if budget > 0:
                budget -= self._add_chunk(chunks, scoring, budget)
        while budget > 0 and self._waiting and len(self._running) < self._max_batch_size:
            generation = self._waiting[0]
            if not self._admit(generation, len(generation.tokens)):
                break
            self._waiting.popleft()
            self._running.append(generation)
            if len(generation.tokens) - generation.computed == 1:
                decode.append((generation, self._decode_row(generation)))
                budget -= 1
            else:
                budget -= self._add_chunk(chunks, generation, budget)
        while budget > 0 and self._score_waiting:
            scoring = self._score_waiting[0]
            if not self._admit(scoring, len(scoring.tokens)):
                break
            self._score_waiting.popleft()
            self._scoring.append(scoring)
            budget -= self._add_chunk(chunks, scoring, budget)
        if not chunks and not decode:
            return None
        return StepPlan(chunks=chunks, decode=decode)

    def _drop_abandoned(self) -> None:
        for generation in [g for g in self._running if g.cancelled]:
            self._finish(generation)
        self._waiting = deque(g for g in self._waiting if not g.cancelled)
        for scoring in [s for s in self._scoring if s.result.done()]:
            self._finish(scoring)
        self._score_waiting = deque(s for s in self._score_waiting if not s.result.done())

    def _decode_rows(self) -> list[tuple[Generation, Row]]:
        """Every running generation with one token to feed, each with a slot for it."""
        rows: list[tuple[Generation, Row]] = []
        for generation in list(self._running):
            if generation not in self._running:  # preempted to make room for an older one
                continue
            if len(generation.tokens) - generation.computed != 1:
                continue
            if not self._grow(generation):
                continue  # it preempted itself
            rows.append((generation, self._decode_row(generation)))
        # Only generations newer than the one growing are preempted, so no row taken is gone.
        return rows

    def _decode_row(self, generation: Generation) -> Row:
        return Row(
            token_ids=generation.tokens[-1:],
            start=generation.computed,
            blocks=list(generation.blocks),
        )

    def _grow(self, generation: Generation) -> bool:
        """Makes sure ``generation`` has a block for its next position, preempting the newest
        running generations while the pool is empty; False if it had to preempt itself."""
        if self._pool.blocks_for(generation.computed + 1) <= len(generation.blocks):
            return True
        while True:
            block = self._pool.allocate(1)
            if block is not None:
                generation.blocks.extend(block)
                return True
            victim = self._running[-1]
            self._preempt(victim)
            if victim is generation:
                return False

    def _preempt(self, generation: Generation) -> None:
        logger.debug(
            "preempting job %s after %d tokens (KV cache full)",
            generation.request.job_id,
            generation.generated,
        )
        self._preemptions += 1
        self._running.remove(generation)
        self._pool.release(generation.blocks)
        generation.blocks = []
        generation.computed = 0
        self._waiting.appendleft(generation)

    def _admit(self, work: Generation | Scoring, positions: int) -> bool:
        blocks = self._pool.allocate(self._pool.blocks_for(positions))
        if blocks is None:
            return False
        work.blocks = blocks
        return True

    def _add_chunk(self, chunks: list[Chunk], work: Generation | Scoring, budget: int) -> int:
        """Plans the next chunk of ``work``'s prefill within ``budget``; returns its length."""
        end = min(len(work.tokens), work.computed + budget)
        final = end == len(work.tokens)
        if isinstance(work, Generation):
            keep = 1 if final else 0  # only the prompt's last position predicts a token
        else:  # every position from first_row on predicts a completion token
            keep = max(0, end - max(work.first_row, work.computed))
        chunks.append(
            Chunk(
                work=work,
                start=work.computed,
                token_ids=work.tokens[work.computed : end],
                blocks=list(work.blocks),
                keep=keep,
                final=final,
            )
        )
        return end - work.computed

    # -- back on the event loop --------------------------------------------------------------

    def _apply(self, plan: StepPlan, outcome: StepOutcome) -> None:
        fed: list[tuple[Generation | Scoring, int]] = [
            (chunk.work, len(chunk.token_ids)) for chunk in plan.chunks
        ]
        fed.extend((generation, 1) for generation, _ in plan.decode)
        for work, count in fed:
            key = id(work)
            failure = outcome.failures.get(key)
            if failure is not None:
                self._fail(work, GenerationError(failure))
                continue
            if isinstance(work, Scoring):
                self._apply_scoring(work, count, outcome)
            elif not work.cancelled and work in self._running:
                self._apply_generation(work, count, outcome.tokens.get(key))
            else:
                self._finish(work)

    def _apply_scoring(self, scoring: Scoring, count: int, outcome: StepOutcome) -> None:
        scoring.computed += count
        rows = outcome.rows.get(id(scoring))
        if rows is not None:
            scoring.rows.append(rows)
        scores = outcome.scores.get(id(scoring))
        if scores is not None:
            if not scoring.result.done():
                scoring.result.set_result(scores)
            self._finish(scoring)
        elif scoring.result.done():  # its caller stopped waiting
            self._finish(scoring)

    def _apply_generation(
        self, generation: Generation, count: int, token: GeneratedToken | None
    ) -> None:
        generation.computed += count
        if token is None:
            return  # a prefill chunk that was not the last
        generation.tokens.append(token.token_id)
        generation.output.put_nowait(token)
        stops = generation.request.sampling.stop_token_ids
        if token.token_id in stops or generation.generated >= generation.limit:
            generation.output.put_nowait(END)
            self._finish(generation)

    def _fail(self, work: Generation | Scoring, error: GenerationError) -> None:
        if isinstance(work, Generation):
            if not work.done:
                work.output.put_nowait(error)
        elif not work.result.done():
            work.result.set_exception(error)
        self._finish(work)

    def _finish(self, work: Generation | Scoring) -> None:
        """Takes ``work`` out of the scheduler and frees its blocks."""
        self._pool.release(work.blocks)
        work.blocks = []
        if isinstance(work, Generation):
            work.done = True
            if work in self._running:
                self._running.remove(work)
            if work in self._waiting:
                self._waiting.remove(work)
        else:
            if work in self._scoring:
                self._scoring.remove(work)
            if work in self._score_waiting:
                self._score_waiting.remove(work)
            work.rows = []
