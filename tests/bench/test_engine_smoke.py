"""bench/engine.py runs end to end on the tiny model and reports figures for every level."""

from __future__ import annotations

import json
from pathlib import Path

from bench import engine


def test_the_engine_benchmark_reports_each_level(tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    argv = ["--model", "tiny", "--concurrency", "1,2", "--requests", "2", "--max-tokens", "4"]
    paths = ["--work-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache")]
    assert engine.main([*argv, *paths, "--torch-threads", "1", "--json", str(out)]) == 0
    levels = json.loads(out.read_text())["levels"]
    assert [(level["model"], level["concurrency"]) for level in levels] == [
        ("tiny", 1),
        ("tiny", 2),
    ]
    for level in levels:
        assert level["engine_tokens_per_s"] > 0 and level["hf_tokens_per_s"] > 0
        assert level["ttft_p50_ms"] <= level["ttft_p99_ms"]
