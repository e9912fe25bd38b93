"""bench/engine.py runs end to end on the tiny model, on every path, and its engine batches.

No figure is asserted (the machine is shared): only the structure of the output, that every
request did the same work, and that at concurrency 2 the engine decoded two rows in one pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import engine
from bench.engine_load import Timing, figures


def test_the_engine_benchmark_measures_every_path_and_batches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "engine.json"
    argv = ["--model", "tiny", "--concurrency", "1,2", "--requests", "2", "--min-rounds", "2"]
    paths = ["--work-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache")]
    assert engine.main([*argv, "--max-tokens", "4", *paths, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| tiny | c=1 | c=2 |" in printed
    assert "| **coordinator / engine tok/s** |" in printed
    document = json.loads(out.read_text())
    assert document["server_errors"] == []
    (model,) = document["models"]
    assert model["model"] == "tiny" and model["parameters"] > 0 and model["max_tokens"] == 4
    levels = {level["concurrency"]: level for level in document["levels"]}
    assert sorted(levels) == [1, 2]
    for concurrency, level in levels.items():
        assert level["model"] == "tiny" and level["requests_per_client"] == 2
        for path in ("engine", "coordinator"):
            measured = level[path]["figures"]
            assert measured["requests"] == 2 * concurrency
            # No prompt met a stop token: every request on both paths made max_tokens tokens.
            assert measured["tokens_per_request"] == 4
            assert measured["tokens_per_s"] > 0 and measured["window_s"] > 0
            assert 0 < measured["ttft_p50_ms"] <= measured["ttft_p99_ms"]
        assert level["engine"]["hf_tokens_per_s"] > 0
        assert level["engine"]["preemptions"] == 0 and level["engine"]["kv_cache_mib"] > 0
        assert level["coordinator"]["miner_peak_rss_mib"] > 0
        cores = level["coordinator"]["cpu_cores"]
        assert set(cores) == {"miner", "coordinator", "postgres", "client", "machine"}
        assert cores["miner"] > 0 and cores["coordinator"] > 0
        assert level["engine"]["cpu_ms_per_token"] > 0
        assert level["coordinator"]["cpu_ms_per_token"] > 0
    # The engine really batched: two clients, two rows in one decode pass; one client, one.
    assert levels[1]["engine"]["largest_decode_batch"] == 1
    assert levels[2]["engine"]["largest_decode_batch"] == 2
    assert levels[2]["engine"]["tokens_per_step"] > 1
    assert len(document["verdict"]) == 1  # coordinator / engine only: no level 16 here


def _timing(sent: float, *arrivals: float) -> Timing:
    return Timing(sent, arrivals, arrivals[-1] + 0.5)


def test_the_steady_window_counts_only_tokens_while_every_client_is_measured() -> None:
    # Client 0's measured requests span 0..10 s, client 1's 2..13 s: the window is 2..10 s.
    per_client = [
        [_timing(0.0, 1.0, 2.0, 3.0, 4.0), _timing(4.0, 5.0, 7.0, 9.0, 10.0)],
        [_timing(2.0, 3.0, 6.0, 9.0, 12.0), _timing(12.0, 12.5, 13.0)],
    ]
    result = figures(per_client)
    assert result.requests == 4 and result.window_s == 8.0
    # Arrivals in [2, 10]: 2, 3, 4, 5, 7, 9, 10 (client 0) and 3, 6, 9 (client 1).
    assert result.tokens_per_s == 10 / 8
    # Sent inside the window: client 0's second request and client 1's first.
    assert result.window_requests == 2
    assert result.ttft_p50_ms == pytest.approx(1000.0)
    assert result.tokens_per_request == 14 / 4


def test_one_request_per_client_falls_back_to_the_whole_span() -> None:
    # Client 1 sends only after client 0's last token: no span where both are measured.
    result = figures([[_timing(0.0, 1.0, 2.0)], [_timing(3.0, 4.0, 5.0)]])
    assert result.window_s == 5.0 and result.tokens_per_s == 4 / 5 and result.window_requests == 2


def test_the_engine_comparison_runs_on_the_torch_engine_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench import engine_compare

    argv = ["--model", "tiny", "--engines", "torch", "--device", "cpu", "--concurrency", "1,2"]
    argv += ["--requests", "2", "--min-rounds", "1", "--max-tokens", "4"]
    paths = ["--work-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache")]
    assert engine_compare.main([*argv, *paths]) == 0
    printed = capsys.readouterr().out
    assert "| N | torch tok/s | torch TTFT p50 / p99 (ms) |" in printed
    table_rows = [line for line in printed.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(table_rows) == 2
    with pytest.raises(SystemExit):
        engine_compare.parse_args(["--engines", "llama.cpp"])
