"""A miner that makes up top_logprobs alternatives is caught end to end by its scorers.

Real processes: the coordinator CLI with every job checked (``--spot-check-floor 1``), two
honest miner CLIs and one that reports its real tokens but a made-up last alternative
(``fake-top`` in tests/e2e/variant_miner.py), the `openai` SDK as the buyer asking for
``top_logprobs``, PostgreSQL. Two scorers must agree before a failure is confirmed.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
from openai import OpenAI

from tests.e2e.conftest import price_args
from tests.e2e.harness import (
    create_key,
    fetch,
    miner_identity,
    running_coordinator,
    start_miner,
    wait_for_miners,
)

REASON = "is not a top token"


def test_made_up_alternatives_are_confirmed_and_honest_ones_pass(
    database_url: str, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    models = {"tiny": model_dirs["tiny"]}
    extra = [*price_args(), "--spot-check-floor", "1"]
    with running_coordinator(
        tmp_path, database_url=database_url, models=models, extra=extra
    ) as coordinator:
        honest = [
            start_miner(coordinator, tmp_path, name=name, models=models, max_concurrency=1)
            for name in ("alice", "bob")
        ]
        faker = start_miner(
            coordinator,
            tmp_path,
            name="mallory",
            models=models,
            variant="fake-top",
            max_concurrency=1,
        )
        _, key = create_key(database_url, credits_micro=10_000_000)
        wait_for_miners(coordinator, key, "tiny", 3)
        faker_id = miner_identity(faker)
        honest_ids = sorted(str(miner_identity(process)) for process in honest)

        def checks(*miner_ids: str | None) -> list[dict[str, object]]:
            return fetch(
                database_url,
                "SELECT outcome, reasons FROM verification_checks WHERE miner_id = ANY($1::text[])"
                " AND outcome <> 'skipped'",
                list(miner_ids),
            )

        def ask(number: int) -> None:
            with OpenAI(
                base_url=coordinator.base_url, api_key=key, max_retries=0, timeout=60
            ) as sdk:
                try:
                    sdk.chat.completions.create(
                        model="tiny",
                        messages=[{"role": "user", "content": f"Tell story {number}."}],
                        max_tokens=12,
                        temperature=1.0,
                        logprobs=True,
                        top_logprobs=5,
                    )
                except openai.APIStatusError as error:
                    # A second confirmed failure bans the faker, ending the job it was serving.
                    assert error.status_code == 502 and "banned" in str(error), error

        # Three at a time: each miner has one slot, so all three get jobs.
        with ThreadPoolExecutor(max_workers=3) as pool:
            for round_ in range(20):
                if any(row["outcome"] == "confirmed" for row in checks(faker_id)) and checks(
                    *honest_ids
                ):
                    break
                list(pool.map(ask, range(3 * round_, 3 * round_ + 3)))
                time.sleep(0.5)
        deadline = time.monotonic() + 60
        while not any(r["outcome"] == "confirmed" for r in checks(faker_id)):
            assert time.monotonic() < deadline, checks(faker_id)
            time.sleep(0.3)
        honest_checks = checks(*honest_ids)

    confirmed = [row for row in checks(faker_id) if row["outcome"] == "confirmed"]
    assert REASON in str(confirmed[0]["reasons"]), confirmed[0]
    assert honest_checks and {row["outcome"] for row in honest_checks} == {"passed"}, honest_checks
