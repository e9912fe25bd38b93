"""The connected miners, by identity and by the models they serve."""

from __future__ import annotations

import logging
from collections.abc import Callable

from coordinator.gateway.session import MinerSession

logger = logging.getLogger(__name__)

CapacityListener = Callable[[MinerSession], None]
"""Told of a session that may have a free slot now: it joined, or one of its jobs ended."""


class MinerRegistry:
    """Welcomed miner sessions. One session per identity key: the newest connection wins."""

    def __init__(self) -> None:
        self._sessions: dict[str, MinerSession] = {}
        self._listeners: list[CapacityListener] = []

    def watch_capacity(self, listener: CapacityListener) -> None:
        """Calls ``listener`` whenever a session joins or frees a job slot (the dispatcher's
        queue waits on this)."""
        self._listeners.append(listener)

    def add(self, session: MinerSession) -> None:
        previous = self._sessions.get(session.miner_id)
        if previous is not None and previous is not session:
            # The same key proved itself again: the old stream is a leftover (e.g. a restart
            # faster than eviction). Its jobs fail over like any lost miner's.
            previous.close("replaced by a newer connection of the same miner")
        self._sessions[session.miner_id] = session
        session.on_slot_freed = self._capacity
        self._capacity(session)

    def remove(self, session: MinerSession) -> None:
        if self._sessions.get(session.miner_id) is session:
            del self._sessions[session.miner_id]
            session.on_slot_freed = None

    def get(self, miner_id: str) -> MinerSession | None:
        """The identity's live session, if it is connected."""
        return self._sessions.get(miner_id)

    def sessions(self) -> list[MinerSession]:
        return list(self._sessions.values())

    def serving(self, model: str) -> list[MinerSession]:
        """Sessions that serve ``model``, busy or not (draining and closed ones excluded)."""
        return [
            session
            for session in self._sessions.values()
            if model in session.models and not session.draining and session.closed_reason is None
        ]

    def available(self, model: str) -> list[MinerSession]:
        """Sessions that can take a job for ``model`` now."""
        return [session for session in self._sessions.values() if session.accepts(model)]

    def _capacity(self, session: MinerSession) -> None:
        if session.closed_reason is not None or session.draining:
            return
        for listener in self._listeners:
            listener(session)
