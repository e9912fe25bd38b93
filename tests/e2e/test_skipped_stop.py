"""A miner that pads its answers past a stop token is caught end to end by the skipped-stop rule.

Real processes: the coordinator CLI with a catalog, two honest miner CLIs and one whose engine
goes on past the first stop token the reference sampler picks (``skip-stop`` in
tests/e2e/variant_miner.py), the `openai` SDK as the buyer, PostgreSQL. The catalog raises
``margin_limit`` so far that no margin rule can fail anything: what catches the padding miner
is the stop margins its scorers send and the judge's ``stop_margin_limit`` alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from coordinator.verification.judge import Thresholds
from tests.e2e.conftest import INPUT_PRICE, OUTPUT_PRICE
from tests.e2e.harness import (
    Coordinator,
    create_key,
    fetch,
    miner_identity,
    running_coordinator,
    start_miner,
    wait_for_miners,
)

QUESTIONS = ("Say nothing.", "Bye", "What is 2+2?", "Count with me, then tell a story.")
REASON = "would have stopped at position"


@pytest.fixture
def checked(
    database_url: str, model_dirs: dict[str, Path], tmp_path: Path
) -> Iterator[Coordinator]:
    """A coordinator with spot checks on whose only working rule for a padding miner is the
    skipped-stop rule (margins may be anything up to 1000)."""
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(
        "[[models]]\n"
        'name = "tiny"\n'
        f'path = "{model_dirs["tiny"]}"\n'
        f'input_price_per_million = "{INPUT_PRICE}"\n'
        f'output_price_per_million = "{OUTPUT_PRICE}"\n'
        "[models.verification]\n"
        "margin_limit = 1000.0\n"
    )
    # Every job checked, not only a new identity's first ten: the padder is caught at its first
    # checked job that skipped a stop by more than the limit, whenever that comes.
    extra = ["--catalog", str(catalog), "--spot-check-floor", "1"]
    with running_coordinator(
        tmp_path, database_url=database_url, models={}, extra=extra
    ) as running:
        yield running


def test_a_miner_that_goes_on_past_a_stop_is_confirmed_by_the_stop_rule_alone(
    checked: Coordinator, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    coordinator, url = checked, checked.database_url
    models = {"tiny": model_dirs["tiny"]}
    # One slot each and three requests at a time: the router prefers faster miners, and the
    # padder (no KV cache) is slower, but a busy miner takes no job, so it gets a third of them.
    honest = [
        start_miner(coordinator, tmp_path, name=name, models=models, max_concurrency=1)
        for name in ("alice", "bob")
    ]
    padder = start_miner(
        coordinator, tmp_path, name="mallory", models=models, variant="skip-stop", max_concurrency=1
    )
    _, key = create_key(url, credits_micro=10_000_000)
    wait_for_miners(coordinator, key, "tiny", 3)
    padder_id = miner_identity(padder)
    honest_ids = {miner_identity(process) for process in honest}
    assert padder_id is not None and None not in honest_ids

    def caught() -> list[dict[str, object]]:
        return fetch(
            url,
            "SELECT * FROM verification_checks WHERE miner_id = $1 AND outcome = 'confirmed'",
            padder_id,
        )

    def honest_checks() -> list[dict[str, object]]:
        return fetch(
            url,
            "SELECT c.outcome, j.finish_reason FROM verification_checks c"
            " JOIN coordinator_jobs j USING (job_id) WHERE c.miner_id = ANY($1::text[])",
            sorted(str(miner) for miner in honest_ids),
        )

    def done() -> bool:
        stopped = [row for row in honest_checks() if row["finish_reason"] == "stop"]
        return bool(caught()) and bool(stopped)

    def checks_caught_up() -> bool:
        [row] = fetch(
            url,
            "SELECT (SELECT count(*) FROM verification_checks) AS checks, (SELECT count(*)"
            " FROM coordinator_jobs WHERE finish_reason IS NOT NULL) AS jobs",
        )
        return bool(row["checks"] >= row["jobs"])

    def ask(number: int) -> None:
        with OpenAI(base_url=coordinator.base_url, api_key=key, max_retries=0, timeout=60) as sdk:
            try:
                sdk.chat.completions.create(
                    model="tiny",
                    messages=[{"role": "user", "content": QUESTIONS[number % len(QUESTIONS)]}],
                    max_tokens=96,
                    temperature=1.0,
                )
            except openai.APIStatusError as error:
                # A second confirmed failure bans the padder, ending the job it was serving.
                assert error.status_code == 502 and "banned" in str(error), error

    # About two thirds of the padder's answers meet a stop token, which it skips by more than
    # the limit about twice in three: some three rounds. Each round waits for its checks (they
    # run in the background), so traffic never runs far ahead of them.
    with ThreadPoolExecutor(max_workers=3) as pool:
        for round_ in range(40):
            if done():
                break
            list(pool.map(ask, range(3 * round_, 3 * round_ + 3)))
            deadline = time.monotonic() + 30
            while not checks_caught_up() and time.monotonic() < deadline:
                time.sleep(0.1)
    deadline = time.monotonic() + 30
    while not done() and time.monotonic() < deadline:
        time.sleep(0.2)
    [first, *_] = caught()
    reasons = str(first["reasons"])
    assert REASON in reasons and "the miner went on" in reasons, reasons
    assert f"> {Thresholds().stop_margin_limit:g})" in reasons  # the default limit, untouched
    assert "disagree" not in reasons  # no margin rule could have caught it
    jobs = fetch(url, "SELECT * FROM coordinator_jobs WHERE job_id = $1", first["job_id"])
    assert jobs[0]["miner_id"] == padder_id
    deadline = time.monotonic() + 30
    while REASON not in padder.output() and time.monotonic() < deadline:
        time.sleep(0.2)  # the slash notice that tells it why is on its way
    assert REASON in padder.output()

    # Honest miners' checked jobs, those that ended on a stop token included, all passed.
    checks = honest_checks()
    assert {row["outcome"] for row in checks} <= {"passed", "skipped"}, checks
    assert any(row["finish_reason"] == "stop" and row["outcome"] == "passed" for row in checks)
