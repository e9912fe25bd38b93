"""bench/scale.py: its topologies, its report, one tiny run of one replica over NATS.

No figure is asserted (the machine is shared): only that a run produces complete,
self-consistent output.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.load_report import Level
from bench.scale import topologies
from bench.scale_report import ScaleLevel, idle_table, table

REPO = Path(__file__).resolve().parents[2]


def test_topologies_place_miners_and_buyers() -> None:
    single, three, cross = topologies("single,3,cross")
    assert (single.replicas, single.nats, single.buyer_homes()) == (1, False, [0])
    assert three.nats and [three.miner_home(i) for i in range(4)] == [0, 1, 2, 0]
    assert three.buyer_homes() == [0, 1, 2]
    assert cross.replicas == 2 and cross.miner_home(1) == 0 and cross.buyer_homes() == [1]
    for bad in ("0", "two", "1,1", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            topologies(bad)


def _level(path: str, rps: float, ttft_p50: float, cores: dict[str, float]) -> Level:
    return Level(path, 16, rps, (ttft_p50, 2 * ttft_p50), (1.0, 2.0), 10, [17], 0, [], cores)


def test_table_compares_with_single_and_splits_by_replica() -> None:
    cores = {"coordinators": 0.5, "postgres": 0.1, "generators": 0.2, "machine": 1.0}
    single = ScaleLevel(_level("single", 100, 4.0, cores), 1, {0: _level("single", 100, 4, {})})
    two = ScaleLevel(
        _level("2", 120, 6.5, cores),
        2,
        {0: _level("2", 70, 6.0, {}), 1: _level("2", 50, 7.0, {})},
    )
    rows = table([single, two]).splitlines()
    assert len(rows) == 4
    assert "r0: 70 (6.00) / r1: 50 (7.00)" in rows[3] and "+2.50" in rows[3]
    assert rows[3].split("|")[7].strip() == "1.00"  # end-to-end p50
    assert rows[3].split("|")[9].strip().startswith("4.17 / 0.83")  # 0.5 cores / 120 req/s
    # others: the machine less every measured group
    assert rows[2].split("|")[10].strip().endswith("0.20 / 1.00")
    assert "| single | 0.50 /" in idle_table({"single": cores, "2": {}})


def test_a_tiny_run_of_one_replica(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    command = [
        *(sys.executable, "-m", "bench.scale", "--replicas", "1", "--concurrency", "1,2"),
        *("--duration", "0.5", "--warmup", "0.2", "--idle", "0.2", "--generators", "2"),
        *("--tokens", "5", "--max-tokens", "8", "--miners", "1", "--miner-slots", "4"),
        *("--json", str(out)),
    ]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "| topology |" in run.stdout
    document = json.loads(out.read_text())
    assert document["problems"] == []
    assert set(document["idle_cpu_cores"]["1"]) >= {"coordinators", "postgres", "nats"}
    levels = {level["total"]["concurrency"]: level for level in document["levels"]}
    assert set(levels) == {1, 2}
    for level in levels.values():
        total = level["total"]
        assert total["errors"] == 0 and total["samples"] > 0 and total["requests_per_s"] > 0
        assert 0 < total["ttft_ms"][0] <= total["ttft_ms"][1]
        assert total["tokens"] == [6]  # 5 text tokens and the stop token
        assert list(level["by_replica"]) == ["0"]
        cores = total["cpu_cores"]
        assert set(cores) == {"coordinators", "postgres", "miners", "nats", "generators", "machine"}
        assert all(value >= 0 and math.isfinite(value) for value in cores.values())
        assert cores["coordinators"] > 0 and cores["postgres"] > 0
