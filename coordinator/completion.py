"""One running completion: miner tokens in, checked and decoded text deltas out.

The coordinator counts tokens itself and checks what the miner claims: token ids inside the
vocabulary and within max_tokens (the session checks those on arrival), a finish reason that
matches the tokens, and a signed receipt that matches the job. A delta counts as delivered only
when the consumer comes back for the next one, so a buyer who leaves early pays for what it took.

Stop sequences are the coordinator's own business: when the decoded text completes a stop
string, the output is cut just before it, the miner is told to stop, and the buyer pays for the
tokens up to and including the one that completed the stop string (tokens the miner generated
after it are neither delivered nor paid). The miner then answers CANCELLED with a receipt for
everything it streamed, which is checked like any other; when that answer does not come within
``STOP_RESULT_WAIT_S``, the job settles like a broken stream (delivered tokens, no receipt), still
with finish reason "stop".
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from coordinator.api import FinishReason, TextDelta, TokenLogprob, Usage
from coordinator.catalog import CatalogEntry, request_cost
from coordinator.dispatch.dispatcher import MinerRun
from coordinator.errors import LimitKind, RateLimitState, UpstreamError
from coordinator.jobs import JobResult, MinerFinish, Receipt, TokenChunk, TopAlternatives
from coordinator.text.detokenizer import IncrementalDetokenizer
from coordinator.text.stop import StopMatcher
from proto.signing import output_digest, receipt_message, request_digest

logger = logging.getLogger(__name__)

STOP_RESULT_WAIT_S = 5.0
"""How long a completion cut at a stop string waits for the miner's CANCELLED result."""


@dataclass(frozen=True)
class VerifiedResult:
    """What the miner attested, checked against what the coordinator saw."""

    finish_reason: FinishReason  # derived by the coordinator from the tokens
    receipt_sha256: bytes  # hash of the signed receipt bytes and signature; the ledger reference
    receipt: Receipt  # the miner's receipt
    signature: bytes  # the miner's Ed25519 signature over receipt_message(receipt)
    miner_finish_reason: MinerFinish  # as the miner reported it


class MinerMisbehaved(UpstreamError):
    """The miner's result contradicts what it streamed; its work is not paid."""


class RunningCompletion:
    """Implements :class:`coordinator.api.Completion` over one :class:`MinerRun`."""

    def __init__(
        self,
        *,
        completion_id: str,
        created: int,
        entry: CatalogEntry,
        prompt_tokens: int,
        run: MinerRun,
        stop: tuple[str, ...] = (),
        logprobs: bool = False,
    ) -> None:
        """``stop``: strings that end the output just before the first of them. ``logprobs``:
        deltas carry their tokens with logprobs (decoding each token alone costs a little per
        token, so only when the buyer asked)."""
        self.id = completion_id
        self.model = entry.name
        self.created = created
        self.prompt_tokens = prompt_tokens
        self.run = run
        self.delivered_ids: list[int] = []
        self.received_ids: list[int] = []  # every token the miner streamed, delivered or not
        self.received_logprobs: list[float] = []  # the miner's claimed logprob of each of them
        # Their alternatives as the miner claimed them, when the buyer asked for top_logprobs.
        self.received_top_logprobs: list[TopAlternatives] = []
        self.rate_limits: Mapping[LimitKind, RateLimitState] = {}  # set by the service
        self.stopped = False  # a stop string ended the output
        self.verified: VerifiedResult | None = None
        self.misbehaved = False
        self.abandoned = False  # the buyer left before any of it could be delivered
        self.unbillable = False  # its hold failed: whatever was delivered cannot be charged
        # Places the request's durable hold (set by the service); called once, when the first
        # delta was delivered, so the ledger's work never delays the first token.
        self.place_hold: Callable[[], asyncio.Future[Any]] | None = None
        # That hold, committing while the job runs: once it failed, the stream ends at the next
        # delta. None until the first delta was delivered.
        self.hold: asyncio.Future[Any] | None = None
        self._entry = entry
        self._stop = stop
        self._logprobs = logprobs
        self._stream: AsyncGenerator[TextDelta, None] | None = None

    def __aiter__(self) -> AsyncIterator[TextDelta]:
        if self._stream is None:
            self._stream = self._deltas()
        return self._stream

    @property
    def finish_reason(self) -> FinishReason | None:
        if self.stopped:
            return "stop"
        return self.verified.finish_reason if self.verified else None

    @property
    def usage(self) -> Usage:
        completion_tokens = len(self.delivered_ids)
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion_tokens,
            cost=self.cost(),
        )

    def cost(self) -> int:
        """What the buyer owes now: delivered tokens only; nothing when nothing was delivered."""
        if not self.delivered_ids or self.misbehaved or self.abandoned or self.unbillable:
            return 0
        return request_cost(
            self._entry,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.delivered_ids),
        )

    def abandon(self) -> None:
        """Nothing will reach the buyer: the miner is stopped on exit and nothing is billed."""
        self.abandoned = True

    async def aclose(self) -> None:
        """Stops the miner if it is still generating and closes the delta stream."""
        self.run.cancel()
        if self._stream is not None:
            await self._stream.aclose()

    async def _deltas(self) -> AsyncGenerator[TextDelta, None]:
        detokenizer = IncrementalDetokenizer(self._entry.tokenizer)
        matcher = StopMatcher(self._stop)
        chunks = self.run.chunks()
        matched = False
        try:
            try:
                async for chunk in chunks:
                    ids = list(chunk.token_ids)
                    self._receive(chunk)
                    if self._stop:
                        text, count, matched = self._until_stop(ids, detokenizer, matcher)
                    else:
                        text, count = detokenizer.push(ids), len(ids)
                    tokens = (
                        self._token_logprobs(
                            ids[:count], chunk.logprobs[:count], chunk.top_logprobs[:count]
                        )
                        if self._logprobs
                        else ()
                    )
                    self._check_hold()
                    yield TextDelta(text=text, token_count=count, tokens=tokens)
                    # Resumed: the consumer took the delta, so it was delivered.
                    self.delivered_ids.extend(ids[:count])
                    if self.hold is None and self.place_hold is not None:
                        self.hold = self.place_hold()
                    if matched:
                        self.stopped = True
                        break
            except UpstreamError:
                held = matcher.flush()  # billed tokens: let their text out before failing
                if held:
                    yield TextDelta(text=held, token_count=0)
                raise
            if self.stopped:
                await self._settle_stop(chunks)
                return
        finally:
            if isinstance(chunks, AsyncGenerator):
                await chunks.aclose()
        assert self.run.result is not None
        self._check(self.run.result)
        emit, matched = matcher.push(detokenizer.flush())
        self.stopped = matched
        tail = emit + matcher.flush()
        if tail:
            yield TextDelta(text=tail, token_count=0)

    @staticmethod
    def _until_stop(
        ids: Sequence[int], detokenizer: IncrementalDetokenizer, matcher: StopMatcher
    ) -> tuple[str, int, bool]:
        """The text of ``ids`` up to the token that completes a stop string, if one does; the
        tokens that text accounts for; whether a stop string matched. Token by token, so a stop
        string is billed up to the token that completed it."""
        text = ""
        for count, token_id in enumerate(ids, 1):
            emit, matched = matcher.push(detokenizer.push([token_id]))
            text += emit
            if matched:
                return text, count, True
        return text, len(ids), False

    async def _settle_stop(self, chunks: AsyncIterator[TokenChunk]) -> None:
        """After a stop string: stops the miner and checks its result if it comes in time."""
        self.run.cancel()
        try:
            async with asyncio.timeout(STOP_RESULT_WAIT_S):
                async for chunk in chunks:
                    self._receive(chunk)
        except (TimeoutError, UpstreamError) as error:
            logger.info(
                "job %s: no result after the stop string (%s); billing delivered tokens",
                self.run.job.job_id,
                error or "timed out",
            )
            return
        assert self.run.result is not None
        self._check(self.run.result)

    def _receive(self, chunk: TokenChunk) -> None:
        self.received_ids.extend(chunk.token_ids)
        self.received_logprobs.extend(chunk.logprobs)
        self.received_top_logprobs.extend(chunk.top_logprobs)

    def _check_hold(self) -> None:
        """Raises the hold's error once it failed: nothing more goes out unpaid."""
        hold = self.hold
        if hold is not None and hold.done() and not hold.cancelled():
            error = hold.exception()
            if error is not None:
                self.unbillable = True
                raise error

    def _check(self, result: JobResult) -> None:
        try:
            self.verified = self._verify(result)
        except MinerMisbehaved as error:
            self.misbehaved = True
            self.run.worker.close(f"protocol violation: {error}")
            raise

    def _token_logprobs(
        self,
        ids: Sequence[int],
        logprobs: Sequence[float],
        tops: Sequence[TopAlternatives],
    ) -> tuple[TokenLogprob, ...]:
        alternatives: Sequence[tuple[TokenLogprob, ...]] = [
            tuple(self._token_logprob(token_id, logprob) for token_id, logprob in top)
            for top in tops
        ] or [()] * len(ids)
        return tuple(
            replace(self._token_logprob(token_id, logprob), alternatives=others)
            for token_id, logprob, others in zip(ids, logprobs, alternatives, strict=True)
        )

    def _token_logprob(self, token_id: int, logprob: float) -> TokenLogprob:
        tokenizer = self._entry.tokenizer
        return TokenLogprob(
            token_id=token_id,
            text=tokenizer.decode([token_id]),
            logprob=logprob,
            raw=tokenizer.token_bytes(token_id),
        )

    def _verify(self, result: JobResult) -> VerifiedResult:
        job = self.run.job
        ids = self.received_ids
        stop_ids = set(job.sampling.stop_token_ids)
        if result.finish_reason is MinerFinish.STOP and ids and ids[-1] in stop_ids:
            finish: FinishReason = "stop"
        elif result.finish_reason is MinerFinish.LENGTH and (
            len(ids) == job.sampling.max_tokens
            or len(ids) + self.prompt_tokens >= self._entry.context_length
        ):
            finish = "length"
        elif self.stopped and result.finish_reason is MinerFinish.CANCELLED:
            finish = "stop"  # the coordinator cut the output at a stop string and cancelled
        else:
            raise MinerMisbehaved(
                f"the miner reported finish reason {result.finish_reason.name} after "
                f"{len(ids)} tokens, which does not match the job"
            )
        if self.stopped:
            finish = "stop"  # the miner may have finished before the cancel reached it
        receipt = result.receipt
        expected = (
            receipt.job_id == job.job_id
            and receipt.request_sha256 == request_digest(job)
            and receipt.output_sha256 == output_digest(ids)
            and receipt.prompt_tokens == len(job.prompt_token_ids)
            and receipt.completion_tokens == len(ids)
            and receipt.weights_sha256 == self._entry.weights_sha256
        )
        if not expected:
            raise MinerMisbehaved("the miner's receipt does not match the job it streamed")
        signed = receipt_message(receipt)
        try:
            _receipt_key(self.run.worker.public_key).verify(result.signature, signed)
        except InvalidSignature:
            raise MinerMisbehaved("the miner's receipt signature is invalid") from None
        receipt_hash = hashlib.sha256(signed + result.signature).digest()
        return VerifiedResult(
            finish_reason=finish,
            receipt_sha256=receipt_hash,
            receipt=receipt,
            signature=result.signature,
            miner_finish_reason=result.finish_reason,
        )


@functools.lru_cache(maxsize=4096)
def _receipt_key(public_key: bytes) -> Ed25519PublicKey:
    """A miner's identity key, parsed once rather than at every receipt it signs."""
    return Ed25519PublicKey.from_public_bytes(public_key)
