"""Failover and cancellation, timed: hung miners are evicted within seconds and their jobs go
elsewhere; a buyer who leaves stops the miner within a second and pays for what it got."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from http.client import HTTPConnection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from openai import OpenAI

from tests.e2e.conftest import INPUT_PRICE, OUTPUT_PRICE
from tests.e2e.harness import (
    Coordinator,
    Process,
    balances,
    create_key,
    fetch,
    http,
    start_miner,
    wait_for_miners,
)

MESSAGES = [{"role": "user", "content": "Tell me a long story."}]
EVICTION_LIMIT_S = 5.0  # 3 missed heartbeats of 1 s, plus one check period of slack
CANCEL_LIMIT_S = 1.5  # from the buyer leaving to the job settled and the miner stopped


def _miner_count(coordinator: Coordinator, key: str) -> int:
    _, _, body = http(f"{coordinator.base_url}/models", api_key=key)
    return int(next(m["miners"] for m in body["data"] if m["id"] == "tiny"))


def _frozen(miner: Process) -> bool:
    stat = Path(f"/proc/{miner.popen.pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0] == "T"


def _job(coordinator: Coordinator, key_id: str, deadline: float) -> dict[str, Any]:
    """The key's one job record, waiting for it until ``deadline``."""
    while True:
        jobs = fetch(
            coordinator.database_url, "SELECT * FROM coordinator_jobs WHERE key_id = $1", key_id
        )
        if jobs or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(jobs) == 1, f"no job record within {CANCEL_LIMIT_S} s"
    return jobs[0]


def _miner_cancelled(miner: Process, deadline: float, *, seen: int) -> int:
    """Waits for the miner's log line of cancellation number ``seen`` + 1; its token count."""
    marker = "cancelled by the coordinator after "
    while True:
        lines = [line for line in miner.output().splitlines() if marker in line]
        if len(lines) > seen or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(lines) > seen, f"the miner never logged the cancel:\n{miner.output()[-2000:]}"
    return int(lines[seen].split(marker)[1].split()[0])


def test_a_frozen_miner_is_evicted_within_seconds(
    coordinator: Coordinator, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    miner = start_miner(coordinator, tmp_path, name="hung", models={"tiny": model_dirs["tiny"]})
    _, key = create_key(coordinator.database_url, credits_micro=0)
    wait_for_miners(coordinator, key, "tiny", 1)
    # SIGSTOP: no more heartbeats, but the TCP connection stays open (a hung machine).
    miner.popen.send_signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        while _miner_count(coordinator, key) != 0:
            assert time.monotonic() - frozen_at < EVICTION_LIMIT_S, "the hung miner stayed"
            time.sleep(0.1)
    finally:
        miner.popen.send_signal(signal.SIGCONT)
    assert "evicted: silent for" in coordinator.process.output()
    miner.stop()


def test_a_job_on_a_miner_that_freezes_before_its_first_token_fails_over(
    coordinator: Coordinator, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    tiny = {"tiny": model_dirs["tiny"]}
    freezer = start_miner(
        coordinator, tmp_path, name="freezer", models=tiny, variant="freeze-on-job"
    )
    start_miner(coordinator, tmp_path, name="honest", models=tiny)
    _, key = create_key(coordinator.database_url, credits_micro=5_000_000)
    wait_for_miners(coordinator, key, "tiny", 2)
    client = OpenAI(base_url=coordinator.base_url, api_key=key, max_retries=0, timeout=60)
    try:
        # Routing is random among equals: keep asking until the freezer takes a job.
        for _ in range(12):
            started = time.monotonic()
            stream = client.chat.completions.create(
                model="tiny", messages=MESSAGES, max_tokens=8, temperature=0, stream=True
            )
            chunks = list(stream)
            elapsed = time.monotonic() - started
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
            assert any(c.choices and c.choices[0].finish_reason for c in chunks)
            if _frozen(freezer):
                break
        assert _frozen(freezer), "the freezer never received a job"
    finally:
        freezer.popen.send_signal(signal.SIGCONT)
    # Served by the honest miner once the frozen one was evicted: eviction plus the answer.
    assert elapsed < EVICTION_LIMIT_S + 3, f"failover took {elapsed:.1f} s"
    log = coordinator.process.output()
    assert "failed before output (evicted: silent for" in log


def test_a_buyer_who_leaves_stops_the_miner_and_pays_for_delivered_tokens(
    coordinator: Coordinator, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    miner = start_miner(
        coordinator,
        tmp_path,
        name="slow",
        models={"tiny": model_dirs["tiny"]},
        variant="slow:0.05",
        max_concurrency=1,
    )
    stream_key_id, stream_key = create_key(coordinator.database_url, credits_micro=1_000_000)
    wait_for_miners(coordinator, stream_key, "tiny", 1)
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 400, "temperature": 0}

    # Streaming: read five content chunks, then hang up.
    before = balances(coordinator.database_url)
    url = urlsplit(coordinator.base_url)
    connection = HTTPConnection(url.hostname or "", url.port, timeout=30)
    connection.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps({**body, "stream": True}),
        headers={"Authorization": f"Bearer {stream_key}", "Content-Type": "application/json"},
    )
    response = connection.getresponse()
    assert response.status == 200
    received = 0
    while received < 5:
        line = response.readline()
        assert line, "the stream ended early"
        if line.startswith(b"data: {"):
            delta = json.loads(line[6:])["choices"][0]["delta"]
            received += bool(delta.get("content"))
    response.close()
    connection.close()
    left_at = time.monotonic()
    job = _job(coordinator, stream_key_id, left_at + CANCEL_LIMIT_S)
    produced = _miner_cancelled(miner, left_at + CANCEL_LIMIT_S, seen=0)
    assert 5 <= job["completion_tokens"] < 50
    assert produced < 50
    assert job["finish_reason"] is None
    cost = job["prompt_tokens"] * INPUT_PRICE + job["completion_tokens"] * OUTPUT_PRICE
    after = balances(coordinator.database_url)
    assert before[f"buyer:{stream_key_id}"] - after[f"buyer:{stream_key_id}"] == cost

    # The only slot is free again: the next request is served at once, not refused.
    started = time.monotonic()
    status, _, reply = http(
        f"{coordinator.base_url}/chat/completions",
        api_key=stream_key,
        body=json.dumps({**body, "max_tokens": 3}).encode(),
    )
    assert status == 200, reply
    assert time.monotonic() - started < 3

    # Not streaming: the client gives up after 1 s; the coordinator notices at the next token.
    plain_key_id, plain_key = create_key(
        coordinator.database_url, credits_micro=1_000_000, name="impatient"
    )
    before = balances(coordinator.database_url)
    request = urllib.request.Request(
        f"{coordinator.base_url}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {plain_key}", "Content-Type": "application/json"},
    )
    try:
        urllib.request.urlopen(request, timeout=1).read()
        raise AssertionError("a 400-token answer at 20 tokens/s came back within 1 s")
    except (TimeoutError, urllib.error.URLError):
        pass
    left_at = time.monotonic()
    job = _job(coordinator, plain_key_id, left_at + CANCEL_LIMIT_S)
    produced = _miner_cancelled(miner, left_at + CANCEL_LIMIT_S, seen=1)
    assert 1 <= job["completion_tokens"] < 50
    assert produced < 50
    # The answer never reached the buyer: nothing was delivered, so nothing is charged.
    assert job["cost"] == 0
    after = balances(coordinator.database_url)
    assert before[f"buyer:{plain_key_id}"] == after[f"buyer:{plain_key_id}"]
