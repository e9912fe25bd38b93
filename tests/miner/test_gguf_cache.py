"""GGUF models: the test GGUF, its conversion cache, and the torch engine serving a GGUF file."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from miner.engine import gguf_cache
from miner.engine.base import GenerationRequest, ModelLoadError, SamplingParams
from miner.engine.gguf_cache import FORMAT_VERSION, MANIFEST, WEIGHTS, prepare_gguf
from miner.engine.torch_engine import TorchEngine
from miner.test_model import create_test_gguf, create_test_model
from proto.weights_digest import weights_sha256

SEED = 5
CONTEXT_LENGTH = 64
PROMPT = [258, 117, 115, 101, 114, 10, 104, 105, 259, 10, 258]  # <|im_start|>user\nhi<|im_end|>
SAMPLINGS = (
    SamplingParams(temperature=0, max_tokens=12),
    SamplingParams(temperature=0.9, top_k=40, seed=7, max_tokens=12),
)
CACHE_LOGGER = "miner.engine.gguf_cache"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_test_model(
        tmp_path_factory.mktemp("tiny"), seed=SEED, context_length=CONTEXT_LENGTH
    )


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return create_test_gguf(path, seed=SEED, context_length=CONTEXT_LENGTH)


@pytest.fixture(scope="module")
def expected_tokens(tiny_dir: Path) -> list[list[int]]:
    """What the engine generates from the safetensors test model of the same seed."""
    import asyncio

    async def generate() -> list[list[int]]:
        async with TorchEngine.load("tiny", tiny_dir, device="cpu") as engine:
            return [await _tokens(engine, sampling) for sampling in SAMPLINGS]

    return asyncio.run(generate())


async def _tokens(engine: TorchEngine, sampling: SamplingParams) -> list[int]:
    job = GenerationRequest(job_id="job-1", prompt_token_ids=PROMPT, sampling=sampling)
    return [token.token_id async for token in engine.generate(job)]


async def _serve_tokens(source: Path, cache_dir: Path | None) -> tuple[list[list[int]], Any]:
    async with TorchEngine.load("tiny", source, device="cpu", cache_dir=cache_dir) as engine:
        return [await _tokens(engine, sampling) for sampling in SAMPLINGS], engine.info


def _conversions(caplog: pytest.LogCaptureFixture) -> int:
    return sum(
        "converting" in record.getMessage()
        for record in caplog.records
        if record.name == CACHE_LOGGER
    )


def _entry(cache_dir: Path, gguf: Path) -> Path:
    return cache_dir / weights_sha256(gguf).hex()


# --- the test GGUF file ---------------------------------------------------------------------


def test_the_test_gguf_holds_exactly_the_test_models_weights(
    tiny_dir: Path, tiny_gguf: Path
) -> None:
    from transformers import AutoModelForCausalLM

    plain: Any = AutoModelForCausalLM.from_pretrained(tiny_dir, local_files_only=True)
    from_gguf: Any = AutoModelForCausalLM.from_pretrained(
        tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32, local_files_only=True
    )
    ours, theirs = plain.state_dict(), from_gguf.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name
    with torch.inference_mode():
        ids = torch.tensor([PROMPT])
        assert torch.equal(plain(ids).logits, from_gguf(ids).logits)


def test_the_test_gguf_tokenizes_like_the_test_model(tiny_dir: Path, tiny_gguf: Path) -> None:
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tiny_dir, local_files_only=True)
    from_gguf = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    messages = [{"role": "user", "content": "héllo 世界, isn't it?"}]
    rendered = plain.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == from_gguf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert plain.encode(rendered) == from_gguf.encode(rendered)
    assert (from_gguf.bos_token, from_gguf.eos_token) == (plain.bos_token, plain.eos_token)


def test_the_test_gguf_is_reproducible(tiny_gguf: Path, tmp_path: Path) -> None:
    again = create_test_gguf(tmp_path / "again.gguf", seed=SEED, context_length=CONTEXT_LENGTH)
    assert again.read_bytes() == tiny_gguf.read_bytes()
    other = create_test_gguf(tmp_path / "other.gguf", seed=SEED + 1, context_length=CONTEXT_LENGTH)
    assert weights_sha256(other) != weights_sha256(tiny_gguf)


def test_create_test_model_writes_the_gguf_file_too_and_prints_its_digest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from miner.cli import main

    target, gguf = tmp_path / "tiny", tmp_path / "tiny.gguf"
    assert main(["create-test-model", str(target), "--seed", str(SEED), "--gguf", str(gguf)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [
        str(target),
        weights_sha256(target).hex(),
        str(gguf),
        weights_sha256(gguf).hex(),
    ]
    assert not list(target.glob("*.gguf")), "the GGUF file stays out of the directory's hash"


# --- serving a GGUF file --------------------------------------------------------------------


async def test_a_gguf_file_serves_the_same_tokens_and_announces_its_own_digest(
    tiny_gguf: Path,
    tiny_dir: Path,
    expected_tokens: list[list[int]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=CACHE_LOGGER)
    cache = tmp_path / "cache"
    tokens, info = await _serve_tokens(tiny_gguf, cache)
    assert tokens == expected_tokens
    assert info.weights_sha256 == weights_sha256(tiny_gguf) != weights_sha256(tiny_dir)
    assert (info.vocab_size, info.context_length) == (260, CONTEXT_LENGTH)
    assert _conversions(caplog) == 1
    manifest = _entry(cache, tiny_gguf) / MANIFEST
    written = manifest.stat().st_mtime_ns

    caplog.clear()
    assert (await _serve_tokens(tiny_gguf, cache))[0] == expected_tokens
    assert _conversions(caplog) == 0, "the second load comes from the cache"
    assert manifest.stat().st_mtime_ns == written
    assert sorted(path.name for path in cache.iterdir()) == sorted(
        [manifest.parent.name, f"{manifest.parent.name}.lock"]
    )


async def test_a_gguf_file_needs_a_cache_dir(tiny_gguf: Path) -> None:
    with pytest.raises(ModelLoadError, match=f"{re.escape(str(tiny_gguf))}.*cache"):
        await _serve_tokens(tiny_gguf, None)


def _flip_a_byte(entry: Path) -> None:
    weights = entry / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))


def _truncate(entry: Path) -> None:
    weights = entry / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])


def _edit_manifest(**changes: Any) -> Callable[[Path], None]:
    def edit(entry: Path) -> None:
        manifest = json.loads((entry / MANIFEST).read_text())
        manifest.update(changes)
        (entry / MANIFEST).write_text(json.dumps(manifest))

    return edit


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "flipped byte": (_flip_a_byte, "does not match its SHA-256"),
    "truncated weights": (_truncate, "bytes, expected"),
    "deleted config": (lambda entry: (entry / "config.json").unlink(), "config.json is missing"),
    "deleted weights": (lambda entry: (entry / WEIGHTS).unlink(), f"{WEIGHTS} is missing"),
    "no manifest": (lambda entry: (entry / MANIFEST).unlink(), "no readable manifest"),
    "garbled manifest": (lambda entry: (entry / MANIFEST).write_text("{"), "no readable"),
    "another format": (_edit_manifest(format=FORMAT_VERSION + 1), "format version"),
    "another transformers": (
        _edit_manifest(converter={"transformers": "4.0.0", "gguf": "0.1"}),
        "converted by",
    ),
    "another source": (_edit_manifest(source_sha256="00" * 32), "another file"),
    "files unlisted": (_edit_manifest(files=[]), "does not list"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=list(CORRUPTIONS))
async def test_a_damaged_or_stale_cache_entry_is_rebuilt_never_served(
    corruption: str,
    tiny_gguf: Path,
    expected_tokens: list[list[int]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    damage, reason = CORRUPTIONS[corruption]
    cache = tmp_path / "cache"
    entry = prepare_gguf(tiny_gguf, cache_dir=cache).directory
    damage(entry)
    caplog.set_level(logging.INFO, logger=CACHE_LOGGER)

    tokens, _ = await _serve_tokens(tiny_gguf, cache)

    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1 and reason in warnings[0], warnings
    assert str(entry) in warnings[0]
    assert _conversions(caplog) == 1
    assert tokens == expected_tokens
    assert gguf_cache.entry_problem(entry, weights_sha256(tiny_gguf)) is None


def test_concurrent_loads_of_one_file_convert_it_once(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conversions = []
    write_model = gguf_cache._write_model

    def slow_write_model(path: Path, target: Path) -> None:
        conversions.append(target)
        time.sleep(0.5)  # long enough for the other thread to find the lock taken
        write_model(path, target)

    monkeypatch.setattr(gguf_cache, "_write_model", slow_write_model)
    cache = tmp_path / "cache"
    start = threading.Barrier(2)
    results: list[gguf_cache.CachedModel] = []

    def load() -> None:
        start.wait()
        results.append(prepare_gguf(tiny_gguf, cache_dir=cache))

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(conversions) == 1
    assert sorted(result.converted for result in results) == [False, True]
    assert results[0].directory == results[1].directory == _entry(cache, tiny_gguf)


@pytest.mark.skipif(sys.platform == "win32", reason="no flock() on Windows")
def test_another_process_holding_the_lock_is_waited_for(
    tiny_gguf: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    lock = cache / f"{weights_sha256(tiny_gguf).hex()}.lock"
    released = tmp_path / "released"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time\n"
            "handle = open(sys.argv[1], 'a')\n"
            "fcntl.flock(handle, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(1.0)\n"
            "open(sys.argv[2], 'w').close()\n",  # then exits, which releases the lock
            str(lock),
            str(released),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        caplog.set_level(logging.INFO, logger=CACHE_LOGGER)
        prepared = prepare_gguf(tiny_gguf, cache_dir=cache)
        assert released.exists(), "the conversion waited for the other process"
    finally:
        holder.kill()
        holder.wait()
    assert prepared.converted
    assert any("waiting for another process" in record.getMessage() for record in caplog.records)


def test_an_interrupted_conversion_leaves_nothing_that_is_served(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"

    def crash(path: Path, target: Path) -> None:
        (target / WEIGHTS).write_bytes(b"half a file")
        raise RuntimeError("out of memory")

    monkeypatch.setattr(gguf_cache, "_write_model", crash)
    with pytest.raises(ModelLoadError, match=r"cannot convert .*out of memory"):
        prepare_gguf(tiny_gguf, cache_dir=cache)
    assert [path.name for path in cache.iterdir()] == [f"{weights_sha256(tiny_gguf).hex()}.lock"]
    # A crashed process leaves its staging directory behind; the next conversion removes it.
    key = weights_sha256(tiny_gguf).hex()
    (cache / f".{key}.dead.tmp").mkdir()
    monkeypatch.undo()
    assert prepare_gguf(tiny_gguf, cache_dir=cache).converted
    assert sorted(path.name for path in cache.iterdir()) == [key, f"{key}.lock"]


# --- files that cannot be served ------------------------------------------------------------


def _write_gguf(path: Path, *, arch: str, tensors: dict[str, tuple[Any, Any]]) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(path, arch=arch)
    writer.add_block_count(1)
    for name, (array, raw_dtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _truncated(tmp_path: Path, tiny_gguf: Path) -> Path:
    path = tmp_path / "truncated.gguf"
    path.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    return path


def _text(tmp_path: Path, tiny_gguf: Path) -> Path:
    path = tmp_path / "x.gguf"
    path.write_text("this is not a model\n")
    return path


def _rwkv6(tmp_path: Path, tiny_gguf: Path) -> Path:
    weights = np.zeros((4, 8), dtype=np.float32)
    return _write_gguf(
        tmp_path / "rwkv.gguf", arch="rwkv6", tensors={"token_embd.weight": (weights, None)}
    )


def _q8_k(tmp_path: Path, tiny_gguf: Path) -> Path:
    from gguf import GGMLQuantizationType

    # llama.cpp's intermediate type for K-quant dot products: sized, but nobody dequantizes it.
    blocks = np.zeros((4, 292), dtype=np.uint8)  # 4 rows of one Q8_K block (256 values) each
    return _write_gguf(
        tmp_path / "q8_k.gguf",
        arch="llama",
        tensors={"token_embd.weight": (blocks, GGMLQuantizationType.Q8_K)},
    )


def _int8(tmp_path: Path, tiny_gguf: Path) -> Path:
    weights = np.zeros((4, 8), dtype=np.int8)
    return _write_gguf(
        tmp_path / "i8.gguf", arch="llama", tensors={"token_embd.weight": (weights, None)}
    )


BAD_FILES: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "truncated": (_truncated, "truncated"),
    "text file": (_text, "not a GGUF file"),
    "unsupported architecture": (_rwkv6, r"architecture 'rwkv6' is not supported \(supported: "),
    "Q8_K tensors": (_q8_k, r"cannot be dequantized: Q8_K \(1 tensors\)"),
    "int8 tensors": (_int8, r"cannot be dequantized: I8 \(1 tensors\)"),
    "missing": (lambda tmp_path, _: tmp_path / "gone.gguf", "does not exist"),
}


@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
async def test_a_bad_gguf_file_raises_model_load_error_naming_path_and_reason(
    case: str, tiny_gguf: Path, tmp_path: Path
) -> None:
    make, reason = BAD_FILES[case]
    path = make(tmp_path, tiny_gguf)
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError) as raised:
        await _serve_tokens(path, cache)
    message = str(raised.value)
    assert str(path) in message
    assert re.search(reason, message), message
    assert "\n" not in message
    assert not cache.exists(), "a file that cannot load is refused before any conversion"


def test_supported_architectures_come_from_transformers() -> None:
    supported = gguf_cache.supported_architectures()
    assert {"llama", "qwen2", "qwen2moe", "qwen3", "gemma3", "phi3"} <= supported
    assert not {"general", "tokenizer", "rwkv6"} & supported


# --- a real model ---------------------------------------------------------------------------

FRANCE = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.slow
async def test_smollm2_converts_once_then_loads_from_the_cache_and_knows_paris(
    smollm2_gguf: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from transformers import AutoTokenizer

    source = smollm2_gguf
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    prompt = tokenizer.encode(FRANCE, add_special_tokens=False)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    sampling = SamplingParams(temperature=0, max_tokens=24, stop_token_ids=(im_end,))
    caplog.set_level(logging.INFO, logger=CACHE_LOGGER)
    answers = []
    for _ in range(2):
        async with TorchEngine.load(
            "smollm2", source, device="cpu", cache_dir=tmp_path / "cache"
        ) as engine:
            assert engine.info.weights_sha256 == weights_sha256(source)
            job = GenerationRequest(job_id="france", prompt_token_ids=prompt, sampling=sampling)
            answers.append([token.token_id async for token in engine.generate(job)])
    assert _conversions(caplog) == 1
    assert answers[0] == answers[1]
    assert "Paris" in tokenizer.decode(answers[0]), tokenizer.decode(answers[0])
