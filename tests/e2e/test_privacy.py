"""A buyer's privacy tier decides which miners see its prompt: the one that generates and the
ones that re-score it, or none at all.

Real processes: the coordinator CLI with every job spot-checked, three miner CLIs (alice and
carol vetted by the operator through the `miners vet` CLI; carol declares she retains data,
``--retains-data``), the `openai` SDK as the buyer, PostgreSQL.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI

from tests.e2e.harness import (
    BIN,
    Coordinator,
    balances,
    create_key,
    eventually,
    fetch,
    http,
    miner_identity,
    running_coordinator,
    start_miner,
    wait_for_miners,
)

VETTED = {"trust": "vetted"}
SILENT = {"data_collection": "deny"}
BOTH = {"trust": "vetted", "data_collection": "deny"}


def _miners_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "meshmint-coordinator"), "miners", *args, "--database-url", url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _vetted_count(coordinator: Coordinator, key: str) -> int:
    _, _, listing = http(f"{coordinator.base_url}/models", api_key=key)
    [tiny] = [model for model in listing["data"] if model["id"] == "tiny"]
    return int(tiny["vetted_miners"])


def test_a_privacy_tier_binds_the_miner_and_its_scorers_and_fails_closed(
    database_url: str, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    url = database_url
    with running_coordinator(
        tmp_path,
        database_url=url,
        models={"tiny": model_dirs["tiny"]},
        extra=["--spot-check-floor", "1"],
    ) as coordinator:
        models = {"tiny": model_dirs["tiny"]}
        processes = {
            "alice": start_miner(coordinator, tmp_path, name="alice", models=models),
            "bob": start_miner(coordinator, tmp_path, name="bob", models=models),
            "carol": start_miner(
                coordinator, tmp_path, name="carol", models=models, extra=["--retains-data"]
            ),
        }
        key_id, key = create_key(url, credits_micro=10_000_000)
        wait_for_miners(coordinator, key, "tiny", 3)
        ids = {name: miner_identity(process) for name, process in processes.items()}
        assert None not in ids.values()
        names = {miner_id: name for name, miner_id in ids.items()}
        sdk = OpenAI(base_url=coordinator.base_url, api_key=key, max_retries=0, timeout=60)

        def ask(provider: dict[str, str]) -> str:
            answer = sdk.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "Tell me a secret."}],
                max_tokens=8,
                extra_body={"provider": provider},
            )
            return "job-" + answer.id.rsplit("-", 1)[1]

        # Nobody vetted yet: refused, nothing charged, no job anywhere.
        before = balances(url)[f"buyer:{key_id}"]
        with pytest.raises(openai.APIStatusError) as refused:
            ask(VETTED)
        assert refused.value.status_code == 503
        assert "vetted by the operator" in str(refused.value)
        assert balances(url)[f"buyer:{key_id}"] == before
        assert fetch(url, "SELECT job_id FROM coordinator_jobs") == []

        for name in ("alice", "carol"):
            vetted = _miners_cli(url, "vet", str(ids[name]))
            assert vetted.returncode == 0 and "vetted" in vetted.stdout, vetted.stderr
        again = _miners_cli(url, "vet", str(ids["alice"]))
        assert again.returncode == 0 and "already" in again.stdout
        eventually(lambda: _vetted_count(coordinator, key) == 2, "the vetting reached /v1/models")

        tiers: dict[str, dict[str, str]] = {}
        for provider in [VETTED] * 6 + [SILENT] * 6 + [BOTH] * 3:
            tiers[ask(provider)] = provider
        admitted = {
            str(VETTED): {"alice", "carol"},
            str(SILENT): {"alice", "bob"},
            str(BOTH): {"alice"},
        }

        def checks() -> dict[str, dict[str, Any]]:
            rows = fetch(url, "SELECT job_id, outcome, scorers FROM verification_checks")
            return {row["job_id"]: row for row in rows}

        eventually(lambda: set(tiers) <= set(checks()), "every job was spot-checked")
        jobs = {row["job_id"]: row for row in fetch(url, "SELECT * FROM coordinator_jobs")}
        found = checks()
        for job_id, provider in tiers.items():
            allowed = admitted[str(provider)]
            assert names[jobs[job_id]["miner_id"]] in allowed, (provider, jobs[job_id])
            scorers = {names[scorer] for scorer in found[job_id]["scorers"]}
            assert scorers <= allowed, (provider, found[job_id])
            if provider is BOTH:  # alice alone meets it: nobody else may see the job
                assert found[job_id]["outcome"] == "skipped" and not scorers
            else:
                assert found[job_id]["outcome"] == "passed" and scorers

        # Unvetting reaches the serving coordinator at once.
        unvetted = _miners_cli(url, "unvet", str(ids["carol"]))
        assert unvetted.returncode == 0
        eventually(lambda: _vetted_count(coordinator, key) == 1, "the unvetting reached it")
        served = {
            names[jobs_row["miner_id"]]
            for jobs_row in [
                fetch(url, "SELECT miner_id FROM coordinator_jobs WHERE job_id = $1", ask(VETTED))[
                    0
                ]
                for _ in range(3)
            ]
        }
        assert served == {"alice"}
