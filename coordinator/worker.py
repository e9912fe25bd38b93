"""A miner as the coordinator sees it: a :class:`Worker` that takes jobs and score requests.

The dispatcher, the router, billing and verification work with Workers and the values of
:mod:`coordinator.jobs`; how a worker is reached is not their business. Today every worker is a
``coordinator.gateway.session.MinerSession`` (a miner's gRPC stream to this process).

A worker streams each job's events into a :class:`JobStream`, so the dispatcher waits on exactly
the job it started.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from coordinator.dispatch.speed import MinerSpeed
from coordinator.errors import CoordinatorError
from coordinator.jobs import Job, JobEvent, MinerLost, ScoreRequest, ScoreResult, TokenChunk


class ScorerLost(CoordinatorError):
    """The miner asked to score a job went away before answering."""


@dataclass(frozen=True, slots=True)
class SlashNotice:
    """A confirmed failed spot check took this miner's unmatured credits."""

    job_id: str  # the job whose check failed
    amount: int  # micro-credits taken, the buyer's refund included
    reason: str  # what the checks found, for the person running the miner
    banned: bool  # the key's last allowed failure: it is refused from now on


@dataclass(frozen=True, slots=True)
class CreditReceipt:
    """Proof that a job's credit is in the ledger, under a signed checkpoint."""

    job_id: str  # the job whose settlement credited the miner
    entry: bytes  # the settle entry's canonical bytes: exactly the Merkle leaf
    index: int  # its seq in the log
    tree_size: int  # the tree the proof and the checkpoint are for
    inclusion_proof: tuple[bytes, ...]  # RFC 9162, from the leaf upward
    checkpoint: bytes  # the C2SP signed note of tree_size


@dataclass(frozen=True, slots=True)
class ConsistencyProof:
    """The answer to a witness's consistency request."""

    old_size: int
    new_size: int
    hashes: tuple[bytes, ...] = ()  # RFC 9162; empty when the sizes are equal or old_size is 0
    checkpoint: bytes = b""  # the signed checkpoint of new_size, when there is one
    error: str = ""  # set when no proof can exist (a size beyond the log)


@dataclass(frozen=True, slots=True)
class WitnessAlarm:
    """A witness found a proof that failed: the ledger forked or was tampered with."""

    message: str  # what failed, as the miner says it
    old_checkpoint: bytes  # the checkpoint it held, if any
    new_checkpoint: bytes  # the one that contradicts it, if any


class LedgerWitnessDesk(Protocol):
    """Takes what miners, as witnesses of the ledger, ask and report."""

    def consistency_requested(self, worker: Worker, *, old_size: int, new_size: int) -> None: ...

    def alarm_raised(self, worker: Worker, alarm: WitnessAlarm) -> None: ...


class Worker(Protocol):
    """A miner that passed the handshake and may be given jobs and score requests."""

    miner_id: str  # hex of its Ed25519 public key
    public_key: bytes  # raw 32 bytes: checks its receipts' signatures
    models: frozenset[str]  # catalog names it serves
    device_name: str  # its announced hardware, e.g. "NVIDIA GeForce RTX 4090"
    accelerator: str  # "cuda", "mps" or "cpu"
    retains_data: bool  # may keep prompts or completions (anything but a declared "none")
    max_concurrency: int  # jobs it runs at once
    connected_at: float  # time.monotonic() when it joined
    draining: bool  # it is shutting down: no new jobs
    closed_reason: str | None  # why it is gone; None while it is connected
    speed: MinerSpeed  # measured on arrival of its tokens, never from its claims
    is_local: bool  # connected to this process (False: reached through another replica)
    # Told whenever a job slot frees; the registry sets it to wake requests queued for a model.
    on_slot_freed: Callable[[Worker], None] | None

    @property
    def active_jobs(self) -> int: ...

    @property
    def free_slots(self) -> int: ...

    def accepts(self, model: str) -> bool:
        """Connected, not draining, serving ``model`` and with a free slot."""
        ...

    def start_job(self, job: Job) -> JobStream:
        """Sends ``job``; its events arrive in the returned stream."""
        ...

    def cancel_job(self, job_id: str) -> None:
        """Asks the miner to stop a job; its slot frees when the miner answers or goes away."""
        ...

    def abandon_job(self, job_id: str) -> None:
        """Cancels a job and frees its slot now; late messages for it are ignored."""
        ...

    def start_score(self, request: ScoreRequest) -> asyncio.Future[ScoreResult]:
        """Sends a score request; the future fails with :class:`ScorerLost` if the miner goes."""
        ...

    def expire_score(self, score_id: str) -> None:
        """Gives up on a score request; a late answer for it is dropped."""
        ...

    def send_credit_receipt(self, receipt: CreditReceipt) -> None: ...

    def send_consistency_proof(self, proof: ConsistencyProof) -> None: ...

    def send_slash_notice(self, notice: SlashNotice) -> None: ...

    def ban(self, message: str, *, reason: str) -> None:
        """Tells the miner its key is banned (``message``) and ends the session (``reason``)."""
        ...

    def close(self, reason: str) -> None:
        """Ends the session: every job in flight learns the miner is lost."""
        ...


def serves(worker: Worker, model: str) -> bool:
    """Connected, not draining, and serving ``model``, busy or not."""
    return worker.closed_reason is None and not worker.draining and model in worker.models


def can_take(worker: Worker, model: str) -> bool:
    """:func:`serves` ``model`` and has a free slot now: what every ``Worker.accepts`` says."""
    return serves(worker, model) and worker.free_slots > 0


class JobStream:
    """Events of one job on one worker, in arrival order, with the times the router needs."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.tokens_received = 0
        self.finished = False
        self.stopped = False  # a stop token arrived: nothing may follow it
        # Arrival times for the miner's speed: the job queued, its first and its latest chunk.
        self.sent_at = time.monotonic()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.first_chunk_tokens = 0
        self._stop_ids = frozenset(job.sampling.stop_token_ids)
        self._events: deque[JobEvent] = deque()
        self._waiter: asyncio.Future[None] | None = None  # the reader waiting for an event

    def accept_tokens(self, token_ids: Sequence[int]) -> str | None:
        """Counts arriving tokens; returns a violation when they cannot follow what came before."""
        if self.stopped or any(token in self._stop_ids for token in token_ids[:-1]):
            return "tokens after a stop token"
        self.stopped = token_ids[-1] in self._stop_ids
        self.tokens_received += len(token_ids)
        if self.tokens_received > self.job.sampling.max_tokens:
            return f"more than max_tokens={self.job.sampling.max_tokens} tokens"
        return None

    def put(self, event: JobEvent) -> None:
        self._events.append(event)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next_event(self, *, wait_s: float) -> JobEvent:
        """The next event; MinerLost when none arrives within ``wait_s`` seconds."""
        if not self._events:
            # A bare future and one timer: asyncio.wait_for around a queue would add a task.
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(wait_s):
                    await self._waiter
            except TimeoutError:
                return MinerLost(f"no answer from the miner within {wait_s:g} s")
            finally:
                self._waiter = None
        return self._events.popleft()

    def merge_queued(self, chunk: TokenChunk) -> TokenChunk:
        """``chunk`` followed by the token chunks already queued behind it, as one chunk.

        A reader that fell behind the miner (a slow buyer, a busy coordinator) then handles
        one delta instead of many: the text and the billing are the same, the work is not.
        """
        following: list[TokenChunk] = []
        while self._events and isinstance(self._events[0], TokenChunk):
            event = self._events.popleft()
            assert isinstance(event, TokenChunk)
            following.append(event)
        return chunk.followed_by(following) if following else chunk
