"""Spot checks over a real gRPC stream: ScoreJob answered by ScoreResult, SlashNotice recorded."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from ledger.money import format_credits
from miner.earnings import read_earnings
from miner.engine.base import GenerationError
from miner.score_jobs import MAX_SCORES_IN_FLIGHT
from miner.slashes import SLASHES_FILE
from proto import miner_pb2

from .fake_gateway import (
    WAIT_S,
    FakeEngine,
    FakeGateway,
    fake_logprob,
    fake_tokens,
    make_job,
    running_miner,
    serve,
)

PROMPT = (4, 8, 15, 16)


def make_score_job(
    score_id: str,
    *,
    model: str = "fake-model",
    prompt: Sequence[int] = (1, 2, 3),
    completion: Sequence[int] = (),
    noise_job_id: str = "checked-job",
    stop: Sequence[int] = (),
) -> miner_pb2.ScoreJob:
    """A ScoreJob; ``make_job``'s sampling parameters, as the checked job would have had."""
    sampling = make_job(noise_job_id, max_tokens=max(1, len(completion)), stop=stop).sampling
    return miner_pb2.ScoreJob(
        score_id=score_id,
        model=model,
        prompt_token_ids=list(prompt),
        completion_token_ids=list(completion),
        sampling=sampling,
        noise_job_id=noise_job_id,
    )


async def eventually(condition: Callable[[], bool]) -> None:
    """Waits until ``condition()`` holds; what it watches (files, logs, the fake) has no event."""
    async with asyncio.timeout(WAIT_S):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_a_score_job_gets_a_logprob_and_a_margin_per_completion_token() -> None:
    gateway, engine = FakeGateway(), FakeEngine()
    completion = fake_tokens(PROMPT, 6)
    completion[2] = (completion[2] + 1) % 1000  # a substituted token
    async with serve(gateway) as port, running_miner(port, [engine]):
        session = await gateway.next_session()
        session.send_score(make_score_job("s-1", prompt=PROMPT, completion=completion))
        result = await session.score_result("s-1")
    assert result.error == ""
    assert list(result.logprobs) == [fake_logprob(position) for position in range(6)]
    assert list(result.margins) == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]


async def test_a_score_result_carries_the_stop_margins_of_the_engine() -> None:
    gateway, engine, old = FakeGateway(), FakeEngine(), FakeEngine(score_stop_margins=False)
    honest = fake_tokens(PROMPT, 6)
    padded = [*honest[:3], (honest[3] + 1) % 1000, *honest[4:]]  # went on past a stop
    job = make_score_job("s-stop", prompt=PROMPT, completion=padded, stop=[honest[3]])
    async with serve(gateway) as port:
        async with running_miner(port, [engine]):
            session = await gateway.next_session()
            session.send_score(job)
            result = await session.score_result("s-stop")
        async with running_miner(port, [old]):
            session = await gateway.next_session()
            session.send_score(job)
            old_result = await session.score_result("s-stop")
    assert result.error == ""
    assert list(result.stop_margins) == [-1.0, -1.0, -1.0, 1.0, -1.0, -1.0]
    # An engine that predates stop margins sends none, and the rest as before.
    assert old_result.error == "" and not old_result.stop_margins
    assert list(old_result.margins) == list(result.margins)


@pytest.mark.parametrize(("tokens", "stop_margins"), [(21_000, True), (22_000, False)])
async def test_stop_margins_are_left_out_where_they_would_not_fit_in_a_message(
    tokens: int, stop_margins: bool
) -> None:
    """Three floats a token pass the miner's message limit past about 21,800 tokens."""
    gateway, engine = FakeGateway(), FakeEngine()
    completion = fake_tokens(PROMPT, tokens)
    async with serve(gateway) as port, running_miner(port, [engine]):
        session = await gateway.next_session()
        session.send_score(make_score_job("s-long", prompt=PROMPT, completion=completion))
        result = await session.score_result("s-long")
    assert result.error == ""
    assert len(result.logprobs) == len(result.margins) == tokens
    assert len(result.stop_margins) == (tokens if stop_margins else 0)


async def test_a_score_too_long_for_one_message_is_answered_with_an_error() -> None:
    gateway, engine = FakeGateway(), FakeEngine()
    completion = fake_tokens(PROMPT, 33_000)  # two floats a token: past the limit too
    async with serve(gateway) as port, running_miner(port, [engine]):
        session = await gateway.next_session()
        session.send_score(make_score_job("s-huge", prompt=PROMPT, completion=completion))
        result = await session.score_result("s-huge")
        session.send_job(make_job("after", max_tokens=2))
        outcome = await session.job_outcome("after")
    assert "too many tokens" in result.error and not result.margins
    assert outcome.result is not None and len(gateway.sessions) == 1, "the session survived"


async def test_an_unknown_model_gets_a_score_result_with_an_error() -> None:
    gateway, engine = FakeGateway(), FakeEngine()
    async with serve(gateway) as port, running_miner(port, [engine]):
        session = await gateway.next_session()
        session.send_score(make_score_job("s-x", model="no-such-model", completion=(1, 2)))
        result = await session.score_result("s-x")
    assert "no-such-model" in result.error
    assert not result.logprobs and not result.margins
    assert not engine.scoring and not engine.scores_cancelled


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (GenerationError("completion token ids must be in [0, 1000)"), "completion token ids"),
        (RuntimeError("CUDA out of memory"), "miner error: CUDA out of memory"),
    ],
)
async def test_a_failed_score_is_answered_with_its_error_and_the_session_goes_on(
    error: Exception, expected: str
) -> None:
    gateway, engine = FakeGateway(), FakeEngine(score_error=error)
    async with serve(gateway) as port, running_miner(port, [engine]):
        session = await gateway.next_session()
        session.send_score(make_score_job("s-bad", completion=(1, 2, 3)))
        result = await session.score_result("s-bad")
        session.send_job(make_job("after", max_tokens=2))
        outcome = await session.job_outcome("after")
    assert expected in result.error
    assert not result.logprobs and not result.margins
    assert outcome.result is not None
    assert len(gateway.sessions) == 1, "the session survived"


async def test_scoring_needs_no_job_slot() -> None:
    gateway, engine = FakeGateway(), FakeEngine(token_delay_s=0.05)
    config = {"max_concurrency": 1, "drain_timeout_s": 0}
    async with serve(gateway) as port, running_miner(port, [engine], **config):
        session = await gateway.next_session()
        session.send_job(make_job("busy", max_tokens=10_000))
        await session.next("chunk")
        session.send_score(make_score_job("s-busy", prompt=PROMPT, completion=(1, 2)))
        result = await session.score_result("s-busy")
        assert result.error == "" and len(result.margins) == 2
        assert "busy" not in engine.closed, "the job was still running"


async def test_too_many_score_jobs_in_flight_are_refused() -> None:
    gateway, engine = FakeGateway(), FakeEngine(score_delay_s=WAIT_S * 10)
    async with serve(gateway) as port, running_miner(port, [engine], drain_timeout_s=0):
        session = await gateway.next_session()
        for number in range(MAX_SCORES_IN_FLIGHT + 1):
            session.send_score(make_score_job(f"s-{number}", noise_job_id=f"job-{number}"))
        refused = await session.score_result(f"s-{MAX_SCORES_IN_FLIGHT}")
        await eventually(lambda: len(engine.scoring) == MAX_SCORES_IN_FLIGHT)
    assert "too many" in refused.error


async def test_score_jobs_are_cancelled_when_the_connection_ends() -> None:
    gateway, engine = FakeGateway(), FakeEngine(score_delay_s=WAIT_S * 10)
    async with serve(gateway) as port, running_miner(port, [engine], drain_timeout_s=0):
        first = await gateway.next_session()
        first.send_score(make_score_job("s-long", noise_job_id="long"))
        await eventually(lambda: "long" in engine.scoring)
        first.close()
        await eventually(lambda: "long" in engine.scores_cancelled)
        second = await gateway.next_session()  # the miner reconnected and serves on
        second.send_score(make_score_job("s-next", completion=(1,), noise_job_id="next"))
        with pytest.raises(TimeoutError):  # the fake's delay: proof that it is still scoring
            await second.score_result("s-next", within_s=0.2)
    assert not first.of_kind("score_result"), "nobody was left to answer"


async def test_a_score_job_while_draining_is_refused() -> None:
    gateway, engine = FakeGateway(), FakeEngine(token_delay_s=0.05)
    async with serve(gateway) as port, running_miner(port, [engine]) as miner:
        session = await gateway.next_session()
        session.send_job(make_job("finishing", max_tokens=20))
        await session.next("chunk")
        miner.daemon.shutdown()
        await session.next("drain")
        session.send_score(make_score_job("s-late", completion=(1, 2)))
        result = await session.score_result("s-late")
    assert result.error == "draining"


async def test_score_jobs_unfinished_at_the_drain_timeout_are_answered_with_an_error() -> None:
    gateway, engine = FakeGateway(), FakeEngine(score_delay_s=WAIT_S * 10)
    async with serve(gateway) as port, running_miner(port, [engine], drain_timeout_s=0.05) as miner:
        session = await gateway.next_session()
        session.send_score(make_score_job("s-slow", completion=(1, 2)))
        await eventually(lambda: "checked-job" in engine.scoring)
        miner.daemon.shutdown()
        result = await session.score_result("s-slow")
    assert result.error == "miner shutting down"
    assert "checked-job" in engine.scores_cancelled


def slash_notice(job_id: str = "job-9", *, banned: bool = False) -> miner_pb2.SlashNotice:
    return miner_pb2.SlashNotice(
        job_id=job_id, amount=1_234_567, reason="12 of 40 tokens off the sampler", banned=banned
    )


def slash_logs(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "miner.slashes"]


async def test_a_slash_notice_is_logged_and_recorded_beside_the_receipts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gateway, witness_dir = FakeGateway(), tmp_path / "identity.ledger"
    async with (
        serve(gateway) as port,
        running_miner(port, [FakeEngine()], witness_dir=witness_dir) as miner,
    ):
        session = await gateway.next_session()
        session.send_slash(slash_notice("job-9"))
        session.send_slash(slash_notice("job-10", banned=True))
        path = witness_dir / SLASHES_FILE
        await eventually(lambda: path.exists() and len(path.read_text().splitlines()) == 2)
        # The session goes on after a slash.
        session.send_job(make_job("after", max_tokens=2))
        assert (await session.job_outcome("after")).result is not None
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert (first["job_id"], first["amount"], first["banned"]) == ("job-9", 1_234_567, False)
    assert first["reason"] == "12 of 40 tokens off the sampler"
    assert (second["job_id"], second["banned"]) == ("job-10", True)
    logs = slash_logs(caplog)
    assert [record.levelno for record in logs] == [logging.ERROR, logging.ERROR]
    message = logs[0].getMessage()
    assert "job-9" in message and format_credits(1_234_567) in message
    assert "12 of 40 tokens off the sampler" in message and "banned: no" in message
    assert "banned: yes" in logs[1].getMessage()
    earnings = read_earnings(witness_dir, miner_id=miner.identity.miner_id)
    assert [slash.job_id for slash in earnings.slashes] == ["job-9", "job-10"]
    assert earnings.net == -2 * 1_234_567 and earnings.banned


async def test_without_a_state_directory_a_slash_notice_is_only_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    gateway = FakeGateway()
    async with serve(gateway) as port, running_miner(port, [FakeEngine()], witness_dir=None):
        session = await gateway.next_session()
        session.send_slash(slash_notice())
        await eventually(lambda: bool(slash_logs(caplog)))
    assert "job-9" in slash_logs(caplog)[0].getMessage()
    assert not any(path.name == SLASHES_FILE for path in tmp_path.rglob("*"))  # noqa: ASYNC240


async def test_an_unwritable_state_directory_does_not_end_the_session(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    witness_dir = tmp_path / "identity.ledger"
    (witness_dir / SLASHES_FILE).mkdir(parents=True)  # appending to it fails
    gateway = FakeGateway()
    async with serve(gateway) as port, running_miner(port, [FakeEngine()], witness_dir=witness_dir):
        session = await gateway.next_session()
        session.send_slash(slash_notice())
        session.send_job(make_job("after", max_tokens=2))
        assert (await session.job_outcome("after")).result is not None
    messages = [record.getMessage() for record in slash_logs(caplog)]
    assert any("job-9" in message for message in messages)
    assert any("could not record" in message for message in messages)
    assert len(gateway.sessions) == 1
