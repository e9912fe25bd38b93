"""The replicas' wire format: domain values as JSON, for the messages replicas send over NATS.

Replicas of one operator trust each other (they share the database and the ledger key), so this
format carries what one replica already checked (a miner's tokens, its receipt) without checking
it again. Bytes travel as base64; logprobs and margins may be infinite, which Python's JSON reads
back as it wrote them (both ends are meshmint).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from coordinator.errors import CoordinatorError
from coordinator.jobs import (
    Job,
    JobEvent,
    JobFailure,
    JobResult,
    MinerFinish,
    MinerLost,
    Receipt,
    Sampling,
    ScoreRequest,
    ScoreResult,
    TokenChunk,
)
from coordinator.worker import ConsistencyProof, CreditReceipt, SlashNotice

Document = dict[str, Any]


class CodecError(CoordinatorError, ValueError):
    """A replica message that is not what this version of meshmint sends."""


def dumps(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def loads(payload: bytes) -> Document:
    try:
        document = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CodecError(f"not JSON: {error}") from None
    if not isinstance(document, dict):
        raise CodecError("not a JSON object")
    return document


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def _bytes(value: str) -> bytes:
    return base64.b64decode(value)


def job_document(job: Job) -> Document:
    sampling = job.sampling
    return {
        "id": job.job_id,
        "model": job.model,
        "prompt": job.prompt_token_ids,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "max_tokens": sampling.max_tokens,
        "seed": sampling.seed,
        "stop": sampling.stop_token_ids,
        "top_logprobs": sampling.top_logprobs,
    }


def job_from(document: Document) -> Job:
    try:
        return Job(
            job_id=str(document["id"]),
            model=str(document["model"]),
            prompt_token_ids=tuple(int(token) for token in document["prompt"]),
            sampling=Sampling(
                temperature=float(document["temperature"]),
                top_p=float(document["top_p"]),
                top_k=int(document["top_k"]),
                max_tokens=int(document["max_tokens"]),
                seed=int(document["seed"]),
                stop_token_ids=tuple(int(token) for token in document["stop"]),
                top_logprobs=int(document["top_logprobs"]),
            ),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CodecError(f"bad job: {error!r}") from None


def event_document(event: JobEvent) -> Document:
    if isinstance(event, TokenChunk):
        return {
            "chunk": {
                "ids": event.token_ids,
                "logprobs": event.logprobs,
                "top": [[list(pair) for pair in top] for top in event.top_logprobs],
            }
        }
    if isinstance(event, JobResult):
        receipt = event.receipt
        return {
            "result": {
                "finish": event.finish_reason.value,
                "signature": _b64(event.signature),
                "job_id": receipt.job_id,
                "request_sha256": _b64(receipt.request_sha256),
                "output_sha256": _b64(receipt.output_sha256),
                "prompt_tokens": receipt.prompt_tokens,
                "completion_tokens": receipt.completion_tokens,
                "weights_sha256": _b64(receipt.weights_sha256),
                "engine": receipt.engine,
                "dtype": receipt.dtype,
            }
        }
    if isinstance(event, JobFailure):
        return {"failure": {"message": event.message, "retryable": event.retryable}}
    return {"lost": {"reason": event.reason}}


def event_from(document: Document) -> JobEvent:
    try:
        if "chunk" in document:
            chunk = document["chunk"]
            return TokenChunk(
                token_ids=tuple(int(token) for token in chunk["ids"]),
                logprobs=tuple(float(logprob) for logprob in chunk["logprobs"]),
                top_logprobs=tuple(
                    tuple((int(token), float(logprob)) for token, logprob in top)
                    for top in chunk["top"]
                ),
            )
        if "result" in document:
            result = document["result"]
            return JobResult(
                finish_reason=MinerFinish(result["finish"]),
                signature=_bytes(result["signature"]),
                receipt=Receipt(
                    job_id=str(result["job_id"]),
                    request_sha256=_bytes(result["request_sha256"]),
                    output_sha256=_bytes(result["output_sha256"]),
                    prompt_tokens=int(result["prompt_tokens"]),
                    completion_tokens=int(result["completion_tokens"]),
                    weights_sha256=_bytes(result["weights_sha256"]),
                    engine=str(result["engine"]),
                    dtype=str(result["dtype"]),
                ),
            )
        if "failure" in document:
            failure = document["failure"]
            return JobFailure(message=str(failure["message"]), retryable=bool(failure["retryable"]))
        return MinerLost(reason=str(document["lost"]["reason"]))
    except (KeyError, TypeError, ValueError) as error:
        raise CodecError(f"bad job event: {error!r}") from None


def score_request_document(request: ScoreRequest) -> Document:
    return {
        "id": request.score_id,
        "job": job_document(request.job),
        "completion": request.completion_token_ids,
        "claimed_top": request.claimed_top_ids,
    }


def score_request_from(document: Document) -> ScoreRequest:
    try:
        return ScoreRequest(
            score_id=str(document["id"]),
            job=job_from(document["job"]),
            completion_token_ids=tuple(int(token) for token in document["completion"]),
            claimed_top_ids=tuple(
                tuple(int(token) for token in top) for top in document["claimed_top"]
            ),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CodecError(f"bad score request: {error!r}") from None


def score_result_document(result: ScoreResult) -> Document:
    return {
        "logprobs": result.logprobs,
        "margins": result.margins,
        "stop_margins": result.stop_margins,
        "scored_top": result.scored_top_logprobs,
        "top_thresholds": result.top_thresholds,
        "error": result.error,
    }


def score_result_from(document: Document) -> ScoreResult:
    try:
        return ScoreResult(
            logprobs=tuple(float(value) for value in document["logprobs"]),
            margins=tuple(float(value) for value in document["margins"]),
            stop_margins=tuple(float(value) for value in document["stop_margins"]),
            scored_top_logprobs=tuple(
                tuple(float(value) for value in top) for top in document["scored_top"]
            ),
            top_thresholds=tuple(float(value) for value in document["top_thresholds"]),
            error=str(document["error"]),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CodecError(f"bad score result: {error!r}") from None


def credit_receipt_document(receipt: CreditReceipt) -> Document:
    return {
        "job_id": receipt.job_id,
        "entry": _b64(receipt.entry),
        "index": receipt.index,
        "tree_size": receipt.tree_size,
        "proof": [_b64(node) for node in receipt.inclusion_proof],
        "checkpoint": _b64(receipt.checkpoint),
    }


def credit_receipt_from(document: Document) -> CreditReceipt:
    return CreditReceipt(
        job_id=str(document["job_id"]),
        entry=_bytes(document["entry"]),
        index=int(document["index"]),
        tree_size=int(document["tree_size"]),
        inclusion_proof=tuple(_bytes(node) for node in document["proof"]),
        checkpoint=_bytes(document["checkpoint"]),
    )


def consistency_proof_document(proof: ConsistencyProof) -> Document:
    return {
        "old_size": proof.old_size,
        "new_size": proof.new_size,
        "hashes": [_b64(node) for node in proof.hashes],
        "checkpoint": _b64(proof.checkpoint),
        "error": proof.error,
    }


def consistency_proof_from(document: Document) -> ConsistencyProof:
    return ConsistencyProof(
        old_size=int(document["old_size"]),
        new_size=int(document["new_size"]),
        hashes=tuple(_bytes(node) for node in document["hashes"]),
        checkpoint=_bytes(document["checkpoint"]),
        error=str(document["error"]),
    )


def slash_notice_document(notice: SlashNotice) -> Document:
    return {
        "job_id": notice.job_id,
        "amount": notice.amount,
        "reason": notice.reason,
        "banned": notice.banned,
    }


def slash_notice_from(document: Document) -> SlashNotice:
    return SlashNotice(
        job_id=str(document["job_id"]),
        amount=int(document["amount"]),
        reason=str(document["reason"]),
        banned=bool(document["banned"]),
    )


@dataclass(frozen=True, slots=True)
class WorkerState:
    """What a replica tells the others about one miner connected to it."""

    miner_id: str
    public_key: bytes
    models: tuple[str, ...]
    device_name: str
    accelerator: str
    retains_data: bool
    max_concurrency: int
    active_jobs: int  # every job it runs, whoever asked
    jobs_by_origin: Mapping[str, int]  # of those, the ones each other replica relayed
    draining: bool
    ttft_s: float | None  # the miner's measured speed (coordinator/dispatch/speed.py)
    tokens_per_s: float | None
    jobs_measured: int
    connected_for_s: float  # since it joined its replica

    def document(self) -> Document:
        return {
            "miner_id": self.miner_id,
            "public_key": _b64(self.public_key),
            "models": self.models,
            "device_name": self.device_name,
            "accelerator": self.accelerator,
            "retains_data": self.retains_data,
            "max_concurrency": self.max_concurrency,
            "active_jobs": self.active_jobs,
            "jobs_by_origin": dict(self.jobs_by_origin),
            "draining": self.draining,
            "ttft_s": self.ttft_s,
            "tokens_per_s": self.tokens_per_s,
            "jobs_measured": self.jobs_measured,
            "connected_for_s": self.connected_for_s,
        }

    @classmethod
    def of(cls, document: Document) -> WorkerState:
        try:
            ttft, rate = document["ttft_s"], document["tokens_per_s"]
            return cls(
                miner_id=str(document["miner_id"]),
                public_key=_bytes(document["public_key"]),
                models=tuple(str(name) for name in document["models"]),
                device_name=str(document["device_name"]),
                accelerator=str(document["accelerator"]),
                retains_data=bool(document["retains_data"]),
                max_concurrency=int(document["max_concurrency"]),
                active_jobs=int(document["active_jobs"]),
                jobs_by_origin={str(k): int(v) for k, v in document["jobs_by_origin"].items()},
                draining=bool(document["draining"]),
                ttft_s=None if ttft is None else float(ttft),
                tokens_per_s=None if rate is None else float(rate),
                jobs_measured=int(document["jobs_measured"]),
                connected_for_s=float(document["connected_for_s"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise CodecError(f"bad worker state: {error!r}") from None
