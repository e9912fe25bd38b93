"""The tiny test model: reproducible weights and a working ChatML byte-level tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from miner.test_model import BOS_TOKEN, EOS_TOKEN, IM_END, IM_START, create_test_model
from proto.weights_digest import weights_sha256


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_test_model(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def test_the_same_seed_gives_the_same_weights(model_dir: Path, tmp_path: Path) -> None:
    again = create_test_model(tmp_path / "again", seed=0)
    assert weights_sha256(again) == weights_sha256(model_dir)


def test_another_seed_gives_other_weights(model_dir: Path, tmp_path: Path) -> None:
    other = create_test_model(tmp_path / "other", seed=1)
    assert weights_sha256(other) != weights_sha256(model_dir)


def test_the_chat_template_renders_chatml(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "héllo 世界"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        f"{IM_START}system\nBe brief.{IM_END}\n"
        f"{IM_START}user\nhéllo 世界{IM_END}\n"
        f"{IM_START}assistant\n"
    )
    without_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert without_prompt == rendered.removesuffix(f"{IM_START}assistant\n")


def test_special_tokens_are_single_ids_past_the_bytes(tokenizer: Any, model_dir: Path) -> None:
    ids = [tokenizer.encode(token, add_special_tokens=False) for token in (BOS_TOKEN, EOS_TOKEN)]
    assert ids == [[256], [257]]
    assert tokenizer.encode(f"{IM_START}x{IM_END}", add_special_tokens=False) == [
        258,
        tokenizer.encode("x", add_special_tokens=False)[0],
        259,
    ]
    assert tokenizer.eos_token == IM_END
    config = json.loads((model_dir / "config.json").read_text())
    assert len(tokenizer) == config["vocab_size"] == 260


@pytest.mark.parametrize("text", ["plain ascii", "héllo wörld", "世界 🙂 naïve\n\ttabs", ""])
def test_the_tokenizer_round_trips_unicode(tokenizer: Any, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode("utf-8"))  # one token per UTF-8 byte, no merges
    assert all(0 <= token < 256 for token in ids)
    assert tokenizer.decode(ids) == text
