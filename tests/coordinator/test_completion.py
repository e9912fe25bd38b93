"""RunningCompletion: text deltas, what counts as delivered, and checking the miner's claims."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Sequence

import pytest

from coordinator.api import Usage
from coordinator.catalog import Catalog, CatalogEntry, request_cost
from coordinator.completion import MinerMisbehaved, RunningCompletion
from coordinator.dispatch.dispatcher import MinerRun
from coordinator.errors import InsufficientCreditsError, UpstreamError
from coordinator.gateway.session import MinerSession
from coordinator.gateway.wire import job_result
from coordinator.jobs import Job, TokenChunk
from proto import miner_pb2
from proto.signing import output_digest, receipt_message, request_digest
from tests.coordinator.core_fakes import (
    FINISH,
    MODEL,
    WAIT_S,
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
    stop_id,
    text_ids,
)

Tamper = Callable[[miner_pb2.Receipt], None]


@pytest.fixture
def session(catalog: Catalog, key: MinerKey) -> MinerSession:
    return make_session(catalog, key=key)


async def start(
    session: MinerSession,
    entry: CatalogEntry,
    job: Job,
    pieces: Sequence[Sequence[int]],
    *,
    logprobs: bool = False,
) -> RunningCompletion:
    """A completion whose miner has streamed ``pieces`` (the first one is the first token)."""
    channel = session.start_job(job)
    for piece in pieces:
        assert session.deliver(chunk(job.job_id, piece)) is None
    first = await channel.next_event(wait_s=WAIT_S)
    assert isinstance(first, TokenChunk)
    run = MinerRun(session, channel, first, token_timeout_s=WAIT_S)
    return RunningCompletion(
        completion_id="cmpl-test",
        created=0,
        entry=entry,
        prompt_tokens=len(job.prompt_token_ids),
        run=run,
        logprobs=logprobs,
    )


def finish(
    session: MinerSession,
    key: MinerKey,
    entry: CatalogEntry,
    job: Job,
    ids: Sequence[int],
    reason: miner_pb2.FinishReason.ValueType,
) -> miner_pb2.JobResult:
    """The miner's honest, signed result for ``ids``."""
    receipt = receipt_for(job, ids, weights_sha256=entry.weights_sha256)
    result = signed_result(job, receipt, reason, key=key)
    assert session.deliver(result_message(result)) is None
    return result


def cost(entry: CatalogEntry, job: Job, completion_tokens: int) -> int:
    return request_cost(
        entry, prompt_tokens=len(job.prompt_token_ids), completion_tokens=completion_tokens
    )


def assert_misbehaved(completion: RunningCompletion, session: MinerSession) -> None:
    assert completion.misbehaved
    assert completion.cost() == 0 and completion.usage.cost == 0
    assert completion.verified is None and completion.finish_reason is None
    assert session.closed_reason is not None
    assert session.closed_reason.startswith("protocol violation")
    assert outbox_messages(session)[-1] is None


# --- deltas and delivery ------------------------------------------------------------------------


async def test_deltas_spell_the_decoded_text_and_a_valid_receipt_is_verified(
    session: MinerSession, key: MinerKey, entry: CatalogEntry
) -> None:
    text = "Grüße, 世界! 5 €"  # multi-byte characters, split across chunks below
    ids = [*text_ids(entry, text), stop_id(entry)]
    sizes = [1, 2, 3, 1, 2]
    pieces: list[list[int]] = []
    at = 0
    while at < len(ids):
        size = sizes[len(pieces) % len(sizes)]
        pieces.append(ids[at : at + size])
        at += size
    job = make_job(entry, max_tokens=64)
    completion = await start(session, entry, job, pieces)
    result = finish(session, key, entry, job, ids, FINISH.FINISH_REASON_STOP)

    deltas = [delta async for delta in completion]
    assert "".join(delta.text for delta in deltas) == entry.tokenizer.decode(ids) == text
    assert "\ufffd" not in "".join(delta.text for delta in deltas)
    assert sum(delta.token_count for delta in deltas) == len(ids)
    assert completion.delivered_ids == ids
    assert completion.finish_reason == "stop"
    assert completion.usage == Usage(
        prompt_tokens=len(job.prompt_token_ids),
        completion_tokens=len(ids),
        cost=cost(entry, job, len(ids)),
    )
    verified = completion.verified
    assert verified is not None
    assert verified.receipt == job_result(result).receipt
    assert verified.signature == result.signature
    assert (
        verified.receipt_sha256
        == hashlib.sha256(receipt_message(result.receipt) + result.signature).digest()
    )
    assert not completion.misbehaved and session.closed_reason is None


@pytest.mark.parametrize("logprobs", [False, True])
async def test_deltas_carry_their_tokens_only_when_logprobs_were_asked_for(
    session: MinerSession, key: MinerKey, entry: CatalogEntry, logprobs: bool
) -> None:
    text = "one two three"
    ids = [*text_ids(entry, text), stop_id(entry)]
    job = make_job(entry, max_tokens=64)
    pieces = [ids[:3], ids[3:7], ids[7:]]
    completion = await start(session, entry, job, pieces, logprobs=logprobs)
    finish(session, key, entry, job, ids, FINISH.FINISH_REASON_STOP)

    deltas = [delta async for delta in completion]
    assert "".join(delta.text for delta in deltas) == text
    tokens = [token for delta in deltas for token in delta.tokens]
    if logprobs:
        assert [token.token_id for token in tokens] == ids
        assert [token.logprob for token in tokens] == completion.received_logprobs
        assert b"".join(token.raw for token in tokens[:-1]) == text.encode()
    else:
        assert tokens == []


async def test_a_failed_hold_ends_the_stream_and_bills_nothing(
    session: MinerSession, entry: CatalogEntry
) -> None:
    ids = text_ids(entry, "abcdef")
    job = make_job(entry, max_tokens=16)
    completion = await start(session, entry, job, [ids[:1]])
    hold: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    completion.hold = hold
    deltas = aiter(completion)
    assert (await anext(deltas)).text == "a"
    assert session.deliver(chunk(job.job_id, ids[1:2])) is None
    assert (await anext(deltas)).text == "b"  # the hold is still committing: tokens flow
    assert session.deliver(chunk(job.job_id, ids[2:])) is None
    hold.set_exception(InsufficientCreditsError("insufficient credits"))
    with pytest.raises(InsufficientCreditsError):
        await anext(deltas)
    await completion.aclose()

    assert completion.delivered_ids == ids[:2]  # delivered, yet nothing can be charged
    assert completion.unbillable and completion.cost() == 0
    assert completion.usage.cost == 0
    assert cancelled_ids(outbox_messages(session)) == [job.job_id]  # the miner stops


async def test_a_delta_is_delivered_once_the_consumer_comes_back(
    session: MinerSession, entry: CatalogEntry
) -> None:
    ids = text_ids(entry, "abcde")
    job = make_job(entry, max_tokens=16)
    completion = await start(session, entry, job, [ids[:1]])
    deltas = aiter(completion)
    assert (await anext(deltas)).text == "a"
    assert completion.delivered_ids == [] and completion.cost() == 0
    assert session.deliver(chunk(job.job_id, ids[1:2])) is None
    assert (await anext(deltas)).text == "b"
    assert completion.delivered_ids == ids[:1]
    assert session.deliver(chunk(job.job_id, ids[2:3])) is None
    assert (await anext(deltas)).text == "c"  # taken, never acknowledged: not delivered
    outbox_messages(session)
    await completion.aclose()

    assert completion.delivered_ids == ids[:2]
    assert completion.cost() == cost(entry, job, 2) > cost(entry, job, 1)
    assert completion.usage.completion_tokens == 2
    assert completion.finish_reason is None
    assert cancelled_ids(outbox_messages(session)) == [job.job_id]  # the miner stops


async def test_nothing_delivered_costs_nothing(session: MinerSession, entry: CatalogEntry) -> None:
    job = make_job(entry)
    completion = await start(session, entry, job, [text_ids(entry, "ab")])
    assert completion.cost() == 0
    assert (await anext(aiter(completion))).text == "ab"
    await completion.aclose()
    assert completion.cost() == 0 and completion.usage.completion_tokens == 0
    assert completion.usage.prompt_tokens == len(job.prompt_token_ids)


async def test_failure_mid_stream_bills_what_was_delivered(
    session: MinerSession, entry: CatalogEntry
) -> None:
    ids = text_ids(entry, "xyz")
    job = make_job(entry)
    completion = await start(session, entry, job, [[token] for token in ids])
    assert session.deliver(failure(job.job_id, "GPU fell off the bus")) is None
    taken = []
    with pytest.raises(UpstreamError, match="GPU fell off the bus") as raised:
        async for delta in completion:
            taken.append(delta.text)
    assert not isinstance(raised.value, MinerMisbehaved)
    assert "".join(taken) == "xyz"
    assert completion.delivered_ids == ids and completion.cost() == cost(entry, job, 3)
    assert not completion.misbehaved and session.closed_reason is None


# --- finish reasons -----------------------------------------------------------------------------


async def test_length_at_max_tokens(
    session: MinerSession, key: MinerKey, entry: CatalogEntry
) -> None:
    ids = text_ids(entry, "four")
    job = make_job(entry, max_tokens=len(ids))
    completion = await start(session, entry, job, [ids[:1], ids[1:]])
    finish(session, key, entry, job, ids, FINISH.FINISH_REASON_LENGTH)
    assert "".join([delta.text async for delta in completion]) == "four"
    assert completion.finish_reason == "length"
    assert completion.cost() == cost(entry, job, len(ids))


async def test_length_at_the_context_limit(
    session: MinerSession, key: MinerKey, entry: CatalogEntry
) -> None:
    prompt = text_ids(entry, "p") * (entry.context_length - 2)
    job = make_job(entry, max_tokens=10, prompt_ids=prompt)
    ids = text_ids(entry, "ok")
    completion = await start(session, entry, job, [ids])
    finish(session, key, entry, job, ids, FINISH.FINISH_REASON_LENGTH)
    assert [delta.text async for delta in completion] == ["ok"]
    assert completion.finish_reason == "length"


@pytest.mark.parametrize(
    ("text", "with_stop", "reason"),
    [
        ("no stop", False, FINISH.FINISH_REASON_STOP),
        ("short", False, FINISH.FINISH_REASON_LENGTH),
        ("short", True, FINISH.FINISH_REASON_LENGTH),
        ("whatever", True, FINISH.FINISH_REASON_CANCELLED),
        ("whatever", True, FINISH.FINISH_REASON_UNSPECIFIED),
    ],
    ids=[
        "stop-without-stop-token",
        "length-too-short",
        "stop-token-as-length",
        "cancelled",
        "unset",
    ],
)
async def test_finish_reason_contradicting_the_tokens_is_misbehaviour(
    session: MinerSession,
    key: MinerKey,
    entry: CatalogEntry,
    text: str,
    with_stop: bool,
    reason: miner_pb2.FinishReason.ValueType,
) -> None:
    ids = text_ids(entry, text) + ([stop_id(entry)] if with_stop else [])
    job = make_job(entry, max_tokens=32)
    completion = await start(session, entry, job, [ids])
    finish(session, key, entry, job, ids, reason)
    assert issubclass(MinerMisbehaved, UpstreamError)
    with pytest.raises(MinerMisbehaved, match="finish reason"):
        async for _ in completion:
            pass
    assert completion.delivered_ids == ids  # delivered, and still not paid
    assert_misbehaved(completion, session)


async def test_tokens_after_a_stop_token_are_misbehaviour(
    session: MinerSession, key: MinerKey, entry: CatalogEntry
) -> None:
    ids = [*text_ids(entry, "a"), stop_id(entry), *text_ids(entry, "bc")]
    job = make_job(entry, max_tokens=len(ids))
    channel = session.start_job(job)
    violations = [session.deliver(chunk(job.job_id, piece)) for piece in (ids[:2], ids[2:])]
    receipt = receipt_for(job, ids, weights_sha256=entry.weights_sha256)
    result = signed_result(job, receipt, FINISH.FINISH_REASON_LENGTH, key=key)
    violations.append(session.deliver(result_message(result)))
    first = await channel.next_event(wait_s=WAIT_S)
    assert isinstance(first, TokenChunk)
    completion = RunningCompletion(
        completion_id="cmpl-test",
        created=0,
        entry=entry,
        prompt_tokens=len(job.prompt_token_ids),
        run=MinerRun(session, channel, first, token_timeout_s=0.05),
    )
    try:
        async for _ in completion:
            pass
    except UpstreamError:
        pass
    assert any(violations) or completion.misbehaved


# --- receipts -----------------------------------------------------------------------------------


def _output(receipt: miner_pb2.Receipt) -> None:
    receipt.output_sha256 = output_digest([1, 2, 3])


def _completion_count(receipt: miner_pb2.Receipt) -> None:
    receipt.completion_tokens += 1


def _prompt_count(receipt: miner_pb2.Receipt) -> None:
    receipt.prompt_tokens -= 1


def _weights(receipt: miner_pb2.Receipt) -> None:
    receipt.weights_sha256 = hashlib.sha256(b"other weights").digest()


def _job_id(receipt: miner_pb2.Receipt) -> None:
    receipt.job_id = "job-someone-else"


def _request(receipt: miner_pb2.Receipt) -> None:
    receipt.request_sha256 = request_digest(miner_pb2.Job(job_id=receipt.job_id, model=MODEL))


@pytest.mark.parametrize(
    "tamper",
    [_output, _completion_count, _prompt_count, _weights, _job_id, _request],
    ids=["output-digest", "completion-count", "prompt-count", "weights", "job-id", "request"],
)
async def test_receipt_not_matching_the_job_is_misbehaviour(
    session: MinerSession, key: MinerKey, entry: CatalogEntry, tamper: Tamper
) -> None:
    ids = [*text_ids(entry, "hi"), stop_id(entry)]
    job = make_job(entry)
    completion = await start(session, entry, job, [ids])
    receipt = receipt_for(job, ids, weights_sha256=entry.weights_sha256)
    tamper(receipt)
    result = signed_result(job, receipt, FINISH.FINISH_REASON_STOP, key=key)  # validly signed
    assert session.deliver(result_message(result)) is None
    with pytest.raises(MinerMisbehaved, match="receipt does not match"):
        async for _ in completion:
            pass
    assert_misbehaved(completion, session)


def _foreign(signature: bytes, message: bytes) -> bytes:
    return MinerKey().sign(message)


def _flipped(signature: bytes, message: bytes) -> bytes:
    return bytes([signature[0] ^ 1]) + signature[1:]


def _garbage(signature: bytes, message: bytes) -> bytes:
    return b"\x00" * 10


@pytest.mark.parametrize(
    "forge", [_foreign, _flipped, _garbage], ids=["another-key", "flipped-bit", "garbage"]
)
async def test_bad_receipt_signature_is_misbehaviour(
    session: MinerSession,
    key: MinerKey,
    entry: CatalogEntry,
    forge: Callable[[bytes, bytes], bytes],
) -> None:
    ids = [*text_ids(entry, "hi"), stop_id(entry)]
    job = make_job(entry)
    completion = await start(session, entry, job, [ids])
    result = signed_result(
        job,
        receipt_for(job, ids, weights_sha256=entry.weights_sha256),
        FINISH.FINISH_REASON_STOP,
        key=key,
    )
    result.signature = forge(result.signature, receipt_message(result.receipt))
    assert session.deliver(result_message(result)) is None
    with pytest.raises(MinerMisbehaved, match="signature is invalid"):
        async for _ in completion:
            pass
    assert_misbehaved(completion, session)
