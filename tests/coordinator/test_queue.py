"""The dispatcher's bounded queue: a busy model's requests wait, first come first served."""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Callable

import pytest

from coordinator.catalog import Catalog, CatalogEntry
from coordinator.dispatch.dispatcher import DispatchConfig, Dispatcher, MinerRun
from coordinator.dispatch.registry import MinerRegistry
from coordinator.dispatch.router import Router
from coordinator.errors import NoMinerAvailableError
from coordinator.gateway.session import MinerSession
from coordinator.jobs import Job
from coordinator.ops.metrics import CoordinatorMetrics
from proto import miner_pb2
from tests.coordinator.core_fakes import (
    MODEL,
    WAIT_S,
    chunk,
    failure,
    make_job,
    make_session,
    new_job_id,
    next_job,
    outbox_messages,
)

QUEUE = DispatchConfig(
    max_attempts=2,
    first_token_timeout_s=WAIT_S,
    token_timeout_s=WAIT_S,
    retry_after_s=4,
    queue_wait_s=WAIT_S * 5,  # waits end by a freed slot in these tests, never by the clock
    max_queue=3,
)


@pytest.fixture
def registry() -> MinerRegistry:
    return MinerRegistry()


@pytest.fixture
def metrics() -> CoordinatorMetrics:
    return CoordinatorMetrics()


def dispatcher(
    registry: MinerRegistry, metrics: CoordinatorMetrics, config: DispatchConfig = QUEUE
) -> Dispatcher:
    return Dispatcher(
        config, registry=registry, router=Router(rng=random.Random(0)), metrics=metrics
    )


def gauge(metrics: CoordinatorMetrics) -> float | None:
    return metrics.registry.get_sample_value("meshmint_queue_depth")


def joined(catalog: Catalog, registry: MinerRegistry) -> MinerSession:
    session = make_session(catalog)
    registry.add(session)
    return session


def hold_slot(session: MinerSession) -> str:
    """Occupies one slot of ``session`` with a job of its own; returns the job id."""
    job_id = new_job_id()
    session.start_job(miner_pb2.Job(job_id=job_id, model=MODEL))
    outbox_messages(session)
    return job_id


def busy_miner(
    catalog: Catalog, registry: MinerRegistry, metrics: CoordinatorMetrics
) -> tuple[MinerSession, str, Dispatcher]:
    """One miner whose only slot is taken (the job id is returned), and a dispatcher for it."""
    session = joined(catalog, registry)
    return session, hold_slot(session), dispatcher(registry, metrics)


def free_slot(session: MinerSession, job_id: str) -> None:
    assert session.deliver(failure(job_id, "finished elsewhere")) is None


async def until(condition: Callable[[], bool]) -> None:
    """Lets the other tasks run until ``condition`` holds; fails the test after WAIT_S."""
    for _ in range(int(WAIT_S / 0.001)):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the condition never held")


async def queued(dispatch: Dispatcher, job: Job) -> asyncio.Task[MinerRun]:
    """Starts ``job`` and returns once it waits in the queue."""
    before = dispatch.queue_depth(MODEL)
    task = asyncio.create_task(dispatch.start(job))
    await until(lambda: dispatch.queue_depth(MODEL) == before + 1)
    return task


async def served(session: MinerSession, task: asyncio.Task[MinerRun]) -> Job:
    """Plays the miner up to the first token of the job it is sent; returns that job."""
    job = await next_job(session)
    assert session.deliver(chunk(job.job_id, [65])) is None
    run = await asyncio.wait_for(task, WAIT_S)
    assert run.worker is session and run.job == job
    return job


async def test_a_request_waits_for_a_busy_miner_then_gets_its_slot(
    catalog: Catalog,
    registry: MinerRegistry,
    metrics: CoordinatorMetrics,
    entry: CatalogEntry,
) -> None:
    session, held, dispatch = busy_miner(catalog, registry, metrics)
    job = make_job(entry)
    task = await queued(dispatch, job)
    assert dispatch.queue_depth() == dispatch.queue_depth(MODEL) == 1 and gauge(metrics) == 1
    assert outbox_messages(session) == [] and not task.done()

    free_slot(session, held)
    assert await served(session, task) == job
    assert dispatch.queue_depth(MODEL) == 0 and gauge(metrics) == 0


async def test_waiting_requests_are_served_first_come_first_served(
    catalog: Catalog,
    registry: MinerRegistry,
    metrics: CoordinatorMetrics,
    entry: CatalogEntry,
) -> None:
    session, held, dispatch = busy_miner(catalog, registry, metrics)
    jobs = [make_job(entry) for _ in range(3)]
    tasks = [await queued(dispatch, job) for job in jobs]
    assert dispatch.queue_depth(MODEL) == 3

    free_slot(session, held)
    for number, (job, task) in enumerate(zip(jobs, tasks, strict=True)):
        assert await served(session, task) == job
        assert dispatch.queue_depth(MODEL) == len(jobs) - number - 1
        session.abandon_job(job.job_id)  # its slot frees for the next one
        outbox_messages(session)


async def test_a_full_queue_refuses_at_once_with_retry_after(
    catalog: Catalog,
    registry: MinerRegistry,
    metrics: CoordinatorMetrics,
    entry: CatalogEntry,
) -> None:
    session = joined(catalog, registry)
    hold_slot(session)
    dispatch = dispatcher(registry, metrics)
    waiting = [await queued(dispatch, make_job(entry)) for _ in range(QUEUE.max_queue)]
    with pytest.raises(NoMinerAvailableError, match="already waiting") as raised:
        await asyncio.wait_for(dispatch.start(make_job(entry)), WAIT_S)
    assert raised.value.retry_after == QUEUE.retry_after_s
    assert dispatch.queue_depth(MODEL) == QUEUE.max_queue  # the others keep their places
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert dispatch.queue_depth() == 0 and gauge(metrics) == 0


async def test_a_wait_that_runs_out_is_no_miner_available(
    catalog: Catalog,
    registry: MinerRegistry,
    metrics: CoordinatorMetrics,
    entry: CatalogEntry,
) -> None:
    session = joined(catalog, registry)
    hold_slot(session)
    config = DispatchConfig(queue_wait_s=0.05, retry_after_s=2)
    dispatch = dispatcher(registry, metrics, config)
    with pytest.raises(NoMinerAvailableError, match=re.escape("stayed busy for 0.05 s")) as raised:
        await asyncio.wait_for(dispatch.start(make_job(entry)), WAIT_S)
    assert raised.value.retry_after == 2
    assert dispatch.queue_depth() == 0 and gauge(metrics) == 0
    assert outbox_messages(session) == []


async def test_without_a_queue_a_busy_model_is_refused_at_once(
    catalog: Catalog,
    registry: MinerRegistry,
    metrics: CoordinatorMetrics,
    entry: CatalogEntry,
) -> None:
    session = joined(catalog, registry)
    hold_slot(session)
    for config in (DispatchConfig(queue_wait_s=0), DispatchConfig(max_queue=0)):
        dispatch = dispatcher(registry, metrics, config)
        with pytest.raises(NoMinerAvailableError, match="busy"):
            await asyncio.wait_for(dispatch.start(make_job(entry)), WAIT_S)
        assert dispatch.queue_depth() == 0


async def test_no_miner_at_all_is_refused_without_waiting(
    registry: MinerRegistry, metrics: CoordinatorMetrics, entry: CatalogEntry
) -> None:
    dispatch = dispatcher(registry, metrics, DispatchConfig(queue_wait_s=3600))
    with pytest.raises(NoMinerAvailableError, match="none is connected"):
        await asyncio.wait_for(dispatch.start(make_job(entry)), WAIT_S)
    assert dispatch.queue_depth() == 0


async def test_a_buyer_who_leaves_the_queue_gives_its_place_up(
    catalog: Catalog,
    registry: MinerRegistry,
    metrics: CoordinatorMetrics,
    entry: CatalogEntry,
) -> None:
    session, held, dispatch = busy_miner(catalog, registry, metrics)
    leaving = await queued(dispatch, make_job(entry))
    staying_job = make_job(entry)
    staying = await queued(dispatch, staying_job)

    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert dispatch.queue_depth(MODEL) == 1 and gauge(metrics) == 1
    free_slot(session, held)
    assert await served(session, staying) == staying_job
    assert outbox_messages(session) == []  # the one who left was never sent to the miner


async def test_a_woken_request_that_leaves_passes_the_slot_on(
    catalog: Catalog,
    registry: MinerRegistry,
    metrics: CoordinatorMetrics,
    entry: CatalogEntry,
) -> None:
    session, held, dispatch = busy_miner(catalog, registry, metrics)
    first = await queued(dispatch, make_job(entry))
    second_job = make_job(entry)
    second = await queued(dispatch, second_job)

    free_slot(session, held)  # wakes the first waiter only: one slot
    first.cancel()  # ... which leaves before it could take the slot
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await served(session, second) == second_job


async def test_a_miner_joining_serves_the_queue(
    catalog: Catalog,
    registry: MinerRegistry,
    metrics: CoordinatorMetrics,
    entry: CatalogEntry,
) -> None:
    hold_slot(joined(catalog, registry))
    dispatch = dispatcher(registry, metrics)
    job = make_job(entry)
    task = await queued(dispatch, job)
    newcomer = joined(catalog, registry)
    assert await served(newcomer, task) == job


async def test_a_newcomer_does_not_jump_the_queue(
    catalog: Catalog,
    registry: MinerRegistry,
    metrics: CoordinatorMetrics,
    entry: CatalogEntry,
) -> None:
    session, held, dispatch = busy_miner(catalog, registry, metrics)
    waiting_job = make_job(entry)
    waiting = await queued(dispatch, waiting_job)
    newcomer = asyncio.create_task(dispatch.start(make_job(entry)))  # runs before the woken one
    free_slot(session, held)
    assert await served(session, waiting) == waiting_job
    await until(lambda: dispatch.queue_depth(MODEL) == 1)  # the newcomer waits its turn
    newcomer.cancel()
    await asyncio.gather(newcomer, return_exceptions=True)


async def test_failover_after_the_queue_waits_again_ahead_of_later_requests(
    catalog: Catalog,
    registry: MinerRegistry,
    metrics: CoordinatorMetrics,
    entry: CatalogEntry,
) -> None:
    first, second = joined(catalog, registry), joined(catalog, registry)
    first_held, second_held = hold_slot(first), hold_slot(second)
    dispatch = dispatcher(registry, metrics)
    job = make_job(entry)
    task = await queued(dispatch, job)

    free_slot(first, first_held)
    assert await next_job(first) == job
    # Two more requests arrive while the job runs on the first miner.
    later_job = make_job(entry)
    later = await queued(dispatch, later_job)
    latest = await queued(dispatch, make_job(entry))
    assert first.deliver(failure(job.job_id, "engine crashed")) is None
    # The job may not go back to the miner that failed it: the next request takes that slot,
    # and the job waits again, for the second miner, ahead of the latest request.
    assert await served(first, later) == later_job
    await until(lambda: dispatch.queue_depth(MODEL) == 2)
    free_slot(second, second_held)
    assert await served(second, task) == job
    assert dispatch.queue_depth(MODEL) == 1 and not latest.done()
    latest.cancel()
    await asyncio.gather(latest, return_exceptions=True)
    assert dispatch.queue_depth() == 0 and gauge(metrics) == 0
