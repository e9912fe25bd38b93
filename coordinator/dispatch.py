"""Running a job on a miner, with failover until the first token.

Before the first token nothing has reached the buyer, so a miner that refuses, fails, goes
silent or disconnects is simply replaced by another. After the first token the job belongs to
that miner: a failure then ends the buyer's stream (billed for delivered tokens only).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from coordinator.errors import NoMinerAvailableError, UpstreamError
from coordinator.gateway.session import JobChannel, MinerLost, MinerSession
from coordinator.registry import MinerRegistry
from coordinator.router import Router
from proto import miner_pb2

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DispatchConfig:
    max_attempts: int = 3  # miners tried before giving up on a job that has produced nothing
    first_token_timeout_s: float = (
        60.0  # a miner silent this long before its first token is skipped
    )
    token_timeout_s: float = 60.0  # a miner silent this long mid-stream fails the job
    retry_after_s: int = 5  # Retry-After suggested to buyers when no miner can serve


class MinerRun:
    """A job on the miner that produced its first token."""

    def __init__(
        self,
        session: MinerSession,
        channel: JobChannel,
        first: miner_pb2.TokenChunk,
        *,
        token_timeout_s: float,
    ) -> None:
        self.session = session
        self.channel = channel
        self._first: miner_pb2.TokenChunk | None = first
        self._token_timeout_s = token_timeout_s
        self.result: miner_pb2.JobResult | None = None

    @property
    def job(self) -> miner_pb2.Job:
        return self.channel.job

    @property
    def done(self) -> bool:
        return self.result is not None or self.channel.finished

    async def chunks(self) -> AsyncIterator[miner_pb2.TokenChunk]:
        """Token chunks in order; ends when the miner's result arrives (kept in ``result``).

        Raises UpstreamError when the miner fails, leaves or goes silent.
        """
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        while True:
            event = await self.channel.next_event(wait_s=self._token_timeout_s)
            if isinstance(event, miner_pb2.TokenChunk):
                yield event
            elif isinstance(event, miner_pb2.JobResult):
                self.result = event
                return
            elif isinstance(event, miner_pb2.JobFailure):
                raise UpstreamError(f"the miner failed: {event.message}")
            else:
                raise UpstreamError(f"the miner was lost: {event.reason}")

    def cancel(self) -> None:
        """Stops the miner generating (the buyer went away or the job is being abandoned)."""
        if not self.done:
            self.session.cancel_job(self.job.job_id)


class Dispatcher:
    """Finds a miner for a job and hands back the run once tokens flow."""

    def __init__(self, config: DispatchConfig, *, registry: MinerRegistry, router: Router) -> None:
        self._config = config
        self._registry = registry
        self._router = router

    def has_miners(self, model: str) -> bool:
        return bool(self._registry.serving(model))

    async def start(self, job: miner_pb2.Job) -> MinerRun:
        """Sends ``job`` to miners in turn until one produces a token.

        Raises NoMinerAvailableError when none is free or every attempt failed.
        """
        tried: set[str] = set()
        failures: list[str] = []
        for _ in range(self._config.max_attempts):
            session = self._router.pick(self._registry.available(job.model), exclude=tried)
            if session is None:
                break
            tried.add(session.miner_id)
            channel = session.start_job(job)
            try:
                event = await channel.next_event(wait_s=self._config.first_token_timeout_s)
            except BaseException:
                # The buyer left while we waited: the miner must not generate for nobody.
                session.abandon_job(job.job_id)
                raise
            if isinstance(event, miner_pb2.TokenChunk):
                return MinerRun(
                    session, channel, event, token_timeout_s=self._config.token_timeout_s
                )
            reason = _describe(event)
            failures.append(f"{session.miner_id[:12]}: {reason}")
            logger.info(
                "job %s: miner %s failed before output (%s); trying another",
                job.job_id,
                session.miner_id[:12],
                reason,
            )
            session.abandon_job(job.job_id)
        detail = "; ".join(failures) if failures else "all miners are busy or none is connected"
        raise NoMinerAvailableError(
            f"no miner could serve model '{job.model}' right now ({detail})",
            retry_after=self._config.retry_after_s,
        )


def _describe(event: miner_pb2.JobResult | miner_pb2.JobFailure | MinerLost) -> str:
    if isinstance(event, miner_pb2.JobFailure):
        return event.message or "failed"
    if isinstance(event, MinerLost):
        return event.reason
    return "finished without producing a token"
