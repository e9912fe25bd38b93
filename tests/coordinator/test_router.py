"""Router (least loaded, random among equals) and MinerRegistry (one session per identity)."""

from __future__ import annotations

import random
from collections import Counter

from coordinator.gateway.session import MinerLost
from coordinator.registry import MinerRegistry
from coordinator.router import Router
from proto import miner_pb2
from tests.coordinator.core_fakes import MODEL, bare_session, busy, new_job_id, outbox_messages

# --- Router -------------------------------------------------------------------------------------


def test_least_loaded_by_share_of_slots_wins() -> None:
    # big runs more jobs, but a smaller share of its slots: it is the less loaded one.
    big = bare_session(max_concurrency=8)
    small = bare_session(max_concurrency=2)
    busy(big, 2)  # 2/8
    busy(small, 1)  # 1/2
    router = Router(rng=random.Random(0))
    for _ in range(20):
        assert router.pick([small, big]) is big
    busy(big, 3)  # 5/8 > 1/2
    assert router.pick([small, big]) is small


def test_idle_miner_wins_over_a_busy_one() -> None:
    idle, loaded = bare_session(max_concurrency=4), bare_session(max_concurrency=4)
    busy(loaded, 1)
    router = Router(rng=random.Random(0))
    assert all(router.pick([loaded, idle]) is idle for _ in range(20))


def test_excluded_miners_are_never_picked() -> None:
    first, second = bare_session(), bare_session(max_concurrency=2)
    busy(second, 1)
    router = Router(rng=random.Random(0))
    assert router.pick([first, second]) is first
    assert router.pick([first, second], exclude={first.miner_id}) is second
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
    assert router.pick([*full, spare]) is spare


def test_ties_are_spread_at_random() -> None:
    miners = [bare_session(max_concurrency=2) for _ in range(2)]
    router = Router(rng=random.Random(0))
    picks = Counter(router.pick(miners) for _ in range(200))
    assert set(picks) == set(miners)
    assert min(picks.values()) > 50  # roughly even, not merely "both at least once"


def test_same_seed_same_choices() -> None:
    miners = [bare_session() for _ in range(3)]
    first, second = Router(rng=random.Random(7)), Router(rng=random.Random(7))
    picks = [first.pick(miners) for _ in range(30)]
    assert picks == [second.pick(miners) for _ in range(30)]
    assert set(picks) == set(miners)


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

    assert set(registry.sessions()) == {new, other}
    assert old.closed_reason is not None and "replaced" in old.closed_reason
    assert outbox_messages(old)[-1] is None  # its stream ends
    lost = await channel.next_event(wait_s=0.05)
    assert isinstance(lost, MinerLost) and "replaced" in lost.reason  # its job fails over
    assert new.closed_reason is None and other.closed_reason is None

    registry.remove(old)  # the old stream's teardown must not evict the new session
    assert set(registry.sessions()) == {new, other}
    registry.remove(new)
    assert registry.sessions() == [other]


def test_adding_the_same_session_twice_keeps_it_open() -> None:
    registry = MinerRegistry()
    session = bare_session()
    registry.add(session)
    registry.add(session)
    assert registry.sessions() == [session]
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
