"""The exact bytes that miners sign, and the digests inside them.

Protobuf serialization is not canonical, so everything that is signed or hashed is laid out here
by hand: big-endian integers, length-prefixed strings, a domain tag per message kind so that a
signature over one kind can never be replayed as another.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import Protocol


class SignedSampling(Protocol):
    """The sampling fields a request digest covers (``SamplingParams`` or the coordinator's)."""

    @property
    def temperature(self) -> float: ...
    @property
    def top_p(self) -> float: ...
    @property
    def top_k(self) -> int: ...
    @property
    def max_tokens(self) -> int: ...
    @property
    def seed(self) -> int: ...
    @property
    def stop_token_ids(self) -> Sequence[int]: ...


class SignedJob(Protocol):
    """What a request digest covers: a ``miner_pb2.Job`` or ``coordinator.jobs.Job``."""

    @property
    def job_id(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def prompt_token_ids(self) -> Sequence[int]: ...
    @property
    def sampling(self) -> SignedSampling: ...


class SignedReceipt(Protocol):
    """What a receipt signature covers: a ``miner_pb2.Receipt`` or ``coordinator.jobs.Receipt``."""

    @property
    def job_id(self) -> str: ...
    @property
    def request_sha256(self) -> bytes: ...
    @property
    def output_sha256(self) -> bytes: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def weights_sha256(self) -> bytes: ...
    @property
    def engine(self) -> str: ...
    @property
    def dtype(self) -> str: ...


_CHALLENGE_TAG = b"meshmint/v1/challenge\x00"
_REQUEST_TAG = b"meshmint/v1/request\x00"
_OUTPUT_TAG = b"meshmint/v1/output\x00"
_RECEIPT_TAG = b"meshmint/v1/receipt\x00"


def _text(value: str) -> bytes:
    raw = value.encode("utf-8")
    return struct.pack(">I", len(raw)) + raw


def _blob(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def _token_ids(ids: Sequence[int]) -> bytes:
    return struct.pack(">I", len(ids)) + struct.pack(f">{len(ids)}I", *ids)


def challenge_message(nonce: bytes, public_key: bytes) -> bytes:
    """What a miner signs to prove it holds the key it announced in Hello."""
    return _CHALLENGE_TAG + _blob(public_key) + _blob(nonce)


def request_digest(job: SignedJob) -> bytes:
    """SHA-256 of everything that determines a job's output: model, prompt, sampling, seed."""
    sampling = job.sampling
    layout = (
        _REQUEST_TAG
        + _text(job.job_id)
        + _text(job.model)
        + _token_ids(job.prompt_token_ids)
        + struct.pack(
            ">ffIIQ",
            sampling.temperature,
            sampling.top_p,
            sampling.top_k,
            sampling.max_tokens,
            sampling.seed,
        )
        + _token_ids(sampling.stop_token_ids)
    )
    return hashlib.sha256(layout).digest()


def output_digest(token_ids: Sequence[int]) -> bytes:
    """SHA-256 of the generated token ids, in order."""
    return hashlib.sha256(_OUTPUT_TAG + _token_ids(token_ids)).digest()


def receipt_message(receipt: SignedReceipt) -> bytes:
    """The bytes a miner signs to attest one job."""
    return (
        _RECEIPT_TAG
        + _text(receipt.job_id)
        + _blob(receipt.request_sha256)
        + _blob(receipt.output_sha256)
        + struct.pack(">II", receipt.prompt_tokens, receipt.completion_tokens)
        + _blob(receipt.weights_sha256)
        + _text(receipt.engine)
        + _text(receipt.dtype)
    )
