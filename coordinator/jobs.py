"""What the coordinator asks of miners and what they answer, as plain values.

These are the domain's words for the miner protocol: the dispatcher, the completion, billing and
verification speak them, and only ``coordinator.gateway`` translates them to and from protobuf
(``coordinator/gateway/wire.py``). Field names follow ``proto/miner.proto`` so that the signed
byte layouts of ``proto.signing`` read a :class:`Job` or a :class:`Receipt` exactly as they read
the message a miner got or sent: the digests agree on both ends by construction.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

TopAlternatives = tuple[tuple[int, float], ...]
"""The most likely tokens at one position as ``(token id, logprob)``, most likely first."""


@dataclass(frozen=True, slots=True)
class Sampling:
    """How a job's tokens are chosen; everything here but ``top_logprobs`` is in its digest."""

    temperature: float  # 0 is greedy; carried as float32 on the wire, as the digest packs it
    top_p: float  # 1.0 disables nucleus sampling
    max_tokens: int  # upper bound on generated tokens, stop token included
    seed: int  # keys the Gumbel noise together with the job id and the position
    stop_token_ids: tuple[int, ...]  # generation ends after any of these
    top_k: int = 0  # 0 disables top-k
    top_logprobs: int = 0  # alternatives reported per token (0-20); never changes the choice


@dataclass(frozen=True, slots=True)
class Job:
    """One generation, exactly as a miner gets it: the coordinator tokenized the prompt."""

    job_id: str  # unique; keys the miner's noise, so a replay elsewhere samples the same tokens
    model: str  # catalog name
    prompt_token_ids: tuple[int, ...]  # the chat template already applied
    sampling: Sampling


@dataclass(frozen=True, slots=True)
class TokenChunk:
    """Tokens as the miner produced them, in order, checked on arrival by the gateway."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]  # the miner's claimed logprob of each token (temperature 1)
    # One entry per token when the job asked for top_logprobs, otherwise empty.
    top_logprobs: tuple[TopAlternatives, ...] = ()

    def followed_by(self, chunks: list[TokenChunk]) -> TokenChunk:
        """This chunk and ``chunks`` after it, as one."""
        return TokenChunk(
            token_ids=self.token_ids + tuple(t for c in chunks for t in c.token_ids),
            logprobs=self.logprobs + tuple(p for c in chunks for p in c.logprobs),
            top_logprobs=self.top_logprobs + tuple(a for c in chunks for a in c.top_logprobs),
        )


class MinerFinish(enum.StrEnum):
    """Why the miner says it stopped (the coordinator checks it against the tokens)."""

    UNSPECIFIED = "unspecified"  # not said: never a valid claim
    STOP = "stop"  # a stop token was produced
    LENGTH = "length"  # max_tokens or the model's context was reached
    CANCELLED = "cancelled"  # the coordinator cancelled the job


@dataclass(frozen=True, slots=True)
class Receipt:
    """What the miner attests it did; it signs ``proto.signing.receipt_message(receipt)``."""

    job_id: str
    request_sha256: bytes  # proto.signing.request_digest(job)
    output_sha256: bytes  # proto.signing.output_digest(token ids)
    prompt_tokens: int
    completion_tokens: int
    weights_sha256: bytes  # the weights it ran
    engine: str  # e.g. "torch-transformers/2.13.0"
    dtype: str  # compute dtype, e.g. "float32"


@dataclass(frozen=True, slots=True)
class JobResult:
    """The miner finished a job: its claim and its signed receipt."""

    finish_reason: MinerFinish
    receipt: Receipt
    signature: bytes  # Ed25519, by the miner's identity key, over receipt_message(receipt)


@dataclass(frozen=True, slots=True)
class JobFailure:
    """The miner could not run (or finish) a job."""

    message: str  # the miner's explanation
    retryable: bool  # not started, or may run elsewhere (e.g. the miner is draining)


@dataclass(frozen=True, slots=True)
class MinerLost:
    """The miner went away (disconnected, evicted, silent, or violated the protocol)."""

    reason: str  # shown in logs and, mid-stream, to the buyer


JobEvent = TokenChunk | JobResult | JobFailure | MinerLost
"""What can happen to a job on a miner, in arrival order."""


@dataclass(frozen=True, slots=True)
class ScoreRequest:
    """Re-score a finished job (usually another miner's) for a spot check."""

    score_id: str  # this request's own id
    job: Job  # the checked job as its miner got it: model, prompt, sampling, and the noise key
    completion_token_ids: tuple[int, ...]  # the tokens the checked miner claims it sampled
    # Per completion token, the alternatives it claimed (their logprobs stay with us); or empty.
    claimed_top_ids: tuple[tuple[int, ...], ...] = ()


@dataclass(frozen=True, slots=True)
class ScoreResult:
    """A scorer's reading of a job under the reference sampler (see ``miner/scorer.py``)."""

    logprobs: tuple[float, ...]  # one per completion token
    margins: tuple[float, ...]  # one per completion token; 0: the scorer picks the same token
    stop_margins: tuple[float, ...]  # one per completion token, or none from an older scorer
    scored_top_logprobs: tuple[tuple[float, ...], ...]  # per claimed alternative list, or none
    top_thresholds: tuple[float, ...]  # with scored_top_logprobs: the k-th largest logprob
    error: str = ""  # set when the job could not be scored; the lists are then empty
