"""Streaming text from a growing list of token ids.

Decoding each new token on its own is wrong twice over: byte-level BPE splits multi-byte UTF-8
characters across tokens (a lone piece decodes to U+FFFD), and SentencePiece decoders drop the
leading space of whichever token comes first. So, like vLLM and TGI, the detokenizer decodes a
short window that starts one emitted chunk back (the *prefix*), and emits the part of the window
text past the prefix text, but only once it does not end in U+FFFD, that is, once the last
character is complete.

The deltas add up to ``tokenizer.decode(all_ids)`` for every decoder whose output for a prefix of
the bytes is a prefix of its output for all of them (byte-level BPE, SentencePiece on valid text).
One exception bounds the work per token: after ``MAX_PENDING_TOKENS`` tokens without a complete
character (a miner emitting garbage bytes), the replacement characters go out as they stand.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from coordinator.text.tokenization import ModelTokenizer

logger = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"
MAX_PENDING_TOKENS = 256
"""Tokens held back waiting for a character to complete; a UTF-8 character needs at most 4."""


class IncrementalDetokenizer:
    """Turns token ids, pushed as they arrive, into text deltas. One per completion."""

    def __init__(self, tokenizer: ModelTokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        # ids[_prefix_offset:_read_offset] were emitted last; ids[_read_offset:] are pending.
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text = ""  # decode(ids[_prefix_offset:_read_offset])

    def push(self, token_ids: Sequence[int]) -> str:
        """Adds tokens; returns the text they complete (often "", e.g. mid-character)."""
        # Tokens that decode to nothing never enter a window, so they cannot make one grow.
        self._ids.extend(self._tokenizer.text_ids(token_ids))
        if len(self._ids) == self._read_offset:
            return ""
        text = self._tokenizer.decode(self._ids[self._prefix_offset :])
        pending = len(self._ids) - self._read_offset
        if text.endswith(REPLACEMENT_CHAR) and pending <= MAX_PENDING_TOKENS:
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """Whatever is still held back, e.g. a character the stream never completed."""
        if len(self._ids) == self._read_offset:
            return ""
        return self._emit(self._tokenizer.decode(self._ids[self._prefix_offset :]))

    def _emit(self, text: str) -> str:
        if len(text) <= len(self._prefix_text):
            # Tokens that decode to "" (a bare SentencePiece space) or a decoder that shrank the
            # window: nothing to emit yet.
            return ""
        if not text.startswith(self._prefix_text):
            # Lengths only: no log line may hold a buyer's text (README, "Privacy").
            logger.debug(
                "window text (%d chars) does not extend its prefix (%d chars)",
                len(text),
                len(self._prefix_text),
            )
        delta = text[len(self._prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = self._tokenizer.decode(self._ids[self._prefix_offset :])
        return delta
