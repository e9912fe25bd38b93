"""Two replicas linked over a real nats-server: a miner connected to A serves B's requests.

The miner is played on its session at replica A exactly as the gRPC servicer would feed it
(``core_fakes.play_job``); replica B sees it as a RemoteWorker and runs the real dispatcher.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

import pytest

from coordinator.catalog import Catalog, CatalogEntry
from coordinator.dispatch.dispatcher import DispatchConfig, Dispatcher
from coordinator.dispatch.registry import MinerRegistry
from coordinator.dispatch.router import Router
from coordinator.errors import NoMinerAvailableError, UpstreamError
from coordinator.gateway.session import MinerSession
from coordinator.jobs import MinerFinish, ScoreRequest
from coordinator.replicas.mesh import MeshConfig, ReplicaLinkError, ReplicaMesh
from coordinator.replicas.remote_worker import RemoteWorker
from coordinator.worker import SlashNotice
from proto import miner_pb2
from proto.signing import output_digest
from tests.coordinator.core_fakes import (
    WAIT_S,
    MinerKey,
    chunk,
    make_job,
    make_session,
    next_job,
    next_outbound,
    play_job,
    stop_id,
    text_ids,
)
from tests.nats_server import NatsServer


async def eventually(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S * 3
    while not condition():
        if loop.time() > deadline:
            pytest.fail(f"not within {WAIT_S * 3} s: {what}")
        await asyncio.sleep(0.02)


@dataclass
class Pair:
    a: MinerRegistry  # replica A: the miner is connected here
    b: MinerRegistry  # replica B: its buyers' requests go to A's miner
    session: MinerSession  # the miner's session at A
    key: MinerKey
    dispatcher_b: Dispatcher
    stack: AsyncExitStack

    def remote(self) -> RemoteWorker | None:
        worker = self.b.get(self.session.miner_id)
        return worker if isinstance(worker, RemoteWorker) else None


def mesh_config(url: str, replica: str) -> MeshConfig:
    return MeshConfig(
        nats_url=url, replica_id=replica, capacity_interval_s=0.05, silent_after_s=0.5
    )


@pytest.fixture
async def pair(nats_server: NatsServer, catalog: Catalog, key: MinerKey) -> AsyncIterator[Pair]:
    async with AsyncExitStack() as stack:
        a, b = MinerRegistry(), MinerRegistry()
        await stack.enter_async_context(
            ReplicaMesh.running(mesh_config(nats_server.url, "a"), registry=a)
        )
        await stack.enter_async_context(
            ReplicaMesh.running(mesh_config(nats_server.url, "b"), registry=b)
        )
        session = make_session(catalog, key=key, max_concurrency=2)
        a.add(session)
        dispatcher_b = Dispatcher(
            DispatchConfig(first_token_timeout_s=WAIT_S, token_timeout_s=WAIT_S, queue_wait_s=0.5),
            registry=b,
            router=Router(),
        )
        result = Pair(a, b, session, key, dispatcher_b, stack)
        await eventually(lambda: result.remote() is not None, "B sees the miner connected to A")
        yield result


async def test_the_other_replica_sees_the_miner_with_its_facts(
    pair: Pair, entry: CatalogEntry
) -> None:
    remote = pair.remote()
    assert remote is not None and not remote.is_local and remote.home == "a"
    assert remote.models == pair.session.models
    assert remote.public_key == pair.key.public
    assert remote.max_concurrency == 2 and remote.accepts(entry.name)
    assert remote.device_name == pair.session.device_name


async def test_a_job_from_b_streams_through_a_and_carries_the_signed_receipt(
    pair: Pair, entry: CatalogEntry
) -> None:
    tokens = [*text_ids(entry, "Hello there"), stop_id(entry)]
    job = make_job(entry, max_tokens=32)
    starting = asyncio.create_task(pair.dispatcher_b.start(job))
    miner = asyncio.create_task(play_job(pair.session, pair.key, entry, tokens))
    run = await asyncio.wait_for(starting, WAIT_S)
    streamed = [token async for piece in run.chunks() for token in piece.token_ids]
    played, _ = await miner
    assert played == job  # A's miner got exactly B's job, id and sampling included
    assert streamed == tokens
    assert run.result is not None and run.result.finish_reason is MinerFinish.STOP
    assert run.result.receipt.output_sha256 == output_digest(tokens)
    remote = pair.remote()
    assert remote is not None
    await eventually(lambda: remote.active_jobs == 0, "B's count of the miner's jobs drops")


async def test_the_home_replica_counts_relayed_jobs_for_the_others(
    pair: Pair, entry: CatalogEntry
) -> None:
    """B counts its own job at once; A's capacity message must not count it twice."""
    job = make_job(entry, max_tokens=32)
    remote = pair.remote()
    assert remote is not None
    stream = remote.start_job(job)
    assert remote.active_jobs == 1
    await next_job(pair.session)
    assert pair.session.active_jobs == 1
    await asyncio.sleep(0.2)  # several capacity messages from A, each naming the job as B's
    assert remote.active_jobs == 1 and remote.free_slots == 1
    remote.abandon_job(job.job_id)
    cancel = await next_outbound(pair.session)
    assert cancel.WhichOneof("body") == "cancel" and cancel.cancel.job_id == job.job_id
    await eventually(lambda: pair.session.active_jobs == 0, "A frees the slot B gave up")
    assert not stream.finished


async def test_a_cancel_from_b_reaches_the_miner_and_its_cancelled_result_comes_back(
    pair: Pair, entry: CatalogEntry
) -> None:
    tokens = text_ids(entry, "a long answer")
    job = make_job(entry, max_tokens=64)
    starting = asyncio.create_task(pair.dispatcher_b.start(job))
    await next_job(pair.session)
    assert pair.session.deliver(chunk(job.job_id, tokens[:1])) is None
    run = await asyncio.wait_for(starting, WAIT_S)
    run.cancel()
    cancel = await next_outbound(pair.session)
    assert cancel.WhichOneof("body") == "cancel" and cancel.cancel.job_id == job.job_id


async def test_a_miner_refusing_before_output_is_replaced_and_b_pays_nothing(
    pair: Pair, entry: CatalogEntry
) -> None:
    job = make_job(entry)
    starting = asyncio.create_task(pair.dispatcher_b.start(job))
    sent = await next_job(pair.session)
    failure = miner_pb2.JobFailure(job_id=sent.job_id, message="CUDA out of memory", retryable=True)
    assert pair.session.deliver(miner_pb2.MinerMessage(failure=failure)) is None
    with pytest.raises(NoMinerAvailableError, match="CUDA out of memory"):
        await asyncio.wait_for(starting, WAIT_S)


async def test_score_requests_and_notices_reach_the_miner_through_its_replica(
    pair: Pair, entry: CatalogEntry
) -> None:
    remote = pair.remote()
    assert remote is not None
    request = ScoreRequest(score_id="score-1", job=make_job(entry), completion_token_ids=(5, 6))
    future = remote.start_score(request)
    sent = await next_outbound(pair.session)
    assert sent.WhichOneof("body") == "score" and sent.score.score_id == "score-1"
    assert list(sent.score.completion_token_ids) == [5, 6]
    answer = miner_pb2.ScoreResult(
        score_id="score-1", logprobs=[-1.0, -2.0], margins=[0.0, float("inf")]
    )
    assert pair.session.deliver(miner_pb2.MinerMessage(score_result=answer)) is None
    result = await asyncio.wait_for(future, WAIT_S)
    assert result.logprobs == (-1.0, -2.0) and result.margins == (0.0, float("inf"))

    remote.send_slash_notice(
        SlashNotice(job_id="job-x", amount=7, reason="skipped a stop", banned=True)
    )
    notice = await next_outbound(pair.session)
    assert notice.WhichOneof("body") == "slash_notice"
    assert (notice.slash_notice.amount, notice.slash_notice.banned) == (7, True)
    remote.ban("banned after two confirmed failures", reason="banned")
    refusal = await next_outbound(pair.session)
    assert refusal.WhichOneof("body") == "refusal"
    assert refusal.refusal.reason == miner_pb2.REFUSAL_REASON_BANNED_KEY
    await eventually(lambda: pair.session.closed_reason == "banned", "A ends the banned session")
    await eventually(lambda: pair.b.get(pair.session.miner_id) is None, "B drops the miner")


async def test_a_miner_leaving_its_replica_leaves_routing_everywhere(pair: Pair) -> None:
    pair.session.close("disconnected")
    pair.a.remove(pair.session)
    await eventually(lambda: pair.b.get(pair.session.miner_id) is None, "B drops the miner")


async def test_a_replica_that_stops_takes_its_miners_out_of_the_others_routing(
    nats_server: NatsServer, catalog: Catalog, entry: CatalogEntry
) -> None:
    a, b = MinerRegistry(), MinerRegistry()
    session = make_session(catalog)
    a.add(session)
    async with ReplicaMesh.running(mesh_config(nats_server.url, "b"), registry=b):
        async with ReplicaMesh.running(mesh_config(nats_server.url, "a"), registry=a):
            await eventually(lambda: b.get(session.miner_id) is not None, "B sees A's miner")
            remote = b.get(session.miner_id)
            assert remote is not None
            stream = remote.start_job(make_job(entry))
            await next_job(session)
        # A left (its shutdown says so): B forgets its miner at once, and B's job learns of it.
        await eventually(lambda: b.get(session.miner_id) is None, "B drops A's miner")
        event = await stream.next_event(wait_s=WAIT_S)
        assert type(event).__name__ == "MinerLost"


async def test_nats_lost_mid_job_fails_the_job_cleanly_and_routing_comes_back(
    pair: Pair, nats_server: NatsServer, entry: CatalogEntry
) -> None:
    job = make_job(entry, max_tokens=64)
    starting = asyncio.create_task(pair.dispatcher_b.start(job))
    await next_job(pair.session)
    assert pair.session.deliver(chunk(job.job_id, text_ids(entry, "Hi"))) is None
    run = await asyncio.wait_for(starting, WAIT_S)
    nats_server.stop()
    with pytest.raises(UpstreamError, match="lost"):
        async with asyncio.timeout(WAIT_S * 3):
            async for _ in run.chunks():
                pass
    await eventually(lambda: pair.remote() is None, "B drops remote miners while NATS is down")
    nats_server.start()
    await eventually(lambda: pair.remote() is not None, "B sees A's miner again")


async def test_nats_unreachable_at_start_is_a_clear_error(catalog: Catalog) -> None:
    config = MeshConfig(nats_url="nats://127.0.0.1:1", replica_id="x", connect_timeout_s=1.0)
    with pytest.raises(
        ReplicaLinkError, match=re.escape("cannot reach NATS at nats://127.0.0.1:1")
    ):
        async with ReplicaMesh.running(config, registry=MinerRegistry()):
            pass


async def test_a_clean_shutdown_is_not_reported_as_a_lost_nats_link(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with ReplicaMesh.running(mesh_config(nats_server.url, "quiet"), registry=MinerRegistry()):
        pass
    assert "NATS link lost" not in caplog.text
