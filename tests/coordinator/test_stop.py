"""Stop strings: the matcher alone, and a running completion cut at one and settled."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator import completion as completion_module
from coordinator.api import TextDelta
from coordinator.catalog import Catalog, CatalogEntry, request_cost
from coordinator.completion import MinerMisbehaved, RunningCompletion
from coordinator.dispatch.dispatcher import MinerRun
from coordinator.gateway.session import MinerSession
from coordinator.jobs import Job, TokenChunk
from coordinator.text.stop import StopMatcher
from tests.coordinator.core_fakes import (
    FINISH,
    MODEL,
    WAIT_S,
    MinerKey,
    cancelled_ids,
    chunk,
    make_job,
    make_session,
    next_outbound,
    outbox_messages,
    receipt_for,
    result_message,
    signed_result,
    text_ids,
)

# A small alphabet makes stop strings, their prefixes and overlaps common in random text.
small_text = st.text(alphabet="abc\n€", max_size=12)
stop_lists = st.lists(st.text(alphabet="abc\n€", min_size=1, max_size=4), min_size=1, max_size=4)


def first_match(text: str, stops: list[str]) -> int | None:
    found = [at for stop in stops if (at := text.find(stop)) >= 0]
    return min(found) if found else None


@given(stops=stop_lists, pieces=st.lists(small_text, max_size=12))
def test_output_is_the_input_cut_before_the_first_stop_string(
    stops: list[str], pieces: list[str]
) -> None:
    whole = "".join(pieces)
    cut = first_match(whole, stops)
    matcher = StopMatcher(stops)
    emitted = ""
    received = ""
    matched = False
    for piece in pieces:
        received += piece
        emit, matched = matcher.push(piece)
        emitted += emit
        # Nothing emitted so far reaches into a stop string, even one completed later.
        assert whole.startswith(emitted)
        assert cut is None or len(emitted) <= cut
        if matched:
            break
        # What is held back is exactly the rest of the input, and short.
        assert emitted + matcher.held == received
        assert len(matcher.held) <= max(map(len, stops)) - 1
        # Only a tail that could still become a stop string is held.
        assert not matcher.held or any(stop.startswith(matcher.held) for stop in stops)
    emitted += matcher.flush()
    assert matched == (cut is not None)
    assert emitted == (whole if cut is None else whole[:cut])


@given(pieces=st.lists(small_text, max_size=8))
def test_without_stop_strings_text_passes_through(pieces: list[str]) -> None:
    matcher = StopMatcher(())
    assert [matcher.push(piece) for piece in pieces] == [(piece, False) for piece in pieces]
    assert matcher.flush() == ""


def test_a_stop_string_split_across_pieces_is_held_then_cut() -> None:
    matcher = StopMatcher(["\n\nUser:", "###"])
    assert matcher.push("Hello\n") == ("Hello", False)
    assert matcher.push("\nUs") == ("", False)
    assert matcher.held == "\n\nUs"
    assert matcher.push("er: hi") == ("", True)
    assert matcher.push("more") == ("", True)
    assert matcher.flush() == ""


def test_a_false_start_is_released_and_the_tail_flushed() -> None:
    matcher = StopMatcher(["abc"])
    assert matcher.push("xab") == ("x", False)
    assert matcher.push("d a") == ("abd ", False)
    assert matcher.flush() == "a"


def test_the_earliest_stop_string_wins() -> None:
    matcher = StopMatcher(["world", "lo w"])
    assert matcher.push("hello world") == ("hel", True)


def test_empty_stop_strings_are_refused() -> None:
    with pytest.raises(ValueError):
        StopMatcher(["a", ""])


# --- a completion cut at a stop string ----------------------------------------------------------


@pytest.fixture
def session(catalog: Catalog, key: MinerKey) -> MinerSession:
    return make_session(catalog, key=key)


async def start(
    session: MinerSession, entry: CatalogEntry, job: Job, ids: list[int], stop: str
) -> RunningCompletion:
    """A completion with stop string ``stop`` whose miner has streamed ``ids``, one per chunk."""
    channel = session.start_job(job)
    for token in ids:
        assert session.deliver(chunk(job.job_id, [token])) is None
    first = await channel.next_event(wait_s=WAIT_S)
    assert isinstance(first, TokenChunk)
    return RunningCompletion(
        completion_id="cmpl-test",
        created=0,
        entry=entry,
        prompt_tokens=len(job.prompt_token_ids),
        run=MinerRun(session, channel, first, token_timeout_s=WAIT_S),
        stop=(stop,),
        logprobs=True,
    )


def cancelled_result(
    session: MinerSession, key: MinerKey, entry: CatalogEntry, job: Job, ids: list[int]
) -> None:
    receipt = receipt_for(job, ids, weights_sha256=entry.weights_sha256)
    result = signed_result(job, receipt, FINISH.FINISH_REASON_CANCELLED, key=key)
    assert session.deliver(result_message(result)) is None


def billed(entry: CatalogEntry, job: Job, tokens: int) -> int:
    return request_cost(entry, prompt_tokens=len(job.prompt_token_ids), completion_tokens=tokens)


async def test_cut_at_a_stop_string_bills_through_the_completing_token(
    session: MinerSession, key: MinerKey, catalog: Catalog
) -> None:
    entry = catalog.get(MODEL)
    text = "one two, three"
    ids = text_ids(entry, text)
    job = make_job(entry, max_tokens=64)
    completion = await start(session, entry, job, ids, ", th")
    outbox_messages(session)  # the job itself

    async def miner() -> None:
        # The miner ran on past the stop string before the cancel reached it.
        message = await next_outbound(session)
        assert message.WhichOneof("body") == "cancel" and message.cancel.job_id == job.job_id
        cancelled_result(session, key, entry, job, ids)

    async def consume() -> list[TextDelta]:
        return [delta async for delta in completion]

    _, deltas = await asyncio.gather(miner(), consume())
    assert "".join(delta.text for delta in deltas) == "one two"
    delivered = completion.delivered_ids
    assert 0 < len(delivered) < len(ids) and delivered == ids[: len(delivered)]
    # The last billed token completed the stop string; the one before it did not.
    assert ", th" in entry.tokenizer.decode(delivered)
    assert ", th" not in entry.tokenizer.decode(delivered[:-1])
    assert [token.token_id for delta in deltas for token in delta.tokens] == delivered
    assert completion.finish_reason == "stop" and completion.stopped
    assert completion.verified is not None and completion.verified.finish_reason == "stop"
    assert completion.verified.receipt.completion_tokens == len(ids)
    assert completion.cost() == billed(entry, job, len(delivered))
    assert not completion.misbehaved and session.closed_reason is None


async def test_without_the_miners_answer_delivered_tokens_are_billed(
    session: MinerSession, entry_timeout: None, catalog: Catalog
) -> None:
    entry = catalog.get(MODEL)
    ids = text_ids(entry, "abcdef")
    job = make_job(entry, max_tokens=64)
    completion = await start(session, entry, job, ids, "cd")
    assert "".join([delta.text async for delta in completion]) == "ab"
    assert completion.finish_reason == "stop" and completion.verified is None
    assert completion.cost() == billed(entry, job, len(completion.delivered_ids)) > 0
    assert cancelled_ids(outbox_messages(session)) == [job.job_id]


async def test_a_false_receipt_after_a_stop_is_misbehaviour(
    session: MinerSession, key: MinerKey, catalog: Catalog
) -> None:
    entry = catalog.get(MODEL)
    ids = text_ids(entry, "abcdef")
    job = make_job(entry, max_tokens=64)
    completion = await start(session, entry, job, ids, "cd")
    cancelled_result(session, key, entry, job, ids[:-1])  # claims fewer tokens than it streamed
    with pytest.raises(MinerMisbehaved):
        async for _ in completion:
            pass
    assert completion.misbehaved and completion.cost() == 0


async def test_a_stop_string_in_the_final_flush_still_stops(
    session: MinerSession, key: MinerKey, catalog: Catalog
) -> None:
    entry = catalog.get(MODEL)
    ids = text_ids(entry, "xyz")
    job = make_job(entry, max_tokens=len(ids))
    completion = await start(session, entry, job, ids, "yz!")
    receipt = receipt_for(job, ids, weights_sha256=entry.weights_sha256)
    result = signed_result(job, receipt, FINISH.FINISH_REASON_LENGTH, key=key)
    assert session.deliver(result_message(result)) is None
    # "yz" was held back as a possible start of "yz!"; it goes out at the end.
    assert "".join([delta.text async for delta in completion]) == "xyz"
    assert completion.finish_reason == "length"
    assert completion.cost() == billed(entry, job, len(ids))


@pytest.fixture
def entry_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(completion_module, "STOP_RESULT_WAIT_S", 0.05)
