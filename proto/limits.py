"""Explicit size limits of the miner protocol, enforced by both ends of the stream."""

from __future__ import annotations

PROTOCOL_VERSION = 1
"""Bumped on any incompatible change to miner.proto or to the signed byte layouts."""

MAX_COORDINATOR_MESSAGE_BYTES = 8 * 1024 * 1024
"""Largest message the coordinator sends: a Job carrying a long prompt (~1M token ids)."""

MAX_MINER_MESSAGE_BYTES = 256 * 1024
"""Largest message a miner may send; token chunks and receipts are small. Larger is garbage."""

MAX_TOKENS_PER_CHUNK = 4096
"""A TokenChunk carrying more token ids than this is a protocol violation."""

MAX_TOP_LOGPROBS = 20
"""The most alternatives a token may carry (OpenAI's limit for ``top_logprobs``)."""

MAX_TOP_LOGPROB_TOKENS_PER_CHUNK = 512
"""Tokens per TokenChunk when each carries alternatives: 512 tokens of 20 stay near 80 KB,
well within MAX_MINER_MESSAGE_BYTES."""
