"""The connected miners (workers), by identity and by the models they serve."""

from __future__ import annotations

import logging
from collections.abc import Callable

from coordinator.worker import Worker, serves

logger = logging.getLogger(__name__)

CapacityListener = Callable[[Worker], None]
"""Told of a worker that may have a free slot now: it joined, or one of its jobs ended."""


class MinerRegistry:
    """Welcomed miners. One worker per identity key: the newest connection wins."""

    def __init__(self) -> None:
        self._workers: dict[str, Worker] = {}
        self._listeners: list[CapacityListener] = []

    def watch_capacity(self, listener: CapacityListener) -> None:
        """Calls ``listener`` whenever a worker joins or frees a job slot (the dispatcher's
        queue waits on this)."""
        self._listeners.append(listener)

    def add(self, worker: Worker) -> None:
        previous = self._workers.get(worker.miner_id)
        if previous is not None and previous is not worker:
            # The same key proved itself again: the old stream is a leftover (e.g. a restart
            # faster than eviction). Its jobs fail over like any lost miner's.
            previous.close("replaced by a newer connection of the same miner")
        self._workers[worker.miner_id] = worker
        worker.on_slot_freed = self._capacity
        self._capacity(worker)

    def remove(self, worker: Worker) -> None:
        if self._workers.get(worker.miner_id) is worker:
            del self._workers[worker.miner_id]
            worker.on_slot_freed = None

    def get(self, miner_id: str) -> Worker | None:
        """The identity's live worker, if it is connected."""
        return self._workers.get(miner_id)

    def workers(self) -> list[Worker]:
        return list(self._workers.values())

    def serving(self, model: str) -> list[Worker]:
        """Workers that serve ``model``, busy or not (draining and closed ones excluded)."""
        return [worker for worker in self._workers.values() if serves(worker, model)]

    def available(self, model: str) -> list[Worker]:
        """Workers that can take a job for ``model`` now."""
        return [worker for worker in self._workers.values() if worker.accepts(model)]

    def _capacity(self, worker: Worker) -> None:
        if worker.closed_reason is not None or worker.draining:
            return
        for listener in self._listeners:
            listener(worker)
