"""Running a job on a miner: waiting for a free slot, then failover until the first token.

When every miner of the model is busy, a request waits in a first-in, first-out queue per model
until a slot frees (a job ends, or a miner joins), for at most ``queue_wait_s`` and behind at most
``max_queue`` others; a full queue or a wait that runs out is a NoMinerAvailableError (503 with
Retry-After). With no miner serving the model at all there is nothing to wait for: the error is
immediate. A buyer who leaves while queued (its task is cancelled) leaves the queue.

Before the first token nothing has reached the buyer, so a miner that refuses, fails, goes
silent or disconnects is simply replaced by another (up to ``max_attempts`` miners, unless the
buyer set ``provider.allow_fallbacks: false``); a replacement waits for a slot like a new request,
at the head of the queue, within what is left of ``queue_wait_s``. After the first token the job
belongs to that miner: a failure then ends the buyer's stream (billed for delivered tokens only).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field

from coordinator.api import ProviderSort
from coordinator.dispatch.privacy import Eligible, anyone
from coordinator.dispatch.registry import MinerRegistry
from coordinator.dispatch.router import Router
from coordinator.errors import NoMinerAvailableError, UpstreamError
from coordinator.jobs import Job, JobFailure, JobResult, MinerLost, TokenChunk
from coordinator.ops.metrics import CoordinatorMetrics
from coordinator.worker import JobStream, Worker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DispatchConfig:
    max_attempts: int = 3  # miners tried before giving up on a job that has produced nothing
    first_token_timeout_s: float = (
        60.0  # a miner silent this long before its first token is skipped
    )
    token_timeout_s: float = 60.0  # a miner silent this long mid-stream fails the job
    retry_after_s: int = 5  # Retry-After suggested to buyers when no miner can serve
    queue_wait_s: float = 10.0  # longest a request waits for a busy model's free slot; 0: none
    max_queue: int = 256  # requests that may wait per model; one more is refused at once


class MinerRun:
    """A job on the miner that produced its first token."""

    def __init__(
        self,
        worker: Worker,
        stream: JobStream,
        first: TokenChunk,
        *,
        token_timeout_s: float,
    ) -> None:
        self.worker = worker
        self.stream = stream
        self._first: TokenChunk | None = first
        self._token_timeout_s = token_timeout_s
        self.result: JobResult | None = None

    @property
    def job(self) -> Job:
        return self.stream.job

    @property
    def done(self) -> bool:
        return self.result is not None or self.stream.finished

    async def chunks(self) -> AsyncIterator[TokenChunk]:
        """Token chunks in order; ends when the miner's result arrives (kept in ``result``).

        Chunks that queued up while the reader was busy come as one (``merge_queued``).

        Raises UpstreamError when the miner fails, leaves or goes silent.
        """
        if self._first is not None:
            first, self._first = self._first, None
            yield self.stream.merge_queued(first)
        while True:
            event = await self.stream.next_event(wait_s=self._token_timeout_s)
            if isinstance(event, TokenChunk):
                yield self.stream.merge_queued(event)
            elif isinstance(event, JobResult):
                self.result = event
                return
            elif isinstance(event, JobFailure):
                raise UpstreamError(f"the miner failed: {event.message}")
            else:
                raise UpstreamError(f"the miner was lost: {event.reason}")

    def cancel(self) -> None:
        """Stops the miner generating (the buyer went away or the job is being abandoned)."""
        if not self.done:
            self.worker.cancel_job(self.job.job_id)


class _NoSlot(Exception):
    """No slot for the job: the queue is full, or the wait ran out. The message says which."""


@dataclass(eq=False)
class _Waiter:
    """One request waiting for a free slot of its model."""

    exclude: Collection[str]  # miners already tried for this job
    eligible: Eligible  # the miners its buyer's privacy tier admits
    woken: asyncio.Event = field(default_factory=asyncio.Event)  # a slot may be free for it


class Dispatcher:
    """Finds a miner for a job and hands back the run once tokens flow."""

    def __init__(
        self,
        config: DispatchConfig,
        *,
        registry: MinerRegistry,
        router: Router,
        metrics: CoordinatorMetrics | None = None,
    ) -> None:
        """``metrics`` receives the queue depth (requests waiting, all models together)."""
        self._config = config
        self._registry = registry
        self._router = router
        self._metrics = metrics
        self._queues: dict[str, deque[_Waiter]] = {}
        self._queued = 0
        registry.watch_capacity(self._capacity)

    def has_miners(self, model: str, *, eligible: Eligible = anyone) -> bool:
        """Whether a connected miner serves ``model`` (one that ``eligible`` admits)."""
        return any(eligible(worker) for worker in self._registry.serving(model))

    def queue_depth(self, model: str | None = None) -> int:
        """Requests waiting for a slot of ``model``, or of every model."""
        if model is None:
            return self._queued
        return len(self._queues.get(model, ()))

    async def start(
        self,
        job: Job,
        *,
        sort: ProviderSort | None = None,
        allow_fallbacks: bool = True,
        eligible: Eligible = anyone,
    ) -> MinerRun:
        """Sends ``job`` to miners in turn until one produces a token.

        ``sort`` is the buyer's provider.sort; without ``allow_fallbacks`` only one miner is
        tried; only miners that ``eligible`` admits (the buyer's privacy tier) are tried.
        Raises NoMinerAvailableError when no slot frees in time, the queue is full, or every
        attempt failed.
        """
        deadline = asyncio.get_running_loop().time() + self._config.queue_wait_s
        attempts = self._config.max_attempts if allow_fallbacks else 1
        tried: set[str] = set()
        failures: list[str] = []
        for _ in range(attempts):
            try:
                worker = await self._acquire(
                    job.model, exclude=tried, deadline=deadline, sort=sort, eligible=eligible
                )
            except _NoSlot as busy:
                failures.append(str(busy))
                break
            if worker is None:
                break
            tried.add(worker.miner_id)
            stream = worker.start_job(job)
            try:
                event = await stream.next_event(wait_s=self._config.first_token_timeout_s)
            except BaseException:
                # The buyer left while we waited: the miner must not generate for nobody.
                worker.abandon_job(job.job_id)
                raise
            if isinstance(event, TokenChunk):
                return MinerRun(worker, stream, event, token_timeout_s=self._config.token_timeout_s)
            if isinstance(event, MinerLost) and worker.closed_reason is None:
                # Silent past the first-token timeout: slow, and the router should know it.
                worker.speed.first_token(self._config.first_token_timeout_s)
            reason = _describe(event)
            failures.append(f"{worker.miner_id[:12]}: {reason}")
            logger.info(
                "job %s: miner %s failed before output (%s); %s",
                job.job_id,
                worker.miner_id[:12],
                reason,
                "trying another" if allow_fallbacks else "no fallbacks allowed",
            )
            worker.abandon_job(job.job_id)
        detail = "; ".join(failures) if failures else "all miners are busy or none is connected"
        logger.info("no miner for job %s of %s: %s", job.job_id, job.model, detail)
        raise NoMinerAvailableError(
            f"no miner could serve model '{job.model}' right now ({detail})",
            retry_after=self._config.retry_after_s,
        )

    async def _acquire(
        self,
        model: str,
        *,
        exclude: Collection[str],
        deadline: float,
        sort: ProviderSort | None,
        eligible: Eligible,
    ) -> Worker | None:
        """A miner with a free slot, waiting for one in the model's queue if need be.

        None when no miner left untried serves the model (nothing to wait for); _NoSlot when the
        queue is full or the wait runs out. A first attempt takes a free slot only when nobody
        is queued before it; a retry goes first.
        """
        queue = self._queues.get(model)
        retry = bool(exclude)
        if retry or not queue:
            worker = self._router.pick(self._available(model, eligible), exclude=exclude, sort=sort)
            if worker is not None:
                return worker
        if not any(
            s.miner_id not in exclude and eligible(s) for s in self._registry.serving(model)
        ):
            return None
        if deadline <= asyncio.get_running_loop().time():
            raise _NoSlot(self._stayed_busy())
        if queue is None:
            queue = self._queues[model] = deque()
        if len(queue) >= self._config.max_queue:
            raise _NoSlot(f"all miners are busy and {len(queue)} requests are already waiting")
        waiter = _Waiter(exclude, eligible)
        if retry:
            queue.appendleft(waiter)
        else:
            queue.append(waiter)
        self._depth_changed(+1)
        try:
            # A slot only this waiter may use (the ones before it excluded its miner) is free.
            self._wake(model)
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        await waiter.woken.wait()
                except TimeoutError:
                    raise _NoSlot(self._stayed_busy()) from None
                waiter.woken.clear()
                worker = self._router.pick(
                    self._available(model, eligible), exclude=exclude, sort=sort
                )
                if worker is not None:
                    return worker
                # Another request took the slot first (a retry, or a miner left): keep the place.
        finally:
            queue.remove(waiter)
            if not queue:
                del self._queues[model]
            self._depth_changed(-1)
            if waiter.woken.is_set():
                # Woken but leaving without the slot (cancelled, timed out): pass it on.
                self._wake(model)

    def _available(self, model: str, eligible: Eligible) -> list[Worker]:
        return [worker for worker in self._registry.available(model) if eligible(worker)]

    def _capacity(self, worker: Worker) -> None:
        for model in worker.models:
            if model in self._queues:
                self._wake(model)

    def _wake(self, model: str) -> None:
        """Wakes as many waiters, first come first, as there are free slots they may use."""
        queue = self._queues.get(model)
        if not queue:
            return
        available = self._registry.available(model)
        free = sum(worker.free_slots for worker in available)
        free -= sum(1 for waiter in queue if waiter.woken.is_set())
        for waiter in queue:
            if free <= 0:
                return
            if waiter.woken.is_set():
                continue
            if any(
                worker.miner_id not in waiter.exclude and waiter.eligible(worker)
                for worker in available
            ):
                waiter.woken.set()
                free -= 1

    def _stayed_busy(self) -> str:
        if self._config.queue_wait_s <= 0:
            return "all miners are busy"
        return f"all miners stayed busy for {self._config.queue_wait_s:g} s"

    def _depth_changed(self, change: int) -> None:
        self._queued += change
        if self._metrics is not None:
            self._metrics.queue_depth.set(self._queued)


def _describe(event: JobResult | JobFailure | MinerLost) -> str:
    if isinstance(event, JobFailure):
        return event.message or "failed"
    if isinstance(event, MinerLost):
        return event.reason
    return "finished without producing a token"
