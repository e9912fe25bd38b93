"""Crash drill: kill -9 the coordinator under load, restart it, and check the books.

Every request that was answered had its settlement committed first, so it must be in the log;
the restarted log must extend every checkpoint signed before the crash; holds of requests that
died with the process are released; balances still follow from the entries.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai
from openai import OpenAI

from ledger.checkpoint import parse_signed_checkpoint, parse_verifier_key
from ledger.entry import EntryKind, decode_entry
from ledger.merkle import leaf_hash, root
from tests.e2e.conftest import price_args
from tests.e2e.harness import (
    create_key,
    fetch,
    http,
    start_coordinator,
    start_miner,
    wait_for_miners,
)
from tests.e2e.test_ledger_api import ledger_url, raw_entries


def latest_checkpoint(base: str, vkey: str, origin: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(base + "/ledger/checkpoint", timeout=10) as response:
        checkpoint = parse_signed_checkpoint(
            response.read(), parse_verifier_key(vkey), origin=origin
        )
    return checkpoint.size, checkpoint.root_hash


def test_kill_9_under_load_loses_no_acknowledged_entry(
    database_url: str, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    models = {"tiny": model_dirs["tiny"]}
    first = start_coordinator(
        tmp_path, database_url=database_url, models=models, extra=price_args()
    )
    for name in ("a", "b"):
        start_miner(first, tmp_path, name=name, models=models, max_concurrency=4)
    _, key = create_key(database_url, credits_micro=50_000_000)
    wait_for_miners(first, key, "tiny", 2)
    _, _, key_info = http(ledger_url(first, "/ledger/key"))

    acknowledged: list[str] = []
    stop = threading.Event()

    def buyer(_: int) -> None:
        sdk = OpenAI(base_url=first.base_url, api_key=key, max_retries=0, timeout=20)
        while not stop.is_set():
            try:
                reply = sdk.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "go"}], max_tokens=3
                )
            except (openai.APIError, openai.APIConnectionError):
                continue
            acknowledged.append(reply.id)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(buyer, i) for i in range(6)]
        time.sleep(4)
        before = latest_checkpoint(
            ledger_url(first, ""), key_info["verifier_key"], key_info["origin"]
        )
        first.process.kill()  # SIGKILL: no shutdown, no final checkpoint
        stop.set()
        for future in futures:
            future.result(timeout=60)
    assert len(acknowledged) >= 5, "the load never got going"
    for miner in first.miners:
        miner.stop()

    (tmp_path / "after").mkdir()
    second = start_coordinator(
        tmp_path / "after",
        database_url=database_url,
        models=models,
        extra=[*price_args(), "--ledger-key", str(tmp_path / "coordinator" / "ledger.key")],
    )
    try:
        _, _, snapshot = http(ledger_url(second, "/ledger/balances"))
        size = snapshot["size"]
        deadline = time.monotonic() + 10
        after = latest_checkpoint(
            ledger_url(second, ""), key_info["verifier_key"], key_info["origin"]
        )
        while after[0] < size and time.monotonic() < deadline:
            time.sleep(0.2)
            after = latest_checkpoint(
                ledger_url(second, ""), key_info["verifier_key"], key_info["origin"]
            )
        leaves = raw_entries(second, 0, after[0])
        hashes = [leaf_hash(leaf) for leaf in leaves]
        # The new checkpoint extends the one signed before the crash, and commits to the log.
        assert root(hashes[: before[0]]) == before[1]
        assert root(hashes) == after[1]
        entries = [decode_entry(leaf) for leaf in leaves]
        holds = {e.reference: e.hold_id for e in entries if e.kind is EntryKind.HOLD}
        closing = {e.hold_id for e in entries if e.kind in (EntryKind.SETTLE, EntryKind.RELEASE)}
        for completion_id in acknowledged:
            job_id = "job-" + completion_id.removeprefix("cmpl-")
            reference = hashlib.sha256(job_id.encode()).digest()
            assert reference in holds, f"acknowledged {completion_id} has no hold in the log"
            assert holds[reference] in closing, f"acknowledged {completion_id} was never settled"
        audited = subprocess.run(
            [
                str(Path(sys.executable).parent / "meshmint-ledger"),
                "audit",
                "--coordinator",
                ledger_url(second, ""),
                "--verifier-key",
                key_info["verifier_key"],
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert audited.returncode == 0, audited.stdout + audited.stderr
        open_holds = fetch(
            database_url, "SELECT count(*) AS n FROM ledger_holds WHERE status = 'open'"
        )
        assert open_holds[0]["n"] == 0
        assert "holds left open by a previous run" in second.process.output() or all(
            hold in closing for hold in holds.values()
        )
    finally:
        second.process.stop()
