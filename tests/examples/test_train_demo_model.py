"""The demo model trainer: real tokenizer training, real torch training, real HF loading."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from miner.test_model import IM_END, IM_START
from proto.weights_digest import weights_sha256

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "train_demo_model.py"
STEPS = 20


@pytest.fixture(scope="module")
def trainer() -> ModuleType:
    # examples/ is a folder of scripts, not a package (and tests/examples takes its name).
    spec = importlib.util.spec_from_file_location("train_demo_model", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_learning_rate_warms_up_then_decays_to_the_floor(trainer: Any) -> None:
    config = trainer.DemoModelConfig(learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    rates = [trainer._learning_rate(step, steps=100, config=config) for step in range(100)]
    assert rates[:10] == sorted(rates[:10])
    assert rates[9] == pytest.approx(1e-3)
    assert rates[10:] == sorted(rates[10:], reverse=True)
    assert rates[-1] == pytest.approx(1e-4, rel=0.01)
    assert min(rates) > 0


def test_chat_examples_answer_with_a_corpus_definition_and_stop(trainer: Any) -> None:
    source = (
        "import os\n\n\n"
        "def read_text(path):\n"
        '    """Return the text of a file."""\n'
        "    with open(path) as handle:\n"
        "        return handle.read()\n\n\n"
        "def tiny():\n    pass\n\n\n"
        "class Tree:\n"
        "    def __init__(self, left, right):\n"
        "        self.left, self.right = left, right\n"
    )
    examples = trainer.chat_examples([source, "def broken(:\n"], seed=3)
    # The too-short function and the unparsable file give nothing.
    assert len(examples) == 2
    function = source[source.index("def read_text") : source.index("\n\n\ndef tiny")]
    tree = source[source.index("class Tree") :].rstrip("\n")
    (asks_function,) = [e for e in examples if "def read_text" in e]
    (asks_class,) = [e for e in examples if "class Tree" in e]
    assert asks_function.startswith(f"{IM_START}user\nWrite a Python function")
    assert asks_function.endswith(f"{IM_END}\n{IM_START}assistant\n{function}{IM_END}\n")
    assert asks_class.startswith(f"{IM_START}user\nDefine a")
    assert asks_class.endswith(f"{IM_END}\n{IM_START}assistant\n{tree}{IM_END}\n")
    assert trainer.chat_examples([source], seed=3) == examples


def test_corpus_digest_covers_names_and_bytes(trainer: Any) -> None:
    base = trainer.corpus_sha256([("a.py", b"x = 1\n"), ("b.py", b"y = 2\n")])
    assert base == trainer.corpus_sha256([("a.py", b"x = 1\n"), ("b.py", b"y = 2\n")])
    assert base != trainer.corpus_sha256([("a.py", b"x = 1\n"), ("b.py", b"y = 3\n")])
    assert base != trainer.corpus_sha256([("a.py", b"x = 1\n"), ("c.py", b"y = 2\n")])
    # Moving bytes across the file boundary must change the digest too.
    assert base != trainer.corpus_sha256([("a.py", b"x = 1\ny"), ("b.py", b" = 2\n")])


def test_stdlib_sources_are_sorted_and_bounded(trainer: Any) -> None:
    sources = trainer.stdlib_sources(200_000)
    names = [name for name, _ in sources]
    assert names and names == sorted(names)
    assert all(name.endswith(".py") for name in names)
    assert sum(len(data) for _, data in sources) <= 200_000


def test_is_trained_rejects_missing_and_mismatched_records(trainer: Any, tmp_path: Path) -> None:
    params = {"seed": 0, "steps": 3}
    assert not trainer.is_trained(tmp_path / "absent", params)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_text("{}")
    assert not trainer.is_trained(tmp_path, params)
    (tmp_path / trainer.TRAINING_FILE).write_text("not json")
    assert not trainer.is_trained(tmp_path, params)
    (tmp_path / trainer.TRAINING_FILE).write_text(json.dumps({"params": {"seed": 1, "steps": 3}}))
    assert not trainer.is_trained(tmp_path, params)
    (tmp_path / trainer.TRAINING_FILE).write_text(json.dumps({"params": params}))
    assert trainer.is_trained(tmp_path, params)
    (tmp_path / "model.safetensors").unlink()
    assert not trainer.is_trained(tmp_path, params)


@pytest.mark.slow
def test_training_is_reproducible_loadable_and_cached(trainer: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    first = trainer.train_demo_model(tmp_path / "a", seed=7, steps=STEPS)
    second = trainer.train_demo_model(tmp_path / "b", seed=7, steps=STEPS)
    assert weights_sha256(first) == weights_sha256(second)
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()

    record = json.loads((first / trainer.TRAINING_FILE).read_text())
    assert record["params"]["seed"] == 7
    assert record["params"]["steps"] == STEPS
    assert record["result"]["steps_completed"] == STEPS
    assert not record["result"]["stopped_by_time_limit"]
    # Even 20 steps must move the loss well below a uniform guess over the vocabulary.
    assert record["result"]["final_loss"] < record["result"]["first_loss"] - 0.5
    assert record["corpus"]["files"] == sorted(record["corpus"]["files"])

    tokenizer = AutoTokenizer.from_pretrained(first, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(first, local_files_only=True)
    messages = [{"role": "user", "content": "Write a Python function that reads a file."}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        f"{IM_START}user\nWrite a Python function that reads a file.{IM_END}\n{IM_START}assistant\n"
    )
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    assert ids.count(im_end) == 1
    assert tokenizer.eos_token_id == im_end
    assert im_end in GenerationConfig.from_pretrained(first).eos_token_id
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.max_position_embeddings == trainer.DemoModelConfig().context_length
    assert tokenizer.decode(ids) == prompt

    # The cache: same parameters return at once without touching the weights...
    weights = first / "model.safetensors"
    written = weights.stat().st_mtime_ns
    started = time.perf_counter()
    assert trainer.train_demo_model(first, seed=7, steps=STEPS) == first
    assert time.perf_counter() - started < 5
    assert weights.stat().st_mtime_ns == written
    # ...and any other parameter does not match the record.
    other = {**record["params"], "seed": 8}
    assert not trainer.is_trained(first, other)
