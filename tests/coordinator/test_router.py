"""Router (free capacity, speed, trust, provider.sort), speed figures, and MinerRegistry."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest

from coordinator.api import ProviderSort
from coordinator.dispatch.registry import MinerRegistry
from coordinator.dispatch.router import (
    LAST_CHECK_FAILED_TRUST,
    SHARPNESS,
    SORT_SHARPNESS,
    Router,
    trust_from_record,
)
from coordinator.dispatch.speed import MinerSpeed, MovingAverage
from coordinator.gateway.session import MinerSession
from coordinator.jobs import Job, MinerLost, Sampling
from coordinator.verification.trust import TrustRecord
from proto import miner_pb2
from tests.coordinator.core_fakes import (
    MODEL,
    bare_session,
    busy,
    chunk,
    new_job_id,
    outbox_messages,
)

PICKS = 2000  # draws per statistical test; the seeded rng makes every run the same


def shares(
    router: Router, miners: Sequence[MinerSession], *, sort: ProviderSort | None = None
) -> dict[MinerSession, float]:
    """How often each miner is picked, as a share of PICKS draws."""
    counts = Counter(router.pick(miners, sort=sort) for _ in range(PICKS))
    return {miner: counts[miner] / PICKS for miner in miners}


def measured(ttft_s: float, tokens_per_s: float, *, max_concurrency: int = 1) -> MinerSession:
    """An idle session whose speed figures are already known."""
    session = bare_session(max_concurrency=max_concurrency)
    session.speed.first_token(ttft_s)
    session.speed.decoded(round(tokens_per_s * 10), 10.0)
    return session


# --- free capacity ------------------------------------------------------------------------------


def test_free_capacity_share_decides_between_equally_fast_miners() -> None:
    # big runs more jobs, but a smaller share of its slots: it is the less loaded one.
    big = bare_session(max_concurrency=8)
    small = bare_session(max_concurrency=2)
    busy(big, 2)  # 6/8 free
    busy(small, 1)  # 1/2 free
    router = Router(rng=random.Random(0))
    scores = dict(router.scores([small, big]))
    assert scores[big] / scores[small] == pytest.approx((0.75 / 0.5) ** SHARPNESS)
    picked = shares(router, [small, big])
    assert picked[big] > 0.75 and picked[small] > 0.05  # preferred, not exclusive
    busy(big, 3)  # 3/8 free < 1/2
    picked = shares(router, [small, big])
    assert picked[small] > 0.65


def test_an_idle_miner_beats_a_half_busy_one_by_far() -> None:
    idle, loaded = bare_session(max_concurrency=4), bare_session(max_concurrency=4)
    busy(loaded, 2)
    picked = shares(Router(rng=random.Random(0)), [loaded, idle])
    assert picked[idle] > 0.9


def test_excluded_miners_are_never_picked() -> None:
    first, second = bare_session(), bare_session(max_concurrency=2)
    busy(second, 1)
    router = Router(rng=random.Random(0))
    assert all(router.pick([first, second], exclude={first.miner_id}) is second for _ in range(50))
    assert router.pick([first, second], exclude=[first.miner_id, second.miner_id]) is None


def test_no_free_slot_means_no_pick() -> None:
    full = [bare_session(max_concurrency=n) for n in (1, 3)]
    busy(full[0], 1)
    busy(full[1], 3)
    router = Router(rng=random.Random(0))
    assert router.pick(full) is None
    assert router.pick([]) is None
    spare = bare_session(max_concurrency=2)
    busy(spare, 1)
    assert all(router.pick([*full, spare]) is spare for _ in range(50))


def test_equal_miners_share_evenly() -> None:
    miners = [bare_session(max_concurrency=2) for _ in range(2)]
    picked = shares(Router(rng=random.Random(0)), miners)
    assert all(0.45 < share < 0.55 for share in picked.values())


def test_same_seed_same_choices() -> None:
    miners = [bare_session() for _ in range(3)]
    first, second = Router(rng=random.Random(7)), Router(rng=random.Random(7))
    picks = [first.pick(miners) for _ in range(30)]
    assert picks == [second.pick(miners) for _ in range(30)]
    assert set(picks) == set(miners)


# --- speed --------------------------------------------------------------------------------------


def test_a_faster_miner_gets_most_jobs_and_a_slower_one_some() -> None:
    fast = measured(ttft_s=0.1, tokens_per_s=40.0)
    slow = measured(ttft_s=0.2, tokens_per_s=20.0)  # half as fast by both figures
    router = Router(rng=random.Random(1))
    scores = dict(router.scores([fast, slow]))
    assert scores[slow] / scores[fast] == pytest.approx(0.5**SHARPNESS)
    picked = shares(router, [fast, slow])
    assert picked[fast] > 0.85
    assert picked[slow] > 0.02  # still measured now and then


def test_a_busy_fast_miner_yields_to_an_idle_slow_one() -> None:
    fast = measured(ttft_s=0.1, tokens_per_s=40.0, max_concurrency=4)
    slow = measured(ttft_s=0.15, tokens_per_s=30.0, max_concurrency=4)
    busy(fast, 3)
    picked = shares(Router(rng=random.Random(2)), [fast, slow])
    assert picked[slow] > 0.9


def test_an_unmeasured_miner_counts_as_the_best_measured_one() -> None:
    fast = measured(ttft_s=0.1, tokens_per_s=40.0)
    slow = measured(ttft_s=0.4, tokens_per_s=10.0)
    new = bare_session()
    router = Router(rng=random.Random(3))
    scores = dict(router.scores([fast, slow, new]))
    assert scores[new] == scores[fast] > scores[slow]
    picked = shares(router, [fast, new])
    assert 0.45 < picked[new] < 0.55


# --- trust --------------------------------------------------------------------------------------


def test_trust_scales_the_share_and_zero_is_never_picked() -> None:
    trusted, doubted, banned = bare_session(), bare_session(), bare_session()
    levels = {trusted.miner_id: 1.0, doubted.miner_id: 0.5, banned.miner_id: 0.0}
    router = Router(rng=random.Random(4), trust=levels.__getitem__)
    picked = shares(router, [trusted, doubted, banned])
    assert picked[banned] == 0
    assert 0.28 < picked[doubted] < 0.39  # about half the trusted miner's share
    assert router.pick([banned]) is None


def test_a_local_miner_takes_twice_the_share_of_an_equal_remote_one() -> None:
    local, remote = bare_session(), bare_session()
    remote.is_local = False  # as a RemoteWorker is: reached through another replica
    picked = shares(Router(rng=random.Random(5)), [local, remote])
    assert 0.62 < picked[local] < 0.71  # 2:1


def test_a_free_remote_miner_still_beats_a_busy_local_one() -> None:
    local, remote = bare_session(max_concurrency=4), bare_session(max_concurrency=4)
    remote.is_local = False
    busy(local, 3)
    picked = shares(Router(rng=random.Random(6)), [local, remote])
    assert picked[remote] > 0.9


def test_trust_from_spot_check_records() -> None:
    assert trust_from_record(TrustRecord("new")) == 1.0  # never checked: not starved
    passing = TrustRecord("ok", consecutive_valid=3, checks_run=3, checks_passed=3)
    assert trust_from_record(passing) == 1.0
    failed = TrustRecord("failed", consecutive_valid=0, checks_run=4, checks_failed=1)
    assert 0 < trust_from_record(failed) == LAST_CHECK_FAILED_TRUST < 1
    recovered = TrustRecord("again", consecutive_valid=1, checks_run=5, checks_failed=1)
    assert trust_from_record(recovered) == 1.0
    assert trust_from_record(TrustRecord("cheat", banned=True, consecutive_valid=9)) == 0.0


# --- provider.sort ------------------------------------------------------------------------------


def test_sort_by_latency_and_by_throughput() -> None:
    quick_start = measured(ttft_s=0.05, tokens_per_s=20.0)  # first token soon, slow after
    high_rate = measured(ttft_s=0.5, tokens_per_s=80.0)  # first token late, fast after
    miners = [quick_start, high_rate]
    router = Router(rng=random.Random(5))
    assert shares(router, miners, sort="latency")[quick_start] > 0.99
    assert shares(router, miners, sort="throughput")[high_rate] > 0.99


def test_sort_ignores_load_but_needs_a_free_slot() -> None:
    quick = measured(ttft_s=0.05, tokens_per_s=40.0, max_concurrency=4)
    slower = measured(ttft_s=0.08, tokens_per_s=40.0, max_concurrency=4)
    busy(quick, 3)
    router = Router(rng=random.Random(6))
    assert shares(router, [quick, slower], sort="latency")[quick] > 0.95
    assert shares(router, [quick, slower])[slower] > 0.95  # the default weighs the load
    busy(quick, 1)
    assert router.pick([quick, slower], sort="latency") is slower


def test_near_equal_miners_still_share_under_a_sort() -> None:
    first = measured(ttft_s=0.100, tokens_per_s=40.0)
    second = measured(ttft_s=0.102, tokens_per_s=40.0)
    router = Router(rng=random.Random(8))
    scores = dict(router.scores([first, second], sort="latency"))
    assert scores[second] / scores[first] == pytest.approx((0.100 / 0.102) ** SORT_SHARPNESS)
    assert 0.3 < shares(router, [first, second], sort="latency")[second] < 0.5


def test_sort_by_price_is_the_default() -> None:
    fast = measured(ttft_s=0.1, tokens_per_s=40.0, max_concurrency=2)
    slow = measured(ttft_s=0.3, tokens_per_s=25.0, max_concurrency=2)
    busy(fast, 1)
    router = Router()
    assert router.scores([fast, slow], sort="price") == router.scores([fast, slow])


# --- speed figures ------------------------------------------------------------------------------


def test_moving_average_starts_at_the_first_sample_then_smooths() -> None:
    average = MovingAverage(smoothing=0.25)
    assert average.value is None
    average.add(8.0)
    assert average.value == 8.0
    average.add(4.0)
    assert average.value == pytest.approx(8.0 + 0.25 * (4.0 - 8.0))
    assert average.samples == 2
    with pytest.raises(ValueError):
        MovingAverage(smoothing=0)


def test_unmeasurable_decode_samples_are_ignored() -> None:
    speed = MinerSpeed()
    speed.decoded(0, 1.0)  # nothing after the first chunk
    speed.decoded(5, 0.0)  # everything in the same instant
    assert speed.tokens_per_s is None and speed.ttft_s is None and speed.jobs_measured == 0
    speed.decoded(30, 2.0)
    assert speed.tokens_per_s == 15.0


class FakeClock:
    """Stands in for the ``time`` module inside the session and its job streams: a clock the
    test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_a_session_measures_its_miner_as_messages_arrive(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr("coordinator.gateway.session.time", clock)
    monkeypatch.setattr("coordinator.worker.time", clock)
    session = bare_session(max_concurrency=2)
    job = Job(new_job_id(), MODEL, (), Sampling(0.0, 1.0, 16, 0, ()))
    session.start_job(job)
    clock.now += 0.25
    assert session.deliver(chunk(job.job_id, [1, 2])) is None  # first chunk: two tokens
    clock.now += 0.5
    assert session.deliver(chunk(job.job_id, [3, 4, 5])) is None
    clock.now += 0.25
    assert session.deliver(chunk(job.job_id, [6])) is None
    assert session.speed.ttft_s == pytest.approx(0.25)
    assert session.speed.tokens_per_s is None  # measured when the result arrives
    clock.now += 5.0  # the result's own delay is not decode time
    result = miner_pb2.JobResult(job_id=job.job_id, finish_reason=miner_pb2.FINISH_REASON_STOP)
    assert session.deliver(miner_pb2.MinerMessage(result=result)) is None
    assert session.speed.tokens_per_s == pytest.approx(4 / 0.75)  # 4 tokens after the first chunk
    assert session.speed.jobs_measured == 1


def test_a_failed_job_measures_no_decode_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr("coordinator.gateway.session.time", clock)
    monkeypatch.setattr("coordinator.worker.time", clock)
    session = bare_session()
    job = Job(new_job_id(), MODEL, (), Sampling(0.0, 1.0, 16, 0, ()))
    session.start_job(job)
    clock.now += 0.5
    assert session.deliver(chunk(job.job_id, [1])) is None
    clock.now += 0.5
    assert session.deliver(chunk(job.job_id, [2])) is None
    failure = miner_pb2.JobFailure(job_id=job.job_id, message="boom")
    assert session.deliver(miner_pb2.MinerMessage(failure=failure)) is None
    assert session.speed.ttft_s == pytest.approx(0.5)
    assert session.speed.tokens_per_s is None


# --- MinerRegistry ------------------------------------------------------------------------------


async def test_newer_session_of_the_same_miner_replaces_the_old() -> None:
    registry = MinerRegistry()
    old = bare_session(miner_id="m" * 64)
    other = bare_session()
    registry.add(old)
    registry.add(other)
    channel = old.start_job(miner_pb2.Job(job_id=new_job_id(), model=MODEL))
    new = bare_session(miner_id="m" * 64)
    registry.add(new)

    assert set(registry.workers()) == {new, other}
    assert old.closed_reason is not None and "replaced" in old.closed_reason
    assert outbox_messages(old)[-1] is None  # its stream ends
    lost = await channel.next_event(wait_s=0.05)
    assert isinstance(lost, MinerLost) and "replaced" in lost.reason  # its job fails over
    assert new.closed_reason is None and other.closed_reason is None

    registry.remove(old)  # the old stream's teardown must not evict the new session
    assert set(registry.workers()) == {new, other}
    registry.remove(new)
    assert registry.workers() == [other]


def test_adding_the_same_session_twice_keeps_it_open() -> None:
    registry = MinerRegistry()
    session = bare_session()
    registry.add(session)
    registry.add(session)
    assert registry.workers() == [session]
    assert session.closed_reason is None


def test_serving_excludes_draining_and_closed_but_not_busy() -> None:
    registry = MinerRegistry()
    busy_one, draining, closed, other_model = (
        bare_session(),
        bare_session(),
        bare_session(),
        bare_session(models=("other",)),
    )
    for session in (busy_one, draining, closed, other_model):
        registry.add(session)
    busy(busy_one, 1)
    draining.deliver(miner_pb2.MinerMessage(drain=miner_pb2.Drain(reason="bye")))
    closed.close("gone")
    assert registry.serving(MODEL) == [busy_one]
    assert registry.serving("other") == [other_model]
    assert registry.serving("nobody-serves-this") == []


def test_available_needs_a_free_slot() -> None:
    registry = MinerRegistry()
    full, spare, draining = (
        bare_session(max_concurrency=2),
        bare_session(max_concurrency=2),
        bare_session(),
    )
    for session in (full, spare, draining):
        registry.add(session)
    busy(full, 2)
    busy(spare, 1)
    draining.deliver(miner_pb2.MinerMessage(drain=miner_pb2.Drain(reason="bye")))
    assert registry.available(MODEL) == [spare]
    busy(spare, 1)
    assert registry.available(MODEL) == []
    assert registry.serving(MODEL) == [full, spare]


def test_capacity_watchers_hear_of_joins_and_freed_slots_only() -> None:
    registry = MinerRegistry()
    heard: list[MinerSession] = []
    registry.watch_capacity(heard.append)
    session = bare_session(max_concurrency=2)
    registry.add(session)
    assert heard == [session]  # a new miner brings capacity
    first = miner_pb2.Job(job_id=new_job_id(), model=MODEL)
    second = miner_pb2.Job(job_id=new_job_id(), model=MODEL)
    session.start_job(first)
    session.start_job(second)
    assert heard == [session]  # starting jobs frees nothing
    failure = miner_pb2.JobFailure(job_id=first.job_id, message="no")
    assert session.deliver(miner_pb2.MinerMessage(failure=failure)) is None
    session.abandon_job(second.job_id)
    assert heard == [session] * 3
    session.deliver(miner_pb2.MinerMessage(drain=miner_pb2.Drain(reason="bye")))
    third = miner_pb2.Job(job_id=new_job_id(), model=MODEL)
    session.start_job(third)
    session.abandon_job(third.job_id)
    assert len(heard) == 3  # a draining miner offers no slot
    registry.remove(session)
    assert session.on_slot_freed is None
