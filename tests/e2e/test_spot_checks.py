"""Spot checks end to end: a cheating miner among honest ones is caught, slashed and banned.

Real processes throughout: the coordinator CLI, three miner CLIs (two honest, one whose engine
substitutes a fifth of its tokens: tests/e2e/variant_miner.py), the official `openai` SDK as the
buyer, PostgreSQL, and the installed `meshmint-ledger audit` over the coordinator's public API.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from tests.e2e.conftest import price_args
from tests.e2e.harness import (
    Coordinator,
    create_key,
    fetch,
    ledger_audit,
    running_coordinator,
    start_miner,
    wait_for_miners,
)

MESSAGES = [{"role": "user", "content": "Count with me, then tell a story."}]


def _sdk(coordinator: Coordinator, key: str) -> OpenAI:
    return OpenAI(base_url=coordinator.base_url, api_key=key, max_retries=0, timeout=60)


def _miner_id(log: str) -> str:
    marker = " as "
    for line in log.splitlines():
        if "connected to" in line and marker in line:
            return line.split(marker, 1)[1].split()[0]
    raise AssertionError(f"no miner id in the log:\n{log[-2000:]}")


def _wait(condition: object, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def checked(
    database_url: str, model_dirs: dict[str, Path], tmp_path: Path
) -> Iterator[Coordinator]:
    """A coordinator with spot checks on, as shipped (the shared fixtures turn them off)."""
    with running_coordinator(
        tmp_path, database_url=database_url, models={"tiny": model_dirs["tiny"]}, extra=price_args()
    ) as running:
        yield running


def test_a_cheating_miner_is_caught_slashed_and_banned_while_honest_ones_are_not(
    checked: Coordinator, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    coordinator = checked
    models = {"tiny": model_dirs["tiny"]}
    honest = [start_miner(coordinator, tmp_path, name=n, models=models) for n in ("alice", "bob")]
    cheat = start_miner(
        coordinator, tmp_path, name="mallory", models=models, variant="substitute:0.2"
    )
    key_id, key = create_key(coordinator.database_url, credits_micro=10_000_000)
    wait_for_miners(coordinator, key, "tiny", 3)
    cheat_id = _miner_id(cheat.output())
    honest_ids = {_miner_id(process.output()) for process in honest}
    client = _sdk(coordinator, key)

    def cheat_jobs() -> list[dict[str, object]]:
        return fetch(
            coordinator.database_url,
            "SELECT job_id, cost FROM coordinator_jobs WHERE miner_id = $1",
            cheat_id,
        )

    def banned() -> bool:
        rows = fetch(
            coordinator.database_url,
            "SELECT banned FROM verification_identities WHERE miner_id = $1",
            cheat_id,
        )
        return bool(rows and rows[0]["banned"])

    # Real traffic until the cheat has been banned (every job of a new identity is checked).
    for _ in range(40):
        if banned():
            break
        try:
            client.chat.completions.create(
                model="tiny", messages=MESSAGES, max_tokens=24, temperature=0.8
            )
        except openai.APIStatusError as error:
            # A job the cheat was streaming when it was banned ends with the ban (502).
            assert error.status_code == 502 and "banned" in str(error), error
    _wait(banned, "the cheat's ban")
    served_by_cheat = {row["job_id"] for row in cheat_jobs()}
    assert served_by_cheat, "the cheat never got a job"

    # It stops receiving jobs: everything after the ban is served by honest miners.
    for _ in range(4):
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8)
    assert {row["job_id"] for row in cheat_jobs()} == served_by_cheat
    wait_for_miners(coordinator, key, "tiny", 2)

    checks = fetch(coordinator.database_url, "SELECT * FROM verification_checks ORDER BY id")
    confirmed = [c for c in checks if c["outcome"] == "confirmed"]
    assert {c["miner_id"] for c in confirmed} == {cheat_id}
    assert len(confirmed) == 2  # the second confirmed failure bans
    # The buyer of each failed job got back everything it paid for that job: from the cheat, and
    # once the cheat was slashed empty, minted back from issuance (memo names the job).
    costs = {row["job_id"]: row["cost"] for row in cheat_jobs()}
    for check in confirmed:
        assert check["refunded"] == costs[check["job_id"]] > 0
        refunds = fetch(
            coordinator.database_url,
            "SELECT sum(e.amount) AS total FROM ledger_entries e "
            "JOIN ledger_accounts a ON a.id = e.credit "
            "WHERE e.kind IN ('refund', 'mint') AND a.kind = 'buyer' AND a.owner = $1 "
            "AND e.memo LIKE '%' || $2 || '%'",
            key_id,
            check["job_id"],
        )
        assert refunds[0]["total"] == check["refunded"]

    # Honest miners were checked and never slashed.
    identities = {
        row["miner_id"]: row
        for row in fetch(coordinator.database_url, "SELECT * FROM verification_identities")
    }
    for miner_id in honest_ids:
        assert identities[miner_id]["confirmed_failures"] == 0
        assert identities[miner_id]["checks_passed"] >= 1 or identities[miner_id]["scorings"] >= 1
    slashed = fetch(
        coordinator.database_url,
        "SELECT DISTINCT a.owner FROM ledger_entries e JOIN ledger_accounts a ON a.id = e.debit "
        "WHERE e.kind IN ('slash', 'refund') AND a.kind = 'miner'",
    )
    assert {row["owner"] for row in slashed} <= {cheat_id}

    # The cheat was told why, and was refused when it came back.
    _wait(lambda: "banned" in cheat.output(), "the cheat's log to mention its ban", timeout=30)
    assert "spot check" in cheat.output()

    # The operator's view.
    report = subprocess.run(
        [
            str(Path(sys.executable).parent / "meshmint-coordinator"),
            "checks",
            "--database-url",
            coordinator.database_url,
            "--miner",
            cheat_id,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert cheat_id[:16] in report and "banned" in report and "confirmed" in report
    with urllib.request.urlopen(coordinator.base_url.removesuffix("/v1") + "/metrics") as response:
        metrics = response.read().decode()
    assert (
        f'meshmint_spot_checks_total{{miner="{cheat_id[:16]}",outcome="confirmed"}} 2.0' in metrics
    )

    # The ledger still audits clean, and no hold is left open.
    audited = ledger_audit(coordinator)
    assert audited.returncode == 0, audited.stdout + audited.stderr
    open_holds = fetch(
        coordinator.database_url, "SELECT count(*) AS n FROM ledger_holds WHERE status = 'open'"
    )
    assert open_holds[0]["n"] == 0
