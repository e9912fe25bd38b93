"""Replicas: several `meshmint-coordinator serve --nats` processes form one marketplace.

Real processes all the way: one PostgreSQL, a real nats-server, coordinator replicas sharing the
database and the ledger key, a miner connected to one replica, buyers on another through the
official SDK.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import INPUT_PRICE, NO_SPOT_CHECKS, OUTPUT_PRICE, price_args
from tests.e2e.harness import (
    BIN,
    Coordinator,
    create_key,
    eventually,
    fetch,
    http,
    ledger_audit,
    open_holds,
    start_coordinator,
    start_miner,
    wait_for_miners,
)
from tests.nats_server import NatsServer

MESSAGES = [{"role": "user", "content": "Tell me about replicas."}]
CREDITS = 10_000_000


@dataclass
class Cluster:
    a: Coordinator  # started first: the ledger sequencer; the miner dials it first
    b: Coordinator  # a standby sequencer; buyers here are served by the miner on A
    nats: NatsServer
    database_url: str

    def replicas(self) -> list[Coordinator]:
        return [self.a, self.b]


def start_replica(
    tmp: Path, name: str, *, database_url: str, model_dir: Path, nats: NatsServer
) -> Coordinator:
    directory = tmp / name
    directory.mkdir()
    return start_coordinator(
        directory,
        database_url=database_url,
        models={"tiny": model_dir},
        extra=[
            *price_args(),
            *NO_SPOT_CHECKS,
            *("--nats", nats.url, "--replica-id", name),
            *("--ledger-key", str(tmp / "ledger.key")),
        ],
    )


def cluster_of(
    tmp: Path, *, database_url: str, model_dir: Path, names: tuple[str, str] = ("a", "b")
) -> Iterator[Cluster]:
    nats = NatsServer(tmp / "nats")
    nats.start()
    started: list[Coordinator] = []
    try:
        a = start_replica(tmp, names[0], database_url=database_url, model_dir=model_dir, nats=nats)
        started.append(a)
        b = start_replica(tmp, names[1], database_url=database_url, model_dir=model_dir, nats=nats)
        started.append(b)
        # The miner dials A, and moves to B when A is gone (--coordinator A,B). Its slots cover
        # the tests' concurrency: two replicas racing for a single miner's last slot is a 503
        # when no other miner can take the job (see the dispatcher), which is not under test here.
        both = dataclasses.replace(a, grpc_address=f"{a.grpc_address},{b.grpc_address}")
        start_miner(both, tmp, name="miner", models={"tiny": model_dir}, max_concurrency=16)
        _, probe = create_key(database_url, credits_micro=0, name="probe")
        wait_for_miners(b, probe, "tiny", 1)  # B routes to the miner connected to A
        yield Cluster(a, b, nats, database_url)
    finally:
        for coordinator in started:
            for miner in coordinator.miners:
                miner.stop()
        for coordinator in reversed(started):
            coordinator.process.stop()
        nats.stop()


@pytest.fixture(scope="module")
def cluster(
    module_database_url: str, model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    yield from cluster_of(
        tmp_path_factory.mktemp("replicas"),
        database_url=module_database_url,
        model_dir=model_dirs["tiny"],
    )


def client(coordinator: Coordinator, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=coordinator.base_url, api_key=secret, max_retries=0)


def charged(database_url: str, key_id: str) -> list[dict[str, int]]:
    return fetch(
        database_url,
        "SELECT prompt_tokens, completion_tokens, cost FROM coordinator_jobs WHERE key_id = $1",
        key_id,
    )


def test_a_buyer_on_one_replica_is_served_by_a_miner_on_another(cluster: Cluster) -> None:
    key_id, secret = create_key(cluster.database_url, credits_micro=CREDITS, name="cross")
    stream = client(cluster.b, secret).chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 0 and text
    (job,) = charged(cluster.database_url, key_id)
    expected = usage.prompt_tokens * INPUT_PRICE + usage.completion_tokens * OUTPUT_PRICE
    assert job["cost"] == expected
    eventually(lambda: open_holds(cluster.database_url) == 0, "the hold is closed")
    balance = fetch(
        cluster.database_url,
        "SELECT balance FROM ledger_accounts WHERE kind = 'buyer' AND owner = $1",
        key_id,
    )
    assert balance[0]["balance"] == CREDITS - expected


def test_a_buyer_who_leaves_mid_stream_stops_the_remote_miner_and_pays_for_what_it_got(
    cluster: Cluster,
) -> None:
    key_id, secret = create_key(cluster.database_url, credits_micro=CREDITS, name="leaver")
    stream = client(cluster.b, secret).chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=400, stream=True
    )
    for _ in zip(range(3), stream, strict=False):
        pass
    stream.close()
    eventually(lambda: len(charged(cluster.database_url, key_id)) == 1, "the job is logged")
    (job,) = charged(cluster.database_url, key_id)
    assert 0 < job["completion_tokens"] < 400
    assert (
        job["cost"] == job["prompt_tokens"] * INPUT_PRICE + job["completion_tokens"] * OUTPUT_PRICE
    )
    eventually(lambda: open_holds(cluster.database_url) == 0, "the hold is closed")


def test_a_spend_limit_hammered_through_both_replicas_is_never_exceeded(cluster: Cluster) -> None:
    limit_micro = 700  # a few requests' worth at the test prices
    key_id, secret = create_key(cluster.database_url, credits_micro=CREDITS, name="limited")
    fetch(
        cluster.database_url,
        "UPDATE coordinator_api_keys SET spend_limit = $2 WHERE key_id = $1",
        key_id,
        limit_micro,
    )

    def ask(index: int) -> str:
        replica = cluster.replicas()[index % 2]
        try:
            client(replica, secret).chat.completions.create(
                model="tiny", messages=MESSAGES, max_tokens=8
            )
        except openai.RateLimitError as error:
            assert "spend limit" in str(error)
            return "refused"
        return "served"

    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        outcomes = list(pool.map(ask, range(24)))
    assert "refused" in outcomes and "served" in outcomes
    spent = sum(job["cost"] for job in charged(cluster.database_url, key_id))
    assert 0 < spent <= limit_micro
    eventually(lambda: open_holds(cluster.database_url) == 0, "every hold is closed")


def test_nats_lost_fails_cross_replica_requests_cleanly_and_service_recovers(
    cluster: Cluster,
) -> None:
    key_id, secret = create_key(cluster.database_url, credits_micro=CREDITS, name="natsless")
    cluster.nats.stop()
    try:
        eventually(
            lambda: not _miners_seen(cluster.b, secret),
            "B takes A's miner out of routing while NATS is down",
        )
        with pytest.raises(openai.APIStatusError) as refused:
            client(cluster.b, secret).chat.completions.create(
                model="tiny", messages=MESSAGES, max_tokens=8
            )
        assert refused.value.status_code == 503
        # A still serves its own miner to its own buyers.
        client(cluster.a, secret).chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=8
        )
    finally:
        cluster.nats.start()
    eventually(lambda: _miners_seen(cluster.b, secret), "B routes to A's miner again")
    client(cluster.b, secret).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8)
    jobs = charged(cluster.database_url, key_id)
    assert len(jobs) == 2  # A's and B's served requests; the refused one cost nothing
    eventually(lambda: open_holds(cluster.database_url) == 0, "every hold is closed")


def _miners_seen(coordinator: Coordinator, secret: str) -> bool:
    _, _, models = http(f"{coordinator.base_url}/models", api_key=secret)
    return any(m["id"] == "tiny" and m["miners"] > 0 for m in models["data"])


def test_killing_the_sequencer_replica_hands_everything_to_the_other(
    database_url: str, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """SIGKILL of A (the sequencer, and the miner's replica) in the middle of a stream: B signs
    checkpoints within 10 s, the miner moves to B, A's open hold is released, nothing is charged
    twice, and the log audits clean."""
    for cluster in cluster_of(
        tmp_path,
        database_url=database_url,
        model_dir=model_dirs["tiny"],
        names=("killed-a", "killed-b"),
    ):
        key_id, secret = create_key(database_url, credits_micro=CREDITS, name="killed")
        signed_before = _checkpoint_size(database_url)
        stream = client(cluster.a, secret).chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=400, stream=True
        )
        next(iter(stream))
        cluster.a.process.popen.send_signal(signal.SIGKILL)
        cluster.a.process.popen.wait()
        with pytest.raises(openai.APIError):
            for _ in stream:
                pass
        # The miner finds B; B signs what was appended since (the killed request wrote no
        # settlement: its hold is released by B's sweep of A's lease).
        wait_for_miners(cluster.b, secret, "tiny", 1, timeout=60)
        client(cluster.b, secret).chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=8
        )
        eventually(lambda: open_holds(database_url) == 0, "A's hold is released", timeout=40)
        eventually(
            lambda: _checkpoint_size(database_url) > signed_before,  # noqa: B023
            "B signs new checkpoints",
            timeout=15,
        )
        audit = ledger_audit(cluster.b)
        assert audit.returncode == 0, audit.stdout + audit.stderr
        jobs = charged(database_url, key_id)
        assert len(jobs) == 1  # B's request; A's killed one was never settled, so never charged


def _checkpoint_size(database_url: str) -> int:
    rows = fetch(database_url, "SELECT max(size) AS size FROM ledger_checkpoints")
    return int(rows[0]["size"] or 0)


@pytest.mark.parametrize("broken", ["nats", "postgres"])
def test_an_unreachable_nats_or_postgresql_at_start_is_named_in_one_line(
    broken: str, database_url: str, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    dead = "127.0.0.1:1"  # nothing listens on port 1
    result = subprocess.run(
        [
            str(BIN / "meshmint-coordinator"),
            "serve",
            *(
                "--database-url",
                f"postgresql://nobody@{dead}/x" if broken == "postgres" else database_url,
            ),
            *("--nats", f"nats://{dead}" if broken == "nats" else "nats://127.0.0.1:2"),
            *(
                "--data-dir",
                str(tmp_path / "data"),
                "--http",
                "127.0.0.1:0",
                "--grpc",
                "127.0.0.1:0",
            ),
            *("--model", f"tiny={model_dirs['tiny']}"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    which = "NATS" if broken == "nats" else "PostgreSQL"
    assert last.startswith(f"meshmint-coordinator: cannot reach {which} at "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
