"""Serving this replica's miners to the other replicas: their jobs, cancels, scores, notices.

A job another replica sent for a miner connected here starts on the miner's session like a local
one; every event of its stream is published, in order, to the asking replica's event subject
until the job ends. A cancel from the asking replica reaches the miner; an abandon also stops the
forwarding. When the asking replica goes silent (``origin_gone``), its jobs here are abandoned,
so miners do not generate for nobody.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Protocol

from coordinator.dispatch.registry import MinerRegistry
from coordinator.jobs import JobFailure, MinerLost, TokenChunk
from coordinator.replicas import codec
from coordinator.replicas.codec import CodecError, Document
from coordinator.worker import JobStream, Worker

logger = logging.getLogger(__name__)

_RELAY_WAIT_S = 3600.0  # the asking replica times the miner out; this side only forwards


class EventSink(Protocol):
    def __call__(self, origin: str, job_id: str, document: Document) -> None:
        """Publishes one event document of ``job_id`` to replica ``origin``."""


class Relay:
    """Runs other replicas' requests on the miners connected to this one."""

    def __init__(
        self,
        *,
        registry: MinerRegistry,
        publish_event: EventSink,
        score_timeout_s: float,
    ) -> None:
        self._registry = registry
        self._publish_event = publish_event
        self._score_timeout_s = score_timeout_s
        # (origin, job id) -> the forwarding task and the miner running it
        self._jobs: dict[tuple[str, str], tuple[asyncio.Task[None], Worker]] = {}

    def jobs_by_origin(self) -> Mapping[str, Mapping[str, int]]:
        """Per miner here, how many of its jobs each other replica asked for (one pass)."""
        counts: dict[str, dict[str, int]] = {}
        for (origin, _), (_, worker) in self._jobs.items():
            per_origin = counts.setdefault(worker.miner_id, {})
            per_origin[origin] = per_origin.get(origin, 0) + 1
        return counts

    def _local(self, miner_id: str) -> Worker | None:
        worker = self._registry.get(str(miner_id))
        if worker is None or not worker.is_local or worker.closed_reason is not None:
            return None
        return worker

    def start(self, document: Document) -> None:
        """A job for a miner here, from another replica."""
        try:
            origin, miner_id = str(document["origin"]), str(document["miner"])
            job = codec.job_from(document["job"])
        except (KeyError, CodecError) as error:
            logger.warning("dropped a malformed relayed job: %s", error)
            return
        worker = self._local(miner_id)
        if worker is None:
            lost = MinerLost(f"miner {miner_id[:12]} is not connected to that replica any more")
            self._publish_event(origin, job.job_id, codec.event_document(lost))
            return
        if not worker.accepts(job.model):
            busy = JobFailure(
                message="no free slot on the miner (another replica took it)", retryable=True
            )
            self._publish_event(origin, job.job_id, codec.event_document(busy))
            return
        stream = worker.start_job(job)
        key = (origin, job.job_id)
        task = asyncio.create_task(self._forward(origin, stream), name=f"relay-{job.job_id}")
        self._jobs[key] = (task, worker)
        task.add_done_callback(lambda _: self._jobs.pop(key, None))

    async def _forward(self, origin: str, stream: JobStream) -> None:
        job_id = stream.job.job_id
        while True:
            event = await stream.next_event(wait_s=_RELAY_WAIT_S)
            self._publish_event(origin, job_id, codec.event_document(event))
            if not isinstance(event, TokenChunk):
                return

    def cancel(self, document: Document) -> None:
        """The asking replica stops a job (``abandon``: and wants nothing more of it)."""
        key = (str(document.get("origin", "")), str(document.get("job_id", "")))
        entry = self._jobs.get(key)
        if entry is None:
            return
        task, worker = entry
        if document.get("abandon"):
            worker.abandon_job(key[1])
            task.cancel()
        else:
            worker.cancel_job(key[1])

    def origin_gone(self, origin: str) -> None:
        """Replica ``origin`` went silent: its jobs here are abandoned."""
        for (asker, job_id), (task, worker) in list(self._jobs.items()):
            if asker == origin:
                worker.abandon_job(job_id)
                task.cancel()

    async def score(self, document: Document) -> Document:
        """Runs a score request on a miner here; the answer for the asking replica."""
        try:
            request = codec.score_request_from(document["request"])
        except (KeyError, CodecError) as error:
            return {"lost": f"malformed score request: {error}"}
        worker = self._local(str(document.get("miner", "")))
        if worker is None:
            return {"lost": "the scorer is not connected to that replica any more"}
        future = worker.start_score(request)
        try:
            result = await asyncio.wait_for(future, self._score_timeout_s)
        except TimeoutError:
            worker.expire_score(request.score_id)
            return {"lost": f"no answer from the scorer within {self._score_timeout_s:g} s"}
        except Exception as error:  # ScorerLost: the miner went away
            return {"lost": str(error)}
        return {"result": codec.score_result_document(result)}

    def notify(self, document: Document) -> None:
        """A notice for a miner here (a credit receipt, a proof, a slash, a ban, a close)."""
        worker = self._local(str(document.get("miner", "")))
        if worker is None:
            return  # it left: notices are courtesies, its credit is in the ledger anyway
        kind = document.get("kind")
        deliver: Mapping[str, Callable[[], None]] = {
            "credit_receipt": lambda: worker.send_credit_receipt(
                codec.credit_receipt_from(document)
            ),
            "consistency_proof": lambda: worker.send_consistency_proof(
                codec.consistency_proof_from(document)
            ),
            "slash_notice": lambda: worker.send_slash_notice(codec.slash_notice_from(document)),
            "ban": lambda: worker.ban(str(document["message"]), reason=str(document["reason"])),
            "close": lambda: worker.close(str(document["reason"])),
        }
        action = deliver.get(str(kind))
        if action is None:
            logger.warning("dropped a notice of unknown kind %r", kind)
            return
        try:
            action()
        except (KeyError, TypeError, ValueError) as error:
            logger.warning("dropped a malformed %s notice: %s", kind, error)

    async def aclose(self) -> None:
        """Stops forwarding (shutdown): the miners' sessions end with the gateway."""
        tasks = [task for task, _ in self._jobs.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
