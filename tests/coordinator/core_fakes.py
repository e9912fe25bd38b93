"""Builders for the unit tests of the coordinator's core: catalog, miner keys, sessions, messages.

Everything here is real: a catalog loaded from the tiny test model, Ed25519 keys from
``cryptography``, :class:`MinerSession` objects and protobuf messages. The miner is simulated by
reading ``session.outbox`` and calling ``session.deliver``, which is exactly what the gRPC
servicer does with a real stream.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from coordinator.catalog import Catalog, CatalogEntry, catalog_from_specs
from coordinator.gateway.session import MinerSession
from coordinator.jobs import Job, Sampling
from miner.test_model import create_test_model
from proto import miner_pb2
from proto.limits import PROTOCOL_VERSION
from proto.signing import SignedJob, output_digest, receipt_message, request_digest

MODEL = "tiny"
# 1.5 and 2.5 micro-units per token: costs are fractional before rounding, so rounding is tested.
INPUT_PRICE_PER_MTOK = 1_500_000
OUTPUT_PRICE_PER_MTOK = 2_500_000
FINISH = miner_pb2.FinishReason
WAIT_S = 2.0  # the longest any helper waits for the code under test before failing the test

_job_numbers = itertools.count(1)


def build_catalog(directory: Path) -> Catalog:
    """A one-model catalog ("tiny") loaded from a freshly written test model."""
    model_dir = create_test_model(directory / MODEL)
    return catalog_from_specs(
        [f"{MODEL}={model_dir}"],
        input_price_per_mtok=INPUT_PRICE_PER_MTOK,
        output_price_per_mtok=OUTPUT_PRICE_PER_MTOK,
    )


class MinerKey:
    """A miner's Ed25519 identity."""

    def __init__(self) -> None:
        self.private = Ed25519PrivateKey.generate()
        self.public = self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def miner_id(self) -> str:
        return self.public.hex()

    def sign(self, message: bytes) -> bytes:
        return self.private.sign(message)


def make_hello(
    entries: Iterable[CatalogEntry], *, key: MinerKey, max_concurrency: int = 1
) -> miner_pb2.Hello:
    """A Hello that announces ``entries`` with the right weights hashes."""
    return miner_pb2.Hello(
        protocol_version=PROTOCOL_VERSION,
        public_key=key.public,
        software_version="test",
        hardware=miner_pb2.Hardware(accelerator="cpu", device_name="test", cpu_count=1),
        models=[
            miner_pb2.ServedModel(
                name=entry.name, weights_sha256=entry.weights_sha256, dtype="float32", engine="t"
            )
            for entry in entries
        ],
        max_concurrency=max_concurrency,
    )


def make_session(
    catalog: Catalog, *, key: MinerKey | None = None, max_concurrency: int = 1
) -> MinerSession:
    """A welcomed session serving every model of ``catalog``, as the gateway would build it."""
    key = key or MinerKey()
    return MinerSession(
        make_hello(catalog.entries(), key=key, max_concurrency=max_concurrency),
        miner_id=key.miner_id,
        vocab_sizes={entry.name: entry.tokenizer.vocab_size for entry in catalog.entries()},
    )


def bare_session(
    models: Sequence[str] = (MODEL,), *, miner_id: str | None = None, max_concurrency: int = 1
) -> MinerSession:
    """A session for routing tests, which never look at tokens or weights."""
    key = MinerKey()
    hello = miner_pb2.Hello(
        protocol_version=PROTOCOL_VERSION,
        public_key=key.public,
        models=[miner_pb2.ServedModel(name=name) for name in models],
        max_concurrency=max_concurrency,
    )
    return MinerSession(
        hello, miner_id=miner_id or key.miner_id, vocab_sizes=dict.fromkeys(models, 256)
    )


def new_job_id() -> str:
    return f"job-test-{next(_job_numbers)}"


def make_job(
    entry: CatalogEntry,
    *,
    max_tokens: int = 16,
    prompt_ids: Sequence[int] | None = None,
    job_id: str | None = None,
) -> Job:
    """A job for ``entry`` with its real stop tokens."""
    return Job(
        job_id=job_id or new_job_id(),
        model=entry.name,
        prompt_token_ids=tuple(prompt_ids if prompt_ids is not None else text_ids(entry, "Hi")),
        sampling=Sampling(
            temperature=0.0,
            top_p=1.0,
            max_tokens=max_tokens,
            seed=42,
            stop_token_ids=entry.tokenizer.stop_token_ids,
        ),
    )


def busy(session: MinerSession, jobs: int = 1) -> None:
    """Occupies ``jobs`` slots of ``session`` with placeholder jobs."""
    for _ in range(jobs):
        model = next(iter(session.models))
        session.start_job(Job(new_job_id(), model, (), Sampling(0.0, 1.0, 16, 0, ())))


def text_ids(entry: CatalogEntry, text: str) -> list[int]:
    """The token ids of ``text`` (the test tokenizer adds no special tokens to plain text)."""
    return entry.tokenizer.encode_prompt(text)


def stop_id(entry: CatalogEntry) -> int:
    return entry.tokenizer.stop_token_ids[0]


def chunk(job_id: str, token_ids: Sequence[int]) -> miner_pb2.MinerMessage:
    """A well-formed TokenChunk message."""
    return miner_pb2.MinerMessage(
        chunk=miner_pb2.TokenChunk(
            job_id=job_id, token_ids=list(token_ids), logprobs=[-0.5] * len(token_ids)
        )
    )


def receipt_for(
    job: SignedJob, token_ids: Sequence[int], *, weights_sha256: bytes
) -> miner_pb2.Receipt:
    """The receipt an honest miner writes for ``job`` having produced ``token_ids``."""
    return miner_pb2.Receipt(
        job_id=job.job_id,
        request_sha256=request_digest(job),
        output_sha256=output_digest(token_ids),
        prompt_tokens=len(job.prompt_token_ids),
        completion_tokens=len(token_ids),
        weights_sha256=weights_sha256,
        engine="test-engine",
        dtype="float32",
    )


def signed_result(
    job: SignedJob,
    receipt: miner_pb2.Receipt,
    finish_reason: miner_pb2.FinishReason.ValueType,
    *,
    key: MinerKey,
) -> miner_pb2.JobResult:
    """A JobResult carrying ``receipt`` signed by ``key``."""
    return miner_pb2.JobResult(
        job_id=job.job_id,
        finish_reason=finish_reason,
        receipt=receipt,
        signature=key.sign(receipt_message(receipt)),
    )


def result_message(result: miner_pb2.JobResult) -> miner_pb2.MinerMessage:
    return miner_pb2.MinerMessage(result=result)


def failure(job_id: str, message: str, *, retryable: bool = True) -> miner_pb2.MinerMessage:
    return miner_pb2.MinerMessage(
        failure=miner_pb2.JobFailure(job_id=job_id, message=message, retryable=retryable)
    )


def outbox_messages(session: MinerSession) -> list[miner_pb2.CoordinatorMessage | None]:
    """Everything queued for the miner so far (the queue is emptied)."""
    messages: list[miner_pb2.CoordinatorMessage | None] = []
    while not session.outbox.empty():
        messages.append(session.outbox.get_nowait())
    return messages


def cancelled_ids(messages: Iterable[miner_pb2.CoordinatorMessage | None]) -> list[str]:
    """Job ids of the CancelJob messages among ``messages``."""
    return [
        message.cancel.job_id
        for message in messages
        if message is not None and message.WhichOneof("body") == "cancel"
    ]


async def next_outbound(session: MinerSession) -> miner_pb2.CoordinatorMessage:
    """The next message sent to the miner; fails the test after WAIT_S seconds or at the end."""
    message = await asyncio.wait_for(session.outbox.get(), WAIT_S)
    assert message is not None, "the session was closed"
    return message


def as_job(job: miner_pb2.Job) -> Job:
    """The coordinator's value of a job message, to compare with what the test started."""
    sampling = job.sampling
    return Job(
        job_id=job.job_id,
        model=job.model,
        prompt_token_ids=tuple(job.prompt_token_ids),
        sampling=Sampling(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=sampling.max_tokens,
            seed=sampling.seed,
            stop_token_ids=tuple(sampling.stop_token_ids),
            top_logprobs=sampling.top_logprobs,
        ),
    )


async def next_job(session: MinerSession) -> Job:
    """The next job sent to the miner (it must be the next message), as a :class:`Job`."""
    message = await next_outbound(session)
    assert message.WhichOneof("body") == "job", message
    return as_job(message.job)


async def play_job(
    session: MinerSession,
    key: MinerKey,
    entry: CatalogEntry,
    token_ids: Sequence[int],
    *,
    finish: miner_pb2.FinishReason.ValueType = FINISH.FINISH_REASON_STOP,
    until_cancelled: bool = False,
) -> tuple[Job, bool]:
    """Plays an honest miner for one job: one chunk per token, then a signed result.

    With ``until_cancelled`` the result waits for the coordinator's CancelJob and says
    CANCELLED. Returns the job and whether a CancelJob for it arrived.
    """
    job = await next_job(session)
    for token in token_ids:
        assert session.deliver(chunk(job.job_id, [token])) is None
        await asyncio.sleep(0)  # let the consumer run between chunks, as a real stream would
    cancelled = False
    if until_cancelled:
        message = await next_outbound(session)
        cancelled = message.WhichOneof("body") == "cancel" and message.cancel.job_id == job.job_id
        finish = FINISH.FINISH_REASON_CANCELLED
    receipt = receipt_for(job, token_ids, weights_sha256=entry.weights_sha256)
    assert session.deliver(result_message(signed_result(job, receipt, finish, key=key))) is None
    return job, cancelled
