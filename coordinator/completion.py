"""One running completion: miner tokens in, checked and decoded text deltas out.

The coordinator counts tokens itself and checks what the miner claims: token ids inside the
vocabulary and within max_tokens (the session checks those on arrival), a finish reason that
matches the tokens, and a signed receipt that matches the job. A delta counts as delivered only
when the consumer comes back for the next one, so a buyer who leaves early pays for what it took.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from coordinator.api import FinishReason, TextDelta, Usage
from coordinator.catalog import CatalogEntry, request_cost
from coordinator.detokenizer import IncrementalDetokenizer
from coordinator.dispatch import MinerRun
from coordinator.errors import UpstreamError
from proto import miner_pb2
from proto.signing import output_digest, receipt_message, request_digest

logger = logging.getLogger(__name__)

_FINISH = miner_pb2.FinishReason


@dataclass(frozen=True)
class VerifiedResult:
    """What the miner attested, checked against what the coordinator saw."""

    finish_reason: FinishReason  # derived by the coordinator from the tokens
    receipt_sha256: bytes  # hash of the signed receipt bytes and signature; the ledger reference
    receipt: miner_pb2.Receipt  # the miner's receipt
    signature: bytes  # the miner's Ed25519 signature over receipt_message(receipt)


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
    ) -> None:
        self.id = completion_id
        self.model = entry.name
        self.created = created
        self.prompt_tokens = prompt_tokens
        self.run = run
        self.delivered_ids: list[int] = []
        self.verified: VerifiedResult | None = None
        self.misbehaved = False
        self._entry = entry
        self._stream: AsyncGenerator[TextDelta, None] | None = None

    def __aiter__(self) -> AsyncIterator[TextDelta]:
        if self._stream is None:
            self._stream = self._deltas()
        return self._stream

    @property
    def finish_reason(self) -> FinishReason | None:
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
        if not self.delivered_ids or self.misbehaved:
            return 0
        return request_cost(
            self._entry,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.delivered_ids),
        )

    async def aclose(self) -> None:
        """Stops the miner if it is still generating and closes the delta stream."""
        self.run.cancel()
        if self._stream is not None:
            await self._stream.aclose()

    async def _deltas(self) -> AsyncGenerator[TextDelta, None]:
        detokenizer = IncrementalDetokenizer(self._entry.tokenizer)
        async for chunk in self.run.chunks():
            ids = list(chunk.token_ids)
            yield TextDelta(text=detokenizer.push(ids), token_count=len(ids))
            # Resumed: the consumer took the delta, so it was delivered.
            self.delivered_ids.extend(ids)
        assert self.run.result is not None
        try:
            self.verified = self._verify(self.run.result)
        except MinerMisbehaved as error:
            self.misbehaved = True
            self.run.session.close(f"protocol violation: {error}")
            raise
        tail = detokenizer.flush()
        if tail:
            yield TextDelta(text=tail, token_count=0)

    def _verify(self, result: miner_pb2.JobResult) -> VerifiedResult:
        job = self.run.job
        ids = self.delivered_ids
        stop_ids = set(job.sampling.stop_token_ids)
        if result.finish_reason == _FINISH.FINISH_REASON_STOP and ids and ids[-1] in stop_ids:
            finish: FinishReason = "stop"
        elif result.finish_reason == _FINISH.FINISH_REASON_LENGTH and (
            len(ids) == job.sampling.max_tokens
            or len(ids) + self.prompt_tokens >= self._entry.context_length
        ):
            finish = "length"
        else:
            raise MinerMisbehaved(
                f"the miner reported finish reason {_FINISH.Name(result.finish_reason)} after "
                f"{len(ids)} tokens, which does not match the job"
            )
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
        try:
            Ed25519PublicKey.from_public_bytes(self.run.session.hello.public_key).verify(
                result.signature, receipt_message(receipt)
            )
        except InvalidSignature:
            raise MinerMisbehaved("the miner's receipt signature is invalid") from None
        receipt_hash = hashlib.sha256(receipt_message(receipt) + result.signature).digest()
        return VerifiedResult(
            finish_reason=finish,
            receipt_sha256=receipt_hash,
            receipt=receipt,
            signature=result.signature,
        )
