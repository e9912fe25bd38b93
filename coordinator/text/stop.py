"""Stop sequences: cutting streamed text just before the first stop string.

The coordinator finds stop strings in the decoded text itself (a miner only knows stop token
ids). Text arrives in pieces, so a stop string may straddle them; like vLLM and TGI, the matcher
holds back the shortest tail that could still grow into a stop string, and never lets out text
that later turns out to be part of one. Unlike a fixed holdback of ``longest - 1`` characters, it
holds only a tail that is a proper prefix of some stop string, which is at most that long, so text
without a stop string's start flows through at once.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feeds text through, cut before the earliest stop string. One per completion."""

    def __init__(self, stops: Sequence[str]) -> None:
        """``stops`` are non-empty strings; with none, text passes through unchanged."""
        if any(not stop for stop in stops):
            raise ValueError("stop strings must be non-empty")
        self._stops = tuple(stops)
        self._max_held = max((len(stop) for stop in self._stops), default=1) - 1
        self._held = ""
        self.matched = False  # a stop string was found; nothing more goes out

    @property
    def held(self) -> str:
        """Text received but not yet emitted: a tail that may start a stop string."""
        return self._held

    def push(self, text: str) -> tuple[str, bool]:
        """Adds text; returns what is safe to emit now and whether a stop string completed.

        On a match, the emitted text ends just before the stop string and everything after it,
        now and later, is dropped.
        """
        if self.matched:
            return "", True
        if not self._stops:
            return text, False
        buffer = self._held + text
        found = [at for stop in self._stops if (at := buffer.find(stop)) >= 0]
        if found:
            self.matched = True
            self._held = ""
            return buffer[: min(found)], True
        keep = self._open_tail(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """The held tail, at the end of the text (it never completed a stop string)."""
        held, self._held = self._held, ""
        return "" if self.matched else held

    def _open_tail(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of a stop string."""
        for length in range(min(self._max_held, len(buffer)), 0, -1):
            tail = buffer[-length:]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0
