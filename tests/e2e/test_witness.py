"""Every miner is a witness: after paid requests the real miner process holds verified receipts
for exactly what the ledger credited it, has advanced its checkpoint through consistency proofs,
and `meshmint-miner earnings --json` reports the same."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from miner.config import default_witness_dir
from tests.e2e.conftest import price_args
from tests.e2e.harness import (
    BIN,
    Coordinator,
    balances,
    create_key,
    start_coordinator,
    start_miner,
    wait_for_miners,
)

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Witness this."}]


@pytest.fixture(scope="module")
def witnessed(
    module_database_url: str, model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Coordinator, Path]]:
    """A coordinator with one miner; yields it and the miner's key file."""
    tmp = tmp_path_factory.mktemp("witness")
    coordinator = start_coordinator(
        tmp,
        database_url=module_database_url,
        models={"tiny": model_dirs["tiny"]},
        extra=price_args(),
    )
    try:
        start_miner(coordinator, tmp, name="carol", models={"tiny": model_dirs["tiny"]})
        _, probe = create_key(module_database_url, credits_micro=0, name="probe")
        wait_for_miners(coordinator, probe, "tiny", 1)
        yield coordinator, tmp / "carol.key"
    finally:
        for miner in coordinator.miners:
            miner.stop()
        coordinator.process.stop()


def receipts(key: Path, count: int, timeout: float = 20) -> list[dict[str, Any]]:
    path = default_witness_dir(key) / "receipts.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return [json.loads(line) for line in lines]
        time.sleep(0.1)
    raise AssertionError(f"{path} never held {count} receipts")


def earnings(key: Path) -> dict[str, Any]:
    done = subprocess.run(
        [str(BIN / "meshmint-miner"), "earnings", "--key", str(key), "--json"],
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def test_paid_requests_leave_verified_receipts_matching_the_ledger(
    witnessed: tuple[Coordinator, Path],
) -> None:
    coordinator, key = witnessed
    _, api_key = create_key(coordinator.database_url, credits_micro=10_000_000)
    client = OpenAI(base_url=coordinator.base_url, api_key=api_key, max_retries=0, timeout=60)
    before = balances(coordinator.database_url)

    client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    [first] = receipts(key, 1)
    middle = balances(coordinator.database_url)
    [miner] = [name for name in middle if name.startswith("miner:")]
    assert first["amount"] == middle[miner] - before.get(miner, 0) > 0

    client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0)
    stored = receipts(key, 2)
    after = balances(coordinator.database_url)
    assert sum(r["amount"] for r in stored) == after[miner] - before.get(miner, 0)
    assert miner == f"miner:{_miner_id(key)}"

    report = earnings(key)
    assert report["verified"] is True and report["alarms"] == 0
    assert report["total_credited"] == report["pending"] == after[miner] - before.get(miner, 0)
    assert report["jobs"] == 2 and report["matured"] == 0
    assert [r["job_id"] for r in report["receipts"]] == [r["job_id"] for r in stored]
    # The second receipt came under a newer checkpoint, which the miner pinned only after a
    # verified consistency proof from the first.
    assert stored[1]["tree_size"] > stored[0]["tree_size"]
    assert report["checkpoint"]["size"] == stored[1]["tree_size"]
    log = coordinator.miners[0].output()
    assert "credit verified" in log and "ledger fork or tampering" not in log


def _miner_id(key: Path) -> str:
    done = subprocess.run(
        [str(BIN / "meshmint-miner"), "id", "--key", str(key)],
        capture_output=True,
        check=True,
        timeout=60,
    )
    return done.stdout.decode().strip()
