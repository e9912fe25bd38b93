"""bench/load.py and its parts: the instant engine, the SSE reader, the report, one tiny run.

No figure is asserted (the machine is shared): only that each part behaves and that a run
produces complete, self-consistent output.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bench.instant_miner import INSTANT_LOGPROB, load_instant_engine
from bench.load_generator import RequestFailed, _read_sse
from bench.load_report import PATHS, Level, table, verdict
from coordinator.text.tokenization import ModelTokenizer
from miner.engine.base import GenerationError, GenerationRequest, SamplingParams
from miner.test_model import create_test_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_test_model(tmp_path_factory.mktemp("load") / "model")


def request(prompt: int, *, max_tokens: int, stops: tuple[int, ...]) -> GenerationRequest:
    sampling = SamplingParams(temperature=0, max_tokens=max_tokens, stop_token_ids=stops)
    return GenerationRequest(job_id="job", prompt_token_ids=[65] * prompt, sampling=sampling)


async def test_instant_engine_yields_text_then_a_stop_token(model_dir: Path) -> None:
    tokenizer = ModelTokenizer.from_dir(model_dir)
    stops = tokenizer.stop_token_ids
    engine = load_instant_engine("m", model_dir, tokens=5)
    generated = [t async for t in engine.generate(request(3, max_tokens=10, stops=stops))]
    ids = [token.token_id for token in generated]
    assert len(ids) == 6 and ids[-1] == stops[0]
    assert not set(ids[:-1]) & set(stops)
    assert all(0 <= token < engine.info.vocab_size for token in ids)
    assert tokenizer.decode(ids[:-1]).strip(), "text tokens decode to visible text"
    assert all(token.logprob == INSTANT_LOGPROB < 0 for token in generated)
    assert engine.info.context_length == tokenizer.context_length


async def test_instant_engine_ends_at_max_tokens_and_at_the_context(model_dir: Path) -> None:
    stops = ModelTokenizer.from_dir(model_dir).stop_token_ids
    engine = load_instant_engine("m", model_dir, tokens=16)
    at_budget = engine.planned(request(3, max_tokens=4, stops=stops))
    assert len(at_budget) == 4 and at_budget[-1] not in stops  # finish reason "length"
    room = engine.info.context_length - 2
    assert engine.planned(request(room, max_tokens=10, stops=stops)) == at_budget[:2]
    with pytest.raises(GenerationError):
        engine.planned(request(engine.info.context_length, max_tokens=1, stops=stops))


async def _lines(*lines: bytes) -> AsyncIterator[bytes]:
    for line in lines:
        yield line


def _event(value: object) -> bytes:
    return b"data: " + json.dumps(value).encode() + b"\n"


async def test_sse_reader_times_the_first_text_and_reads_the_usage() -> None:
    role = _event({"choices": [{"delta": {"role": "assistant", "content": ""}}]})
    text = _event({"choices": [{"delta": {"content": "hi"}}]})
    usage = _event({"choices": [], "usage": {"completion_tokens": 7}})
    first, tokens = await _read_sse(_lines(role, b"\n", text, b"\n", usage, b"data: [DONE]\n"))
    assert tokens == 7 and first > 0
    with pytest.raises(RequestFailed, match="without"):
        await _read_sse(_lines(role, text))
    with pytest.raises(RequestFailed, match="boom"):
        await _read_sse(_lines(text, _event({"error": {"message": "boom"}})))


def _level(path: str, concurrency: int, rps: float, ttft_p50: float) -> Level:
    return Level(
        path=path,
        concurrency=concurrency,
        requests_per_s=rps,
        ttft_ms=(ttft_p50, 2 * ttft_p50),
        e2e_ms=(3 * ttft_p50, 4 * ttft_p50),
        samples=10,
        tokens=[17],
        errors=0,
        error_messages=[],
        cpu_cores={"coordinator": 0.5, "machine": 1.0},
    )


def test_report_subtracts_direct_from_coordinator_and_judges_the_targets() -> None:
    levels = [
        _level("direct", 1, 5000, 0.5),
        _level("coordinator", 1, 200, 3.0),
        _level("direct", 8, 9000, 0.5),
        _level("coordinator", 8, 1200, 40.0),
    ]
    rows = table(levels, [1, 8]).splitlines()
    assert len(rows) == 4 and "+2.50" in rows[2] and "+39.50" in rows[3]
    assert "2.50" in rows[2].split("|")[8]  # coordinator CPU: 0.5 cores / 200 req/s
    judged = verdict(levels)
    assert "1,200 req/s at concurrency 8" in judged[0] and judged[0].endswith(": MET")
    assert "2.50 ms" in judged[1] and judged[1].endswith(": MET")
    slow = [_level("direct", 1, 5000, 0.5), _level("coordinator", 1, 50, 9.0)]
    assert all(line.endswith("NOT MET") for line in verdict(slow))


def test_a_tiny_run_measures_every_path(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    command = [
        *(sys.executable, "-m", "bench.load", "--concurrency", "1,2"),
        *("--duration", "0.5", "--warmup", "0.2", "--tokens", "5", "--max-tokens", "8"),
        *("--miners", "1", "--miner-slots", "4", "--model-dir", str(model_dir)),
        *("--json", str(out)),
    ]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "| concurrency |" in run.stdout
    document = json.loads(out.read_text())
    levels = {(level["path"], level["concurrency"]): level for level in document["levels"]}
    assert set(levels) == {(path, c) for path in PATHS for c in (1, 2)}
    for level in levels.values():
        assert level["errors"] == 0 and level["samples"] > 0 and level["requests_per_s"] > 0
        assert 0 < level["ttft_ms"][0] <= level["ttft_ms"][1]
        assert level["ttft_ms"][0] <= level["e2e_ms"][0] <= level["e2e_ms"][1]
        # 5 text tokens and the stop token on every path: they all did the same work.
        assert level["tokens"] == [6], level
    for concurrency in (1, 2):
        cores = levels[("coordinator", concurrency)]["cpu_cores"]
        assert set(cores) == {"generators", "coordinator", "postgres", "miners", "machine"}
        assert all(value >= 0 and math.isfinite(value) for value in cores.values())
        assert cores["coordinator"] > 0
    assert len(document["verdict"]) == 2
