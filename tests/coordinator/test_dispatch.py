"""Dispatcher (failover until the first token) and MinerRun (the stream after it)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest

from coordinator.catalog import Catalog, CatalogEntry
from coordinator.dispatch.dispatcher import DispatchConfig, Dispatcher, MinerRun
from coordinator.dispatch.registry import MinerRegistry
from coordinator.dispatch.router import Router
from coordinator.errors import NoMinerAvailableError, UpstreamError
from coordinator.gateway.session import MinerSession
from coordinator.gateway.wire import job_result
from coordinator.jobs import Job
from proto import miner_pb2
from tests.coordinator.core_fakes import (
    FINISH,
    MODEL,
    WAIT_S,
    MinerKey,
    busy,
    cancelled_ids,
    chunk,
    failure,
    make_job,
    make_session,
    next_job,
    outbox_messages,
    receipt_for,
    result_message,
    signed_result,
)

CONFIG = DispatchConfig(
    max_attempts=3,
    first_token_timeout_s=0.15,
    token_timeout_s=0.15,
    retry_after_s=7,
    queue_wait_s=0.2,
)


@pytest.fixture
def registry() -> MinerRegistry:
    return MinerRegistry()


class FirstChoice(random.Random):
    """An rng whose weighted draws always land on the first eligible candidate.

    The router draws at random, weighted by score; with this rng it takes the first miner (in
    registry order) with a free slot that was not tried yet, so failover tests know the order.
    """

    def random(self) -> float:
        return 0.0


def dispatcher(registry: MinerRegistry, config: DispatchConfig = CONFIG) -> Dispatcher:
    return Dispatcher(config, registry=registry, router=Router(rng=FirstChoice()))


def ranked(catalog: Catalog, registry: MinerRegistry, count: int) -> list[MinerSession]:
    """``count`` sessions the router tries in list order (each one more loaded than the last)."""
    sessions = []
    for rank in range(count):
        session = make_session(catalog, max_concurrency=rank + 1)
        busy(session, rank)  # load rank/(rank+1): 0, 1/2, 2/3, ...
        outbox_messages(session)
        registry.add(session)
        sessions.append(session)
    return sessions


async def answer_first_token(session: MinerSession, token: int = 65) -> Job:
    job = await next_job(session)
    assert session.deliver(chunk(job.job_id, [token])) is None
    return job


async def started(dispatch: Dispatcher, job: Job) -> asyncio.Task[MinerRun]:
    task = asyncio.create_task(dispatch.start(job))
    await asyncio.sleep(0)
    return task


# --- before the first token ---------------------------------------------------------------------


async def test_first_token_hands_back_the_run(
    catalog: Catalog, registry: MinerRegistry, entry: CatalogEntry
) -> None:
    (session,) = ranked(catalog, registry, 1)
    job = make_job(entry)
    task = await started(dispatcher(registry), job)
    sent = await answer_first_token(session, token=72)
    run = await asyncio.wait_for(task, WAIT_S)
    assert sent == job
    assert run.worker is session and run.job == job and run.stream.job == job
    assert not run.done
    first = await anext(aiter(run.chunks()))
    assert list(first.token_ids) == [72]


async def test_a_failing_miner_is_replaced_by_the_next(
    catalog: Catalog, registry: MinerRegistry, entry: CatalogEntry
) -> None:
    first, second = ranked(catalog, registry, 2)
    job = make_job(entry)
    task = await started(dispatcher(registry), job)
    failed = await next_job(first)
    assert first.deliver(failure(failed.job_id, "CUDA out of memory")) is None
    retried = await answer_first_token(second)
    run = await asyncio.wait_for(task, WAIT_S)
    assert failed == retried == job  # the same job, id included
    assert run.worker is second
    assert first.free_slots == 1 and outbox_messages(first) == []  # nothing left to cancel


async def test_a_silent_miner_is_abandoned_and_replaced(
    catalog: Catalog, registry: MinerRegistry, entry: CatalogEntry
) -> None:
    silent, second = ranked(catalog, registry, 2)
    job = make_job(entry)
    task = await started(dispatcher(registry), job)
    assert await next_job(silent) == job
    await answer_first_token(second)  # arrives only after first_token_timeout_s
    run = await asyncio.wait_for(task, WAIT_S)
    assert run.worker is second
    assert cancelled_ids(outbox_messages(silent)) == [job.job_id]
    assert silent.free_slots == 1
    # The slow miner's tokens turn up late: dropped, not a protocol violation.
    assert silent.deliver(chunk(job.job_id, [1])) is None


async def test_lost_miner_and_tokenless_result_are_failed_over(
    catalog: Catalog, registry: MinerRegistry, entry: CatalogEntry
) -> None:
    lost, empty, good = ranked(catalog, registry, 3)
    job = make_job(entry)
    task = await started(dispatcher(registry), job)
    await next_job(lost)
    lost.close("the miner closed the stream")
    await next_job(empty)
    receipt = receipt_for(job, [], weights_sha256=entry.weights_sha256)
    result = signed_result(job, receipt, FINISH.FINISH_REASON_STOP, key=MinerKey())
    assert empty.deliver(result_message(result)) is None
    await answer_first_token(good)
    run = await asyncio.wait_for(task, WAIT_S)
    assert run.worker is good


async def test_all_failing_is_no_miner_available_naming_each_failure(
    catalog: Catalog, registry: MinerRegistry, entry: CatalogEntry
) -> None:
    sessions = ranked(catalog, registry, 3)
    job = make_job(entry)
    task = await started(dispatcher(registry), job)
    for number, session in enumerate(sessions):
        sent = await next_job(session)
        assert session.deliver(failure(sent.job_id, f"broken-{number}")) is None
    with pytest.raises(NoMinerAvailableError) as raised:
        await asyncio.wait_for(task, WAIT_S)
    message = str(raised.value)
    assert raised.value.retry_after == CONFIG.retry_after_s
    assert f"'{MODEL}'" in message
    for number, session in enumerate(sessions):
        assert f"broken-{number}" in message and session.miner_id[:12] in message


async def test_silence_everywhere_is_no_miner_available(
    catalog: Catalog, registry: MinerRegistry, entry: CatalogEntry
) -> None:
    sessions = ranked(catalog, registry, 2)
    job = make_job(entry)
    with pytest.raises(NoMinerAvailableError, match="no answer from the miner"):
        await asyncio.wait_for(dispatcher(registry).start(job), WAIT_S)
    for session in sessions:
        assert cancelled_ids(outbox_messages(session)) == [job.job_id]


async def test_no_miner_connected(registry: MinerRegistry, entry: CatalogEntry) -> None:
    dispatch = dispatcher(registry)
    assert not dispatch.has_miners(MODEL)
    with pytest.raises(NoMinerAvailableError, match="busy or none is connected") as raised:
        await dispatch.start(make_job(entry))
    assert raised.value.retry_after == CONFIG.retry_after_s


async def test_busy_miners_are_serving_but_not_available(
    catalog: Catalog, registry: MinerRegistry, entry: CatalogEntry
) -> None:
    session = make_session(catalog)
    busy(session)
    registry.add(session)
    dispatch = dispatcher(registry)
    assert dispatch.has_miners(MODEL)
    with pytest.raises(NoMinerAvailableError):
        await dispatch.start(make_job(entry))


async def test_max_attempts_is_respected(
    catalog: Catalog, registry: MinerRegistry, entry: CatalogEntry
) -> None:
    sessions = ranked(catalog, registry, 4)
    config = DispatchConfig(max_attempts=2, first_token_timeout_s=0.15, token_timeout_s=0.15)
    job = make_job(entry)
    task = await started(dispatcher(registry, config), job)
    for session in sessions[:2]:
        sent = await next_job(session)
        assert session.deliver(failure(sent.job_id, "nope")) is None
    with pytest.raises(NoMinerAvailableError):
        await asyncio.wait_for(task, WAIT_S)
    assert all(outbox_messages(session) == [] for session in sessions[2:])


async def test_a_silent_miner_is_measured_as_slow(
    catalog: Catalog, registry: MinerRegistry, entry: CatalogEntry
) -> None:
    silent, second = ranked(catalog, registry, 2)
    task = await started(dispatcher(registry), make_job(entry))
    await next_job(silent)
    await answer_first_token(second)
    await asyncio.wait_for(task, WAIT_S)
    assert silent.speed.ttft_s == CONFIG.first_token_timeout_s  # the whole timeout
    assert second.speed.ttft_s is not None and second.speed.jobs_measured == 1


async def test_a_failing_miner_is_not_measured(
    catalog: Catalog, registry: MinerRegistry, entry: CatalogEntry
) -> None:
    first, second = ranked(catalog, registry, 2)
    task = await started(dispatcher(registry), make_job(entry))
    sent = await next_job(first)
    assert first.deliver(failure(sent.job_id, "out of memory")) is None
    await answer_first_token(second)
    await asyncio.wait_for(task, WAIT_S)
    assert first.speed.ttft_s is None and first.speed.jobs_measured == 0


async def test_without_fallbacks_the_first_failure_is_final(
    catalog: Catalog, registry: MinerRegistry, entry: CatalogEntry
) -> None:
    first, second = ranked(catalog, registry, 2)
    job = make_job(entry)
    task = asyncio.create_task(dispatcher(registry).start(job, allow_fallbacks=False))
    sent = await next_job(first)
    assert first.deliver(failure(sent.job_id, "broken")) is None
    with pytest.raises(NoMinerAvailableError, match="broken") as raised:
        await asyncio.wait_for(task, WAIT_S)
    assert raised.value.retry_after == CONFIG.retry_after_s
    assert outbox_messages(second) == []  # never tried
    assert first.free_slots == 1


async def test_sort_reaches_the_router(
    catalog: Catalog, registry: MinerRegistry, entry: CatalogEntry
) -> None:
    slow_start, quick_start = ranked(catalog, registry, 2)
    slow_start.speed.first_token(2.0)
    quick_start.speed.first_token(0.01)
    router = Router(rng=random.Random(0))
    dispatch = Dispatcher(CONFIG, registry=registry, router=router)
    for _ in range(5):
        task = asyncio.create_task(dispatch.start(make_job(entry), sort="latency"))
        job = await answer_first_token(quick_start)
        run = await asyncio.wait_for(task, WAIT_S)
        assert run.worker is quick_start
        quick_start.abandon_job(job.job_id)
        outbox_messages(quick_start)
    assert outbox_messages(slow_start) == []


async def test_cancelled_dispatch_cancels_the_job(
    catalog: Catalog, registry: MinerRegistry, entry: CatalogEntry
) -> None:
    (session,) = ranked(catalog, registry, 1)
    job = make_job(entry)
    task = await started(dispatcher(registry, DispatchConfig(first_token_timeout_s=30)), job)
    await next_job(session)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled_ids(outbox_messages(session)) == [job.job_id]
    assert session.free_slots == 1


# --- after the first token ----------------------------------------------------------------------


async def running(
    catalog: Catalog, registry: MinerRegistry, entry: CatalogEntry
) -> tuple[MinerSession, MinerRun]:
    (session,) = ranked(catalog, registry, 1)
    task = await started(dispatcher(registry), make_job(entry, max_tokens=8))
    await answer_first_token(session, token=1)
    return session, await asyncio.wait_for(task, WAIT_S)


async def test_chunks_then_the_result(
    catalog: Catalog, registry: MinerRegistry, entry: CatalogEntry
) -> None:
    session, run = await running(catalog, registry, entry)
    job_id = run.job.job_id
    assert session.deliver(chunk(job_id, [2, 3])) is None
    assert session.deliver(chunk(job_id, [4])) is None
    receipt = receipt_for(run.job, [1, 2, 3, 4], weights_sha256=entry.weights_sha256)
    result = signed_result(run.job, receipt, FINISH.FINISH_REASON_LENGTH, key=MinerKey())
    assert session.deliver(result_message(result)) is None
    seen = [list(piece.token_ids) async for piece in run.chunks()]
    assert seen == [[1, 2, 3, 4]]  # queued while nobody read: one chunk
    assert run.result == job_result(result) and run.done
    run.cancel()  # done: nothing to cancel
    assert outbox_messages(session) == []


async def test_chunks_come_one_by_one_to_a_reader_that_keeps_up(
    catalog: Catalog, registry: MinerRegistry, entry: CatalogEntry
) -> None:
    session, run = await running(catalog, registry, entry)
    job_id = run.job.job_id
    chunks = aiter(run.chunks())
    assert list((await anext(chunks)).token_ids) == [1]
    assert session.deliver(chunk(job_id, [2, 3])) is None
    assert list((await anext(chunks)).token_ids) == [2, 3]
    assert session.deliver(chunk(job_id, [4])) is None
    assert session.deliver(chunk(job_id, [5])) is None  # the reader fell behind
    receipt = receipt_for(run.job, [1, 2, 3, 4, 5], weights_sha256=entry.weights_sha256)
    result = signed_result(run.job, receipt, FINISH.FINISH_REASON_LENGTH, key=MinerKey())
    assert session.deliver(result_message(result)) is None
    merged = await anext(chunks)
    assert list(merged.token_ids) == [4, 5] and list(merged.logprobs) == [-0.5, -0.5]
    with pytest.raises(StopAsyncIteration):
        await anext(chunks)
    assert run.result == job_result(result)


def _fail(session: MinerSession, job_id: str) -> None:
    assert session.deliver(failure(job_id, "engine crashed")) is None


def _lose(session: MinerSession, job_id: str) -> None:
    session.close("evicted: silent for 15.0 s")


def _stall(session: MinerSession, job_id: str) -> None:
    pass  # token_timeout_s passes


@pytest.mark.parametrize(
    ("trouble", "expected"),
    [(_fail, "engine crashed"), (_lose, "evicted"), (_stall, "no answer from the miner")],
    ids=["failure", "lost", "timeout"],
)
async def test_trouble_mid_stream_is_an_upstream_error(
    catalog: Catalog,
    registry: MinerRegistry,
    entry: CatalogEntry,
    trouble: Callable[[MinerSession, str], None],
    expected: str,
) -> None:
    session, run = await running(catalog, registry, entry)
    assert session.deliver(chunk(run.job.job_id, [2])) is None
    trouble(session, run.job.job_id)
    seen: list[list[int]] = []
    with pytest.raises(UpstreamError, match=expected):
        async for piece in run.chunks():
            seen.append(list(piece.token_ids))
    assert seen == [[1, 2]]
    assert run.result is None


async def test_cancel_mid_stream_asks_the_miner_to_stop(
    catalog: Catalog, registry: MinerRegistry, entry: CatalogEntry
) -> None:
    session, run = await running(catalog, registry, entry)
    run.cancel()
    assert cancelled_ids(outbox_messages(session)) == [run.job.job_id]


# --- privacy: only the miners a buyer's tier admits ---------------------------------------------


async def test_only_eligible_miners_are_tried(
    catalog: Catalog, registry: MinerRegistry, entry: CatalogEntry
) -> None:
    preferred, admitted = ranked(catalog, registry, 2)
    dispatch = dispatcher(registry)
    assert not dispatch.has_miners(MODEL, eligible=lambda session: False)
    assert dispatch.has_miners(MODEL, eligible=lambda session: session is admitted)
    job = make_job(entry)
    task = asyncio.create_task(dispatch.start(job, eligible=lambda session: session is admitted))
    await answer_first_token(admitted)
    run = await asyncio.wait_for(task, WAIT_S)
    assert run.worker is admitted
    assert outbox_messages(preferred) == []  # the router's favourite never saw the prompt
    with pytest.raises(NoMinerAvailableError):
        await dispatch.start(make_job(entry), eligible=lambda session: False)


async def test_a_request_waits_for_its_eligible_miner_rather_than_take_a_free_one(
    catalog: Catalog, registry: MinerRegistry, entry: CatalogEntry
) -> None:
    free = make_session(catalog)
    registry.add(free)
    admitted = make_session(catalog)
    admitted.start_job(miner_pb2.Job(job_id="job-holding-the-slot", model=MODEL))
    outbox_messages(admitted)
    registry.add(admitted)
    job = make_job(entry)
    task = asyncio.create_task(
        dispatcher(registry).start(job, eligible=lambda session: session is admitted)
    )
    await asyncio.sleep(0.02)
    assert not task.done() and free.active_jobs == 0 and outbox_messages(free) == []
    _fail(admitted, "job-holding-the-slot")  # its slot frees: the waiting request takes it
    await answer_first_token(admitted)
    run = await asyncio.wait_for(task, WAIT_S)
    assert run.worker is admitted and free.active_jobs == 0
