"""Honest miners that batch are never slashed: every job re-scored, batches of 16, real traffic.

Real processes throughout: the coordinator CLI with ``--spot-check-floor 1`` (every job of every
miner is re-scored by another), three honest miner CLIs at ``--max-concurrency 16``, 48 buyers
at once through the official `openai` SDK, PostgreSQL. A batched forward pass is not bit for bit
an unbatched one, and the scorer's teacher-forced pass batches too; the judge's tolerances must
absorb that for every job.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from openai import OpenAI

from tests.e2e.conftest import price_args
from tests.e2e.harness import (
    create_key,
    fetch,
    open_holds,
    running_coordinator,
    start_miner,
    wait_for_miners,
)

MINERS = ("alice", "bob", "carol")
BATCH = 16
BUYERS = 48


def test_three_honest_batching_miners_pass_every_check(
    database_url: str, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    models = {"tiny": model_dirs["tiny"]}
    with running_coordinator(
        tmp_path,
        database_url=database_url,
        models=models,
        extra=[*price_args(), "--spot-check-floor", "1"],
    ) as coordinator:
        for name in MINERS:
            start_miner(coordinator, tmp_path, name=name, models=models, max_concurrency=BATCH)
        _, key = create_key(database_url, credits_micro=50_000_000)
        wait_for_miners(coordinator, key, "tiny", len(MINERS))
        client = OpenAI(base_url=coordinator.base_url, api_key=key, max_retries=0, timeout=120)

        def buy(index: int) -> int:
            # Mixed prompts, lengths and sampling, all at once: the miners batch them.
            stream = client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": f"Story {index}: " + "la " * (index % 9)}],
                max_tokens=12 + index % 20,
                temperature=(0.0, 0.7, 1.0, 1.3)[index % 4],
                top_p=0.9 if index % 3 == 0 else 1.0,
                seed=index,
                stream=True,
            )
            return sum(1 for _ in stream)

        with ThreadPoolExecutor(BUYERS) as pool:
            chunks = list(pool.map(buy, range(BUYERS)))
        assert all(count > 0 for count in chunks)

        jobs = fetch(database_url, "SELECT job_id, miner_id FROM coordinator_jobs")
        assert len(jobs) >= BUYERS

        def decided() -> list[dict[str, object]]:
            return fetch(
                database_url,
                "SELECT job_id, outcome, reasons FROM verification_checks "
                "WHERE outcome <> 'skipped'",
            )

        deadline = time.monotonic() + 240
        while len({row["job_id"] for row in decided()}) < len(jobs):
            assert time.monotonic() < deadline, f"{len(decided())} of {len(jobs)} jobs decided"
            time.sleep(0.5)
        checks = decided()
        logs = [miner.output() for miner in coordinator.miners]

    failed = [row for row in checks if row["outcome"] != "passed"]
    assert not failed, failed
    penalties = fetch(
        database_url, "SELECT count(*) AS n FROM ledger_entries WHERE kind IN ('slash', 'refund')"
    )
    assert penalties[0]["n"] == 0
    assert open_holds(database_url) == 0
    # The miners really batched: each engine logs every new largest decode batch.
    batches = [
        max((int(n) for n in re.findall(r"(\d+) jobs decoded in one batch", log)), default=0)
        for log in logs
    ]
    assert max(batches) >= BATCH // 2, batches
