"""Staying connected: heartbeats, dead connections, reconnects, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import pytest

from miner.config import MinerConfig, parse_coordinators
from miner.daemon import backoff_delay
from proto import miner_pb2

from .fake_gateway import WAIT_S, FakeEngine, FakeGateway, make_job, running_miner, serve


async def test_heartbeats_are_sent_every_interval_with_the_active_job_count() -> None:
    gateway = FakeGateway(heartbeat_interval_ms=40)
    engine = FakeEngine(token_delay_s=0.05)
    async with serve(gateway) as port, running_miner(port, [engine], drain_timeout_s=0):
        session = await gateway.next_session()
        start = time.monotonic()
        await session.next("heartbeat")
        session.send_job(make_job("busy", max_tokens=1000))
        await session.next("chunk")
        beats = [(await session.next("heartbeat")).heartbeat for _ in range(3)]
        elapsed = time.monotonic() - start
    assert all(beat.active_jobs == 1 for beat in beats)
    assert elapsed >= 0.08, "heartbeats must be paced by the interval, not sent in a burst"
    now_ms = time.time() * 1000
    assert all(now_ms - 5000 < beat.sent_at_unix_ms <= now_ms for beat in beats)


async def test_a_silent_coordinator_is_treated_as_dead_and_the_miner_reconnects() -> None:
    gateway = FakeGateway(heartbeat_interval_ms=50, send_heartbeats=False)
    engine = FakeEngine(token_delay_s=0.05)
    async with serve(gateway) as port, running_miner(port, [engine]):
        first = await gateway.next_session()
        first.send_job(make_job("orphan", max_tokens=1000))
        started = time.monotonic()
        second = await gateway.next_session()
        silent_for = time.monotonic() - started
        assert second.welcomed
        assert 0.1 < silent_for < 2.0, "dead after 3 silent intervals (150 ms) plus a backoff"
        # The job of the dead connection was stopped, not left running for nobody.
        assert "orphan" in engine.closed
        await asyncio.wait_for(first.ended.wait(), WAIT_S)


async def test_the_miner_reconnects_after_the_coordinator_restarts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway = FakeGateway()
    engine = FakeEngine(token_delay_s=0.02)
    async with contextlib.AsyncExitStack() as stack:
        first_server = contextlib.AsyncExitStack()
        port = await first_server.enter_async_context(serve(gateway))
        miner = await stack.enter_async_context(running_miner(port, [engine]))
        first = await gateway.next_session()
        first.send_job(make_job("in-flight", max_tokens=10_000))
        await first.next("chunk")

        await first_server.aclose()  # the coordinator goes away...
        await engine.wait_closed("in-flight")
        await asyncio.sleep(0.3)  # ...for several reconnect attempts
        assert not miner.task.done()

        async with serve(gateway, port=port):  # ...and comes back on the same port
            back = time.monotonic()
            second = await gateway.next_session()
            assert second.welcomed
            # The miner's own backoff (<= 0.1 s here) governs, not grpc's (1 s and growing).
            assert time.monotonic() - back < 0.5
            second.send_job(make_job("after-restart", max_tokens=3))
            outcome = await second.job_outcome("after-restart")
            assert outcome.result is not None
            miner.daemon.shutdown()
            await asyncio.wait_for(miner.task, WAIT_S)
    assert len(gateway.sessions) == 2
    warnings = [record for record in caplog.records if record.levelname == "WARNING"]
    assert any("retrying in" in record.getMessage() for record in warnings)
    assert not any(record.exc_info for record in caplog.records), "no tracebacks for lost links"


async def test_graceful_shutdown_finishes_jobs_in_flight_and_refuses_new_ones() -> None:
    gateway = FakeGateway()
    engine = FakeEngine(token_delay_s=0.02)
    async with serve(gateway) as port, running_miner(port, [engine]) as miner:
        session = await gateway.next_session()
        session.send_job(make_job("running", max_tokens=15))
        await session.next("chunk")
        miner.daemon.shutdown()
        drain = (await session.next("drain")).drain
        assert drain.reason == "shutting down"
        session.send_job(make_job("late"))
        late = await session.job_outcome("late")
        assert late.failure is not None
        assert late.failure.retryable and late.failure.message == "draining"
        running = await session.job_outcome("running")
        assert running.result is not None
        assert running.result.finish_reason == miner_pb2.FINISH_REASON_LENGTH
        assert running.result.receipt.completion_tokens == 15
        await asyncio.wait_for(miner.task, WAIT_S)
        await asyncio.wait_for(session.ended.wait(), WAIT_S)
    assert "late" not in engine.produced
    assert len(gateway.sessions) == 1, "a miner that shut down does not reconnect"


async def test_after_the_drain_timeout_unfinished_jobs_are_handed_back() -> None:
    gateway = FakeGateway()
    streaming = FakeEngine("streaming", token_delay_s=0.02)
    stalled = FakeEngine("stalled", first_token_delay_s=60)
    async with (
        serve(gateway) as port,
        running_miner(port, [streaming, stalled], max_concurrency=2, drain_timeout_s=0.2) as miner,
    ):
        session = await gateway.next_session()
        session.send_job(make_job("started", model="streaming", max_tokens=10_000))
        session.send_job(make_job("not-started", model="stalled"))
        await session.next("chunk")
        began = time.monotonic()
        miner.daemon.shutdown()
        await asyncio.wait_for(miner.task, WAIT_S)
        took = time.monotonic() - began
    assert 0.2 <= took < 2.0
    results = {message.result.job_id: message.result for message in session.of_kind("result")}
    failures = {message.failure.job_id: message.failure for message in session.of_kind("failure")}
    assert set(results) == {"started"} and set(failures) == {"not-started"}
    assert results["started"].finish_reason == miner_pb2.FINISH_REASON_CANCELLED
    assert results["started"].receipt.completion_tokens == streaming.produced["started"] > 0
    assert failures["not-started"].retryable
    assert failures["not-started"].message == "miner shutting down"
    assert {"started", "not-started"} <= streaming.closed | stalled.closed
    # The hand-back reached the coordinator before the miner closed its side.
    kinds = [message.WhichOneof("body") for message in session.received]
    assert kinds.index("drain") < kinds.index("result")


@pytest.mark.parametrize("attempt", [0, 1, 3, 10, 100])
def test_backoff_is_full_jitter_under_a_doubling_cap(attempt: int) -> None:
    cap = min(30.0, 0.5 * 2**attempt)
    delays = [backoff_delay(attempt, minimum=0.5, maximum=30.0) for _ in range(500)]
    assert all(0 <= delay <= cap for delay in delays)
    assert max(delays) > cap * 0.8 and min(delays) < cap * 0.2


async def test_the_miner_moves_to_the_next_coordinator_when_one_is_down_or_dies() -> None:
    standby, replica = FakeGateway(), FakeGateway()
    engine = FakeEngine()
    with socket.socket() as probe:  # a gateway that is down: nothing listens there
        probe.bind(("127.0.0.1", 0))
        down = probe.getsockname()[1]
    async with contextlib.AsyncExitStack() as stack:
        replica_server = contextlib.AsyncExitStack()
        replica_port = await replica_server.enter_async_context(serve(replica))
        standby_port = await stack.enter_async_context(serve(standby))
        fallbacks = (f"127.0.0.1:{replica_port}", f"127.0.0.1:{standby_port}")
        miner = await stack.enter_async_context(
            running_miner(
                down,
                [engine],
                fallback_coordinators=fallbacks,
                backoff_min_s=5.0,
                backoff_max_s=5.0,
            )
        )
        # The first gateway is down: the next one is tried at once, without the 5 s backoff.
        first = await replica.next_session(within_s=2.0)
        assert first.welcomed
        await replica_server.aclose()  # the replica dies: on to the standby, again at once
        second = await standby.next_session(within_s=2.0)
        assert second.welcomed
        second.send_job(make_job("after-failover", max_tokens=3))
        outcome = await second.job_outcome("after-failover")
        assert outcome.result is not None
        miner.daemon.shutdown()
        await asyncio.wait_for(miner.task, WAIT_S)


def test_coordinators_are_listed_comma_separated_and_each_checked() -> None:
    assert parse_coordinators("a:1,[::1]:2 , b:3") == ("a:1", ("[::1]:2", "b:3"))
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_coordinators("a:1,b")
    with pytest.raises(ValueError, match="listed twice"):
        MinerConfig(coordinator="a:1", fallback_coordinators=("a:1",))
