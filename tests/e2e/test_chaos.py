"""Chaos, bounded and on loopback: concurrent streaming buyers while miners are SIGKILLed and
restarted at random.

Real processes throughout: the coordinator CLI, three slowed honest miner CLIs, the official
`openai` SDK in threads as buyers, PostgreSQL, and the installed `meshmint-ledger audit`.
Afterwards every request either completed or ended with a clean SDK error (no hang, no broken
stream without an error event), every buyer paid exactly for the tokens it received, no hold
is open, the balances sum to zero and the ledger audits clean.
"""

from __future__ import annotations

import concurrent.futures
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionMessageParam

from tests.e2e.conftest import FEE_BPS, INPUT_PRICE, OUTPUT_PRICE, tiny_coordinator
from tests.e2e.harness import (
    Coordinator,
    Process,
    balances,
    create_key,
    fetch,
    ledger_audit,
    miner_identity,
    open_holds,
    start_miner,
    wait_for_miners,
)

BUYERS = 12
REQUESTS_PER_BUYER = 3  # at least; buyers go on until the chaos is over
MAX_TOKENS = 32
MINERS = ("alpha", "bravo", "charlie")
MINER_VARIANT = "slow:0.02"  # 20 ms a token: streams last long enough to be cut
MINER_SLOTS = 4  # per miner: 12 slots for 12 buyers while all three are up
STREAM_TIMEOUT_S = 30.0  # the SDK's timeout: a stream that stalls this long counts as a hang
BUYING_S = 90.0  # buyers start no new request after this, planned kills done or not
DEADLINE_S = BUYING_S + 2 * STREAM_TIMEOUT_S  # every buyer must be done by then
CREDITS = 1_000_000
KILLS = 2  # planned; each waits for the previous victim to be back
REFUSED_PAUSE_S = 0.25  # a buyer refused for want of a free miner tries again after this

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Tell me a long story about miners."}
]


@dataclass
class Outcome:
    """What one buyer saw of one streamed request."""

    buyer: int  # index of the buyer
    counts_tokens: bool  # asked for logprobs: every delivered token arrives as an entry
    completion_id: str | None = None  # the chunks' id; None when refused before any output
    content_chunks: int = 0  # chunks with text: each carries one token or more
    tokens: int = 0  # logprobs entries received, when counts_tokens
    finish_reason: str | None = None  # from the stream's finish chunk
    usage: CompletionUsage | None = None  # from the stream's last chunk
    error: openai.APIError | None = None  # what the SDK raised, if anything

    @property
    def completed(self) -> bool:
        return self.error is None and self.finish_reason is not None and self.usage is not None

    def describe(self) -> str:
        return (
            f"buyer {self.buyer} {self.completion_id}: {self.content_chunks} chunks, "
            f"finish {self.finish_reason}, usage {self.usage}, error {self.error!r}"
        )


def stream_once(client: OpenAI, outcome: Outcome, seed: int) -> Outcome:
    try:
        stream = client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_tokens=MAX_TOKENS,
            temperature=0.8,
            seed=seed,
            stream=True,
            stream_options={"include_usage": True},
            logprobs=outcome.counts_tokens,
        )
        for chunk in stream:
            outcome.completion_id = chunk.id
            if chunk.usage is not None:
                outcome.usage = chunk.usage
            for choice in chunk.choices:
                outcome.content_chunks += bool(choice.delta.content)
                if choice.logprobs is not None:
                    outcome.tokens += len(choice.logprobs.content or [])
                if choice.finish_reason is not None:
                    outcome.finish_reason = choice.finish_reason
    except openai.APIError as error:
        outcome.error = error
    return outcome


def buy(
    base_url: str, key: str, index: int, *, until: threading.Event, deadline: float
) -> list[Outcome]:
    """One buyer: streams one after another, at least REQUESTS_PER_BUYER of them and on until
    ``until`` is set or the ``deadline`` passes. A request refused for want of a free miner is
    tried again after a short pause. Even buyers count tokens via logprobs."""
    outcomes: list[Outcome] = []
    served = 0
    with OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=STREAM_TIMEOUT_S) as client:
        while (served < REQUESTS_PER_BUYER or not until.is_set()) and time.monotonic() < deadline:
            outcome = Outcome(index, counts_tokens=index % 2 == 0)
            outcomes.append(stream_once(client, outcome, seed=index * 1000 + len(outcomes)))
            if refused(outcome):
                time.sleep(REFUSED_PAUSE_S)  # a client honouring a (shortened) Retry-After
            else:
                served += 1
    return outcomes


def refused(outcome: Outcome) -> bool:
    return isinstance(outcome.error, openai.APIStatusError) and outcome.error.status_code == 503


class Chaos:
    """Kills a random miner (SIGKILL) at random moments and restarts it with the same key file,
    so it comes back as the same identity. One miner at most is down at a time, so the
    marketplace keeps serving: each kill but the first waits until the last victim is back."""

    def __init__(
        self,
        coordinator: Coordinator,
        tmp: Path,
        models: dict[str, Path],
        miners: dict[str, Process],
        *,
        identities: dict[str, str],
        seed: int,
    ) -> None:
        self._coordinator = coordinator
        self._tmp = tmp
        self._models = models
        self.miners = miners  # name -> its current process
        self._identities = identities  # name -> miner id
        self._rng = random.Random(seed)
        self.kills: list[str] = []  # the victims, in order
        self.stop = threading.Event()  # set by the test: no more kills
        self.done = threading.Event()  # the planned kills are over (the last victim restarting)
        self.rejoined: dict[str, str] = {}  # victim -> the id its restart connected as

    def run(self) -> None:
        try:
            for _ in range(KILLS):
                if self.stop.wait(self._rng.uniform(1.0, 2.5)) or not self._all_connected():
                    break
                victim = self._victim()
                self.miners[victim].kill()
                self.kills.append(victim)
                # Always restarted, even when told to stop, so every miner comes back.
                time.sleep(self._rng.uniform(0.2, 1.0))
                self.miners[victim].log.rename(self._tmp / f"miner-{victim}.{len(self.kills)}.log")
                self.miners[victim] = start(self._coordinator, self._tmp, self._models, victim)
        finally:
            self.done.set()

    def _all_connected(self) -> bool:
        """Waits until every miner's current process has connected, noting the identity each
        restarted one came back as; False if told to stop first."""
        while not self.stop.is_set():
            ids = {
                name: miner_identity(miner) if miner.popen.poll() is None else None
                for name, miner in self.miners.items()
            }
            if all(ids.values()):
                self.rejoined.update({name: ids[name] or "" for name in self.kills})
                return True
            self.stop.wait(0.1)
        return False

    def _victim(self) -> str:
        """A miner drawn in proportion to the jobs it finished in the last seconds: the router
        favours fast miners, and killing an idle one would cut nothing."""
        rows = fetch(
            self._coordinator.database_url,
            "SELECT miner_id, count(*) AS n FROM coordinator_jobs "
            "WHERE created_at > now() - interval '3 seconds' GROUP BY miner_id",
        )
        served = {row["miner_id"]: int(row["n"]) for row in rows}
        names = sorted(self.miners)
        weights = [served.get(self._identities[name], 0) for name in names]
        if not any(weights):
            return self._rng.choice(names)
        return self._rng.choices(names, weights)[0]


def start(coordinator: Coordinator, tmp: Path, models: dict[str, Path], name: str) -> Process:
    return start_miner(
        coordinator,
        tmp,
        name=name,
        models=models,
        variant=MINER_VARIANT,
        max_concurrency=MINER_SLOTS,
    )


@pytest.fixture
def chaotic(
    database_url: str, model_dirs: dict[str, Path], tmp_path: Path
) -> Iterator[Coordinator]:
    """A coordinator of its own, spot checks off so that billing is exact, no miners yet."""
    # Miners are killed, not stopped: graceful shutdown is not under test and drains take seconds.
    with tiny_coordinator(
        tmp_path, database_url=database_url, model_dirs=model_dirs, kill_miners=True
    ) as running:
        yield running


def job_id_of(completion_id: str) -> str:
    # The completion id is a prefix and the hex part of the job id (coordinator/billing/job_log.py).
    return "job-" + completion_id.split("-", 1)[1]


def assert_clean(outcome: Outcome) -> None:
    """Completed, refused before output (503), or cut by an SSE error event after output."""
    if outcome.completed:
        return
    error = outcome.error
    assert error is not None, f"a stream ended without a finish or an error: {outcome.describe()}"
    assert not isinstance(error, openai.APIConnectionError), f"a hang: {outcome.describe()}"
    if isinstance(error, openai.APIStatusError):
        assert error.status_code == 503, outcome.describe()
        assert int(error.response.headers["retry-after"]) >= 1
        assert outcome.completion_id is None
        return
    # The SDK raises the base APIError for an error event inside a stream.
    assert type(error) is openai.APIError, outcome.describe()
    assert outcome.completion_id is not None, outcome.describe()
    body: Any = error.body
    assert isinstance(body, dict) and body.get("code") == "upstream_error", outcome.describe()


def test_buyers_are_served_or_cleanly_refused_and_billed_exactly_while_miners_die(
    chaotic: Coordinator, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    coordinator = chaotic
    models = {"tiny": model_dirs["tiny"]}
    miners = {name: start(coordinator, tmp_path, models, name) for name in MINERS}
    keys = [
        create_key(coordinator.database_url, credits_micro=CREDITS, name=f"buyer-{i}")
        for i in range(BUYERS)
    ]
    wait_for_miners(coordinator, keys[0][1], "tiny", len(MINERS))
    identities = {name: miner_identity(miner) or "" for name, miner in miners.items()}
    before = balances(coordinator.database_url)
    seed = random.randrange(2**32)
    chaos = Chaos(coordinator, tmp_path, models, miners, identities=identities, seed=seed)
    chaos_thread = threading.Thread(target=chaos.run, name="chaos")

    began = time.monotonic()
    chaos_thread.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(BUYERS) as pool:
            futures = [
                pool.submit(
                    buy,
                    coordinator.base_url,
                    key,
                    index,
                    until=chaos.done,
                    deadline=began + BUYING_S,
                )
                for index, (_, key) in enumerate(keys)
            ]
            _, pending = concurrent.futures.wait(futures, timeout=DEADLINE_S)
            assert not pending, f"buyers still busy after {DEADLINE_S} s (seed {seed})"
    finally:
        chaos.stop.set()
        chaos_thread.join()
    outcomes = [outcome for future in futures for outcome in future.result()]
    context = f"(seed {seed}, kills {chaos.kills})\n" + "\n".join(o.describe() for o in outcomes)

    # Every request completed or ended with a clean error; the chaos really cut streams.
    for outcome in outcomes:
        assert_clean(outcome)
    completed = [o for o in outcomes if o.completed]
    cut = [o for o in outcomes if o.error is not None and o.completion_id is not None]
    print(
        f"chaos (seed {seed}): {len(chaos.kills)} kills in {time.monotonic() - began:.1f} s; "
        f"{len(completed)} streams completed, {len(cut)} cut, {sum(map(refused, outcomes))} "
        "refused (503)"
    )
    assert len(chaos.kills) == KILLS, context
    assert completed and cut, context

    # Every buyer paid exactly for the tokens it received, and nothing for refused requests.
    after = balances(coordinator.database_url)
    jobs = {
        row["job_id"]: row
        for row in fetch(coordinator.database_url, "SELECT * FROM coordinator_jobs")
    }
    started = {job_id_of(o.completion_id): o for o in outcomes if o.completion_id is not None}
    assert set(started) == set(jobs), context
    for job_id, outcome in started.items():
        job = jobs[job_id]
        delivered = job["completion_tokens"]
        assert job["key_id"] == keys[outcome.buyer][0]
        assert job["cost"] == job["prompt_tokens"] * INPUT_PRICE + delivered * OUTPUT_PRICE
        assert delivered >= outcome.content_chunks, outcome.describe()
        if outcome.counts_tokens:
            assert delivered == outcome.tokens, outcome.describe()
        if outcome.completed:
            assert outcome.usage is not None
            assert outcome.usage.completion_tokens == delivered, outcome.describe()
            assert outcome.usage.prompt_tokens == job["prompt_tokens"]
            assert (outcome.usage.model_extra or {})["cost_micro"] == job["cost"]
            assert job["finish_reason"] == outcome.finish_reason
        else:
            assert job["finish_reason"] is None, outcome.describe()
            assert delivered <= MAX_TOKENS, outcome.describe()
    for key_id, _ in keys:
        paid = before[f"buyer:{key_id}"] - after[f"buyer:{key_id}"]
        assert paid == sum(job["cost"] for job in jobs.values() if job["key_id"] == key_id)

    # Miners and the operator got exactly what buyers paid; nothing is left in escrow.
    total = sum(job["cost"] for job in jobs.values())
    miners_gain = sum(after[k] - before.get(k, 0) for k in after if k.startswith("miner:"))
    fee_gain = after.get("fee", 0) - before.get("fee", 0)
    assert fee_gain == sum(job["cost"] * FEE_BPS // 10_000 for job in jobs.values())
    assert miners_gain + fee_gain == total
    assert after.get("escrow", 0) == 0
    assert open_holds(coordinator.database_url) == 0
    assert sum(after.values()) == 0

    # Restarted miners came back as themselves, and only these identities were ever paid.
    assert chaos.rejoined and all(identities[n] == i for n, i in chaos.rejoined.items()), context
    assert {job["miner_id"] for job in jobs.values()} <= set(identities.values())

    audited = ledger_audit(coordinator)
    assert audited.returncode == 0, audited.stdout + audited.stderr
