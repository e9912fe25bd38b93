"""The operator's commands against a coordinator on its embedded PostgreSQL, while it runs."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from tests.e2e.harness import BIN, Coordinator, Process, _wait_for


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def buyer_balances(data_dir: Path) -> dict[str, int]:
    out = run(str(BIN / "meshmint-ledger"), "balance", "--json", "--data-dir", str(data_dir))
    assert out.returncode == 0, out.stderr
    return {
        row["owner"]: row["balance"] for row in json.loads(out.stdout) if row["kind"] == "buyer"
    }


def test_keys_and_credits_on_the_embedded_database(
    embedded_data_dir: Path, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    data_dir = embedded_data_dir / "coordinator"
    coordinator = BIN / "meshmint-coordinator"
    log = tmp_path / "coordinator.log"
    popen = subprocess.Popen(
        [
            str(coordinator),
            "serve",
            "--data-dir",
            str(data_dir),
            "--http",
            "127.0.0.1:0",
            "--grpc",
            "127.0.0.1:0",
            "--model",
            f"tiny={model_dirs['tiny']}",
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    server = Process(popen, log)
    try:
        base_url = _wait_for(log, r"buyers (http://\S+/v1),", popen, timeout=60).group(1)
        created = run(
            str(coordinator),
            "keys",
            "create",
            "--name",
            "carol",
            "--credits",
            "1.5",
            "--data-dir",
            str(data_dir),
        )
        assert created.returncode == 0, created.stderr
        secret = created.stdout.strip()
        assert secret.startswith("mm-") and "\n" not in secret
        key_id = re.search(r"created key (key_[0-9a-f]+)", created.stderr)
        assert key_id is not None, created.stderr
        assert buyer_balances(data_dir) == {key_id.group(1): 1_500_000}

        added = run(
            str(coordinator), "credits", "add", key_id.group(1), "2", "--data-dir", str(data_dir)
        )
        assert added.returncode == 0 and "3.500000" in added.stdout
        assert buyer_balances(data_dir) == {key_id.group(1): 3_500_000}
        listed = run(str(coordinator), "keys", "list", "--data-dir", str(data_dir))
        assert listed.returncode == 0, listed.stderr
        [row] = [line for line in listed.stdout.splitlines() if key_id.group(1) in line]
        assert "carol" in row and "active" in row and row.endswith("3.500000")
        assert secret not in listed.stdout

        client = OpenAI(base_url=base_url, api_key=secret, max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny"]
        revoked = run(
            str(coordinator), "keys", "revoke", key_id.group(1), "--data-dir", str(data_dir)
        )
        assert revoked.returncode == 0
        with pytest.raises(openai.AuthenticationError):
            client.models.list()

        again = run(
            str(coordinator), "keys", "revoke", key_id.group(1), "--data-dir", str(data_dir)
        )
        assert again.returncode == 2 and "no active key" in again.stderr
        listed = run(str(coordinator), "keys", "list", "--data-dir", str(data_dir))
        assert "revoked" in listed.stdout
        unknown = run(
            str(coordinator), "credits", "add", "key_nope", "1", "--data-dir", str(data_dir)
        )
        assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
        assert popen.poll() is None, "admin commands must not disturb the running coordinator"
    finally:
        assert server.stop() == 0, server.output()[-2000:]


def test_miners_lists_the_connected_miners_with_load_and_trust(marketplace: Coordinator) -> None:
    deadline = time.monotonic() + 30
    rows: list[str] = []
    while time.monotonic() < deadline:
        listed = run(
            str(BIN / "meshmint-coordinator"),
            "miners",
            "--database-url",
            marketplace.database_url,
        )
        assert listed.returncode == 0, listed.stderr
        rows = [line for line in listed.stdout.splitlines() if " tiny " in line]
        if len(rows) == 2:
            break
        time.sleep(0.5)
    assert len(rows) == 2, rows
    for row in rows:
        fields = row.split()
        assert re.fullmatch(r"[0-9a-f]{16}", fields[0])
        assert re.search(r" \d+/2 ", row)  # load: jobs in flight / slots
        assert row.endswith("serving")
