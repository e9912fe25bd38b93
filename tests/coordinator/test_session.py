"""MinerSession: what a welcomed miner may send, slot accounting, abandoning and closing."""

from __future__ import annotations

import time

import pytest

from coordinator.catalog import Catalog, CatalogEntry
from coordinator.gateway.session import MinerSession
from coordinator.jobs import Job, JobFailure, JobResult, MinerLost, TokenChunk
from coordinator.worker import JobStream
from proto import miner_pb2
from proto.limits import MAX_TOKENS_PER_CHUNK
from tests.coordinator.core_fakes import (
    FINISH,
    MODEL,
    MinerKey,
    cancelled_ids,
    chunk,
    failure,
    make_job,
    make_session,
    outbox_messages,
    receipt_for,
    result_message,
    signed_result,
)

QUIET_S = 0.02  # how long a channel is watched to show that nothing arrived


@pytest.fixture
def session(catalog: Catalog, key: MinerKey) -> MinerSession:
    return make_session(catalog, key=key, max_concurrency=2)


def result_for(entry: CatalogEntry, job: Job, key: MinerKey) -> miner_pb2.MinerMessage:
    receipt = receipt_for(job, [], weights_sha256=entry.weights_sha256)
    return result_message(signed_result(job, receipt, FINISH.FINISH_REASON_STOP, key=key))


async def assert_no_event(channel: JobStream) -> None:
    event = await channel.next_event(wait_s=QUIET_S)
    assert isinstance(event, MinerLost) and "no answer" in event.reason


# --- malformed messages -------------------------------------------------------------------------


def test_chunk_for_unknown_job_is_a_violation(session: MinerSession) -> None:
    violation = session.deliver(chunk("job-nobody-started", [1]))
    assert violation is not None and "unknown job" in violation
    assert "job-nobody-started" in violation


async def test_token_ids_must_be_inside_the_vocabulary(
    session: MinerSession, entry: CatalogEntry
) -> None:
    vocab_size = entry.tokenizer.vocab_size
    last = session.start_job(make_job(entry))  # the last id may be a stop token: its own job
    assert session.deliver(chunk(last.job.job_id, [vocab_size - 1])) is None
    channel = session.start_job(make_job(entry))
    violation = session.deliver(chunk(channel.job.job_id, [5, vocab_size]))
    assert violation is not None and "vocabulary" in violation and str(vocab_size) in violation
    event = await last.next_event(wait_s=QUIET_S)
    assert isinstance(event, TokenChunk) and list(event.token_ids) == [vocab_size - 1]
    await assert_no_event(channel)  # the offending chunk never reaches the job


@pytest.mark.parametrize(
    ("token_ids", "logprobs"),
    [([1, 2], [-0.1]), ([1], [-0.1, -0.2]), ([], []), ([], [-0.1])],
    ids=["fewer-logprobs", "more-logprobs", "empty", "logprobs-only"],
)
def test_malformed_chunk_is_a_violation(
    session: MinerSession, entry: CatalogEntry, token_ids: list[int], logprobs: list[float]
) -> None:
    job = session.start_job(make_job(entry)).job
    message = miner_pb2.MinerMessage(
        chunk=miner_pb2.TokenChunk(job_id=job.job_id, token_ids=token_ids, logprobs=logprobs)
    )
    violation = session.deliver(message)
    assert violation is not None and "mismatched or empty" in violation


async def test_more_than_max_tokens_is_a_violation(
    session: MinerSession, entry: CatalogEntry
) -> None:
    channel = session.start_job(make_job(entry, max_tokens=3))
    job_id = channel.job.job_id
    assert session.deliver(chunk(job_id, [1, 2])) is None
    assert session.deliver(chunk(job_id, [3])) is None  # exactly max_tokens is fine
    violation = session.deliver(chunk(job_id, [4]))
    assert violation is not None and "max_tokens=3" in violation
    assert channel.tokens_received == 4


def test_max_tokens_counts_across_chunks_per_job(
    session: MinerSession, entry: CatalogEntry
) -> None:
    first = session.start_job(make_job(entry, max_tokens=2)).job.job_id
    second = session.start_job(make_job(entry, max_tokens=2)).job.job_id
    for job_id in (first, second, first, second):
        assert session.deliver(chunk(job_id, [7])) is None
    assert session.deliver(chunk(second, [7])) is not None


def test_oversize_chunk_is_a_violation(session: MinerSession, entry: CatalogEntry) -> None:
    job_id = session.start_job(make_job(entry, max_tokens=4 * MAX_TOKENS_PER_CHUNK)).job.job_id
    assert session.deliver(chunk(job_id, [1] * MAX_TOKENS_PER_CHUNK)) is None
    assert session.deliver(chunk(job_id, [1] * (MAX_TOKENS_PER_CHUNK + 1))) is not None


@pytest.mark.parametrize("kind", ["result", "failure"])
def test_end_of_unknown_job_is_a_violation(
    session: MinerSession, entry: CatalogEntry, key: MinerKey, kind: str
) -> None:
    job = make_job(entry)  # never started on this session
    message = result_for(entry, job, key) if kind == "result" else failure(job.job_id, "oom")
    violation = session.deliver(message)
    assert violation is not None and kind in violation and job.job_id in violation


@pytest.mark.parametrize(
    "message",
    [
        miner_pb2.MinerMessage(),
        miner_pb2.MinerMessage(hello=miner_pb2.Hello()),
        miner_pb2.MinerMessage(answer=miner_pb2.ChallengeAnswer(signature=b"x")),
    ],
    ids=["empty", "hello", "answer"],
)
def test_handshake_messages_after_welcome_are_violations(
    session: MinerSession, message: miner_pb2.MinerMessage
) -> None:
    violation = session.deliver(message)
    assert violation is not None and "unexpected" in violation


# --- liveness and draining ----------------------------------------------------------------------


def test_heartbeat_updates_last_seen(session: MinerSession) -> None:
    session.last_seen = 0.0
    before = time.monotonic()
    heartbeat = miner_pb2.MinerMessage(heartbeat=miner_pb2.Heartbeat(active_jobs=0))
    assert session.deliver(heartbeat) is None
    assert before <= session.last_seen <= time.monotonic()


def test_drain_stops_new_jobs(session: MinerSession) -> None:
    assert session.accepts(MODEL)
    assert not session.accepts("some-other-model")
    drain = miner_pb2.MinerMessage(drain=miner_pb2.Drain(reason="shutting down"))
    assert session.deliver(drain) is None
    assert session.draining
    assert not session.accepts(MODEL)
    assert session.free_slots == 2  # draining is not busy: the slots are simply not offered


# --- slots --------------------------------------------------------------------------------------


async def test_slots_are_taken_by_jobs_and_freed_by_results(
    session: MinerSession, entry: CatalogEntry, key: MinerKey
) -> None:
    assert (session.free_slots, session.active_jobs) == (2, 0)
    first = session.start_job(make_job(entry))
    second = session.start_job(make_job(entry))
    assert (session.free_slots, session.active_jobs) == (0, 2)
    assert not session.accepts(MODEL)
    sent = outbox_messages(session)
    assert [m.job.job_id for m in sent if m is not None] == [first.job.job_id, second.job.job_id]

    assert session.deliver(chunk(first.job.job_id, [10, 11])) is None
    assert session.deliver(result_for(entry, first.job, key)) is None
    assert (session.free_slots, session.active_jobs) == (1, 1)
    assert session.accepts(MODEL)
    assert first.finished
    tokens = await first.next_event(wait_s=QUIET_S)
    assert isinstance(tokens, TokenChunk) and list(tokens.token_ids) == [10, 11]
    assert isinstance(await first.next_event(wait_s=QUIET_S), JobResult)

    assert session.deliver(failure(second.job.job_id, "out of memory")) is None
    assert session.free_slots == 2
    failed = await second.next_event(wait_s=QUIET_S)
    assert isinstance(failed, JobFailure) and failed.message == "out of memory"
    # The job is over: anything more for it is a violation.
    assert session.deliver(chunk(first.job.job_id, [1])) is not None


def test_cancel_job_asks_the_miner_but_keeps_the_slot(
    session: MinerSession, entry: CatalogEntry, key: MinerKey
) -> None:
    job = session.start_job(make_job(entry)).job
    outbox_messages(session)
    session.cancel_job(job.job_id)
    assert cancelled_ids(outbox_messages(session)) == [job.job_id]
    assert session.free_slots == 1  # freed only once the miner answers
    assert session.deliver(result_for(entry, job, key)) is None
    assert session.free_slots == 2
    session.cancel_job(job.job_id)  # finished: nothing to cancel
    assert outbox_messages(session) == []


async def test_abandon_frees_the_slot_and_drops_late_messages(
    session: MinerSession, entry: CatalogEntry, key: MinerKey
) -> None:
    channel = session.start_job(make_job(entry))
    job_id = channel.job.job_id
    outbox_messages(session)
    session.abandon_job(job_id)
    assert session.free_slots == 2
    assert cancelled_ids(outbox_messages(session)) == [job_id]
    # The miner had not seen the cancel yet: its tokens and its result are silently dropped.
    assert session.deliver(chunk(job_id, [1, 2])) is None
    assert session.deliver(result_for(entry, channel.job, key)) is None
    await assert_no_event(channel)
    assert session.free_slots == 2


def test_abandoned_job_may_also_end_in_failure(session: MinerSession, entry: CatalogEntry) -> None:
    job_id = session.start_job(make_job(entry)).job.job_id
    session.abandon_job(job_id)
    assert session.deliver(failure(job_id, "cancelled")) is None


# --- closing ------------------------------------------------------------------------------------


async def test_close_tells_every_job_and_ends_the_outbox(
    session: MinerSession, entry: CatalogEntry
) -> None:
    channels = [session.start_job(make_job(entry)) for _ in range(2)]
    session.close("evicted: silent")
    for channel in channels:
        event = await channel.next_event(wait_s=QUIET_S)
        assert event == MinerLost("evicted: silent")
    assert outbox_messages(session)[-1] is None
    assert session.closed_reason == "evicted: silent"
    assert session.free_slots == 2 and not session.accepts(MODEL)

    session.close("a second reason")  # idempotent: no second end marker, first reason kept
    assert outbox_messages(session) == []
    assert session.closed_reason == "evicted: silent"
    for channel in channels:
        await assert_no_event(channel)
    session.cancel_job(channels[0].job.job_id)
    assert outbox_messages(session) == []  # nothing is sent on a closed session


async def test_next_event_times_out_as_miner_lost(entry: CatalogEntry) -> None:
    channel = JobStream(make_job(entry))
    started = time.monotonic()
    event = await channel.next_event(wait_s=0.05)
    assert isinstance(event, MinerLost) and "0.05 s" in event.reason
    assert time.monotonic() - started >= 0.04
