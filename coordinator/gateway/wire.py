"""Protobuf to the domain values of :mod:`coordinator.jobs` and :mod:`coordinator.worker`, and back.

The only place where a job, a chunk, a receipt or a notice changes form: the session validates
what arrives as protobuf, and hands the rest of the coordinator plain values.
"""

from __future__ import annotations

from coordinator.jobs import (
    Job,
    JobFailure,
    JobResult,
    MinerFinish,
    Receipt,
    ScoreRequest,
    ScoreResult,
    TokenChunk,
)
from coordinator.worker import ConsistencyProof, CreditReceipt, SlashNotice, WitnessAlarm
from proto import miner_pb2

_FINISH_FROM_WIRE = {
    miner_pb2.FINISH_REASON_STOP: MinerFinish.STOP,
    miner_pb2.FINISH_REASON_LENGTH: MinerFinish.LENGTH,
    miner_pb2.FINISH_REASON_CANCELLED: MinerFinish.CANCELLED,
}


def job_message(job: Job) -> miner_pb2.Job:
    sampling = job.sampling
    return miner_pb2.Job(
        job_id=job.job_id,
        model=job.model,
        prompt_token_ids=job.prompt_token_ids,
        sampling=miner_pb2.SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=sampling.max_tokens,
            seed=sampling.seed,
            stop_token_ids=sampling.stop_token_ids,
            top_logprobs=sampling.top_logprobs,
        ),
    )


def token_chunk(chunk: miner_pb2.TokenChunk) -> TokenChunk:
    return TokenChunk(
        token_ids=tuple(chunk.token_ids),
        logprobs=tuple(chunk.logprobs),
        top_logprobs=tuple(
            tuple(zip(top.token_ids, top.logprobs, strict=True)) for top in chunk.top_logprobs
        ),
    )


def job_result(result: miner_pb2.JobResult) -> JobResult:
    receipt = result.receipt
    return JobResult(
        finish_reason=_FINISH_FROM_WIRE.get(result.finish_reason, MinerFinish.UNSPECIFIED),
        receipt=Receipt(
            job_id=receipt.job_id,
            request_sha256=receipt.request_sha256,
            output_sha256=receipt.output_sha256,
            prompt_tokens=receipt.prompt_tokens,
            completion_tokens=receipt.completion_tokens,
            weights_sha256=receipt.weights_sha256,
            engine=receipt.engine,
            dtype=receipt.dtype,
        ),
        signature=result.signature,
    )


def job_failure(failure: miner_pb2.JobFailure) -> JobFailure:
    return JobFailure(message=failure.message, retryable=failure.retryable)


def score_message(request: ScoreRequest) -> miner_pb2.ScoreJob:
    job = request.job
    return miner_pb2.ScoreJob(
        score_id=request.score_id,
        model=job.model,
        prompt_token_ids=job.prompt_token_ids,
        completion_token_ids=request.completion_token_ids,
        sampling=job_message(job).sampling,
        noise_job_id=job.job_id,
        claimed_top_logprobs=[
            miner_pb2.TopLogprobs(token_ids=ids) for ids in request.claimed_top_ids
        ],
    )


def score_result(result: miner_pb2.ScoreResult) -> ScoreResult:
    return ScoreResult(
        logprobs=tuple(result.logprobs),
        margins=tuple(result.margins),
        stop_margins=tuple(result.stop_margins),
        scored_top_logprobs=tuple(tuple(top.logprobs) for top in result.scored_top_logprobs),
        top_thresholds=tuple(result.top_thresholds),
        error=result.error,
    )


def witness_alarm(alarm: miner_pb2.WitnessAlarm) -> WitnessAlarm:
    return WitnessAlarm(
        message=alarm.message,
        old_checkpoint=alarm.old_checkpoint,
        new_checkpoint=alarm.new_checkpoint,
    )


def credit_receipt_message(receipt: CreditReceipt) -> miner_pb2.CoordinatorMessage:
    return miner_pb2.CoordinatorMessage(
        credit_receipt=miner_pb2.CreditReceipt(
            job_id=receipt.job_id,
            entry=receipt.entry,
            index=receipt.index,
            tree_size=receipt.tree_size,
            inclusion_proof=receipt.inclusion_proof,
            checkpoint=receipt.checkpoint,
        )
    )


def consistency_proof_message(proof: ConsistencyProof) -> miner_pb2.CoordinatorMessage:
    return miner_pb2.CoordinatorMessage(
        consistency_proof=miner_pb2.ConsistencyProof(
            old_size=proof.old_size,
            new_size=proof.new_size,
            hashes=proof.hashes,
            checkpoint=proof.checkpoint,
            error=proof.error,
        )
    )


def slash_notice_message(notice: SlashNotice) -> miner_pb2.CoordinatorMessage:
    return miner_pb2.CoordinatorMessage(
        slash_notice=miner_pb2.SlashNotice(
            job_id=notice.job_id, amount=notice.amount, reason=notice.reason, banned=notice.banned
        )
    )
