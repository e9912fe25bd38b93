"""Jobs over a real gRPC stream: token streaming, signed receipts, limits, cancellation, errors."""

from __future__ import annotations

import asyncio

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from miner.engine.base import GenerationError, ModelInfo
from proto import miner_pb2
from proto.signing import output_digest, receipt_message, request_digest

from .fake_gateway import (
    FakeEngine,
    FakeGateway,
    FakeSession,
    JobOutcome,
    fake_logprob,
    fake_tokens,
    make_job,
    running_miner,
    serve,
)


def check_receipt(
    result: miner_pb2.JobResult,
    job: miner_pb2.Job,
    tokens: list[int],
    *,
    info: ModelInfo,
    public_key: bytes,
) -> None:
    receipt = result.receipt
    assert receipt.job_id == job.job_id == result.job_id
    assert receipt.request_sha256 == request_digest(job)
    assert receipt.output_sha256 == output_digest(tokens)
    assert receipt.prompt_tokens == len(job.prompt_token_ids)
    assert receipt.completion_tokens == len(tokens)
    assert receipt.weights_sha256 == info.weights_sha256
    assert receipt.engine == info.engine
    assert receipt.dtype == info.dtype
    Ed25519PublicKey.from_public_bytes(public_key).verify(
        result.signature, receipt_message(receipt)
    )


async def test_tokens_stream_in_order_then_a_signed_length_result() -> None:
    gateway, engine = FakeGateway(), FakeEngine()
    job = make_job("job-1", prompt=(5, 9, 11, 2), max_tokens=6)
    async with serve(gateway) as port, running_miner(port, [engine]) as miner:
        session = await gateway.next_session()
        session.send_job(job)
        outcome = await session.job_outcome("job-1")
    expected = fake_tokens(job.prompt_token_ids, 6)
    # Tokens produced while the previous chunk still waited to be sent travel together.
    assert [token for chunk in outcome.chunks for token in chunk.token_ids] == expected
    assert [lp for chunk in outcome.chunks for lp in chunk.logprobs] == [
        fake_logprob(position) for position in range(6)
    ]
    assert all(len(chunk.token_ids) == len(chunk.logprobs) >= 1 for chunk in outcome.chunks)
    assert outcome.result is not None
    assert outcome.result.finish_reason == miner_pb2.FINISH_REASON_LENGTH
    check_receipt(
        outcome.result, job, expected, info=engine.info, public_key=miner.identity.public_key
    )


async def test_a_stop_token_ends_the_job_with_finish_stop() -> None:
    gateway, engine = FakeGateway(), FakeEngine()
    stop_token = fake_tokens((1, 2, 3), 10)[3]
    job = make_job("job-stop", prompt=(1, 2, 3), max_tokens=10, stop=(999_999, stop_token))
    async with serve(gateway) as port, running_miner(port, [engine]) as miner:
        session = await gateway.next_session()
        session.send_job(job)
        outcome = await session.job_outcome("job-stop")
    assert outcome.token_ids == fake_tokens((1, 2, 3), 4)
    assert outcome.result is not None
    assert outcome.result.finish_reason == miner_pb2.FINISH_REASON_STOP
    check_receipt(
        outcome.result,
        job,
        outcome.token_ids,
        info=engine.info,
        public_key=miner.identity.public_key,
    )


async def test_tokens_are_sent_while_the_job_is_still_generating() -> None:
    gateway, engine = FakeGateway(), FakeEngine(token_delay_s=0.05)
    async with serve(gateway) as port, running_miner(port, [engine], drain_timeout_s=0):
        session = await gateway.next_session()
        session.send_job(make_job("slow", max_tokens=20))
        await session.next("chunk")
        assert engine.produced["slow"] < 20
        assert "slow" not in engine.closed


async def test_jobs_go_to_the_engine_serving_their_model() -> None:
    gateway = FakeGateway()
    engine_a, engine_b = FakeEngine("model-a"), FakeEngine("model-b")
    async with serve(gateway) as port, running_miner(port, [engine_a, engine_b], max_concurrency=2):
        session = await gateway.next_session()
        session.send_job(make_job("for-b", model="model-b", max_tokens=3))
        outcome = await session.job_outcome("for-b")
    assert outcome.result is not None
    assert outcome.result.receipt.weights_sha256 == engine_b.info.weights_sha256
    assert set(engine_b.produced) == {"for-b"} and not engine_a.produced


async def test_an_unknown_model_gets_a_retryable_failure() -> None:
    gateway, engine = FakeGateway(), FakeEngine()
    async with serve(gateway) as port, running_miner(port, [engine]):
        session = await gateway.next_session()
        session.send_job(make_job("job-x", model="no-such-model"))
        outcome = await session.job_outcome("job-x")
    assert outcome.failure is not None and outcome.failure.retryable
    assert "no-such-model" in outcome.failure.message
    assert not outcome.chunks and not engine.produced


async def test_jobs_beyond_max_concurrency_are_refused_as_at_capacity() -> None:
    gateway, engine = FakeGateway(), FakeEngine(token_delay_s=0.02)
    async with serve(gateway) as port, running_miner(port, [engine], max_concurrency=2):
        session = await gateway.next_session()
        for job_id in ("a", "b", "c"):
            session.send_job(make_job(job_id, max_tokens=10))
        failure = (await session.next("failure")).failure
        assert failure.job_id == "c"
        assert failure.retryable and failure.message == "at capacity"
        results = {(await session.next("result")).result.job_id for _ in range(2)}
        assert results == {"a", "b"}
        # Capacity is given back as jobs end.
        session.send_job(make_job("d", max_tokens=2))
        outcome = await session.job_outcome("d")
        assert outcome.result is not None
    assert "c" not in engine.produced


async def test_cancel_stops_generation_and_returns_a_cancelled_receipt() -> None:
    gateway, engine = FakeGateway(), FakeEngine(token_delay_s=0.02)
    job = make_job("long", max_tokens=10_000)
    async with serve(gateway) as port, running_miner(port, [engine]) as miner:
        session = await gateway.next_session()
        session.send_job(job)
        read = 0
        for _ in range(3):
            read += len((await session.next("chunk")).chunk.token_ids)
        session.send_cancel("long")
        outcome = await session.job_outcome("long")
        assert outcome.result is not None
        produced = engine.produced["long"]
        await asyncio.sleep(0.1)  # several token delays: a live generator would have moved on
        assert engine.produced["long"] == produced
        assert "long" in engine.closed
    # The receipt covers every token produced: the three chunks read above plus the rest.
    tokens = fake_tokens(job.prompt_token_ids, produced)
    assert outcome.token_ids == tokens[read:]
    assert outcome.result.finish_reason == miner_pb2.FINISH_REASON_CANCELLED
    assert sum(len(chunk.token_ids) for chunk in outcome.chunks) == len(outcome.token_ids)
    check_receipt(
        outcome.result, job, tokens, info=engine.info, public_key=miner.identity.public_key
    )


async def test_cancel_for_an_unknown_job_is_ignored() -> None:
    gateway = FakeGateway()
    async with serve(gateway) as port, running_miner(port, [FakeEngine()]):
        session = await gateway.next_session()
        session.send_cancel("never-sent")
        session.send_job(make_job("after", max_tokens=2))
        outcome = await session.job_outcome("after")
    assert outcome.result is not None
    assert outcome.result.finish_reason == miner_pb2.FINISH_REASON_LENGTH
    assert not session.of_kind("failure")


async def collect(session: FakeSession, job: miner_pb2.Job) -> JobOutcome:
    session.send_job(job)
    return await session.job_outcome(job.job_id)


async def test_a_generation_error_is_a_final_failure() -> None:
    gateway = FakeGateway()
    engine = FakeEngine(error=GenerationError("prompt longer than the context (4097 > 4096)"))
    async with serve(gateway) as port, running_miner(port, [engine]):
        outcome = await collect(await gateway.next_session(), make_job("too-long"))
    assert outcome.failure is not None
    assert not outcome.failure.retryable
    assert outcome.failure.message == "prompt longer than the context (4097 > 4096)"


@pytest.mark.parametrize("error_after", [0, 2])
async def test_an_engine_crash_is_retryable_only_before_the_first_token(
    error_after: int, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = FakeGateway()
    engine = FakeEngine(error=RuntimeError("CUDA out of memory"), error_after=error_after)
    async with serve(gateway) as port, running_miner(port, [engine]):
        session = await gateway.next_session()
        outcome = await collect(session, make_job("crash"))
        # The miner keeps serving after a crashed job (this one ends before the fake's error).
        second = await collect(session, make_job("next", max_tokens=error_after))
    assert sum(len(chunk.token_ids) for chunk in outcome.chunks) == error_after
    assert outcome.failure is not None
    assert outcome.failure.retryable == (error_after == 0)
    assert "CUDA out of memory" in outcome.failure.message
    assert any(record.exc_info for record in caplog.records), "crashes are logged with a traceback"
    assert second.result is not None
