"""IncrementalDetokenizer: the deltas add up to decode(all ids), whatever the chunking."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.text.detokenizer import (
    MAX_PENDING_TOKENS,
    REPLACEMENT_CHAR,
    IncrementalDetokenizer,
)
from coordinator.text.tokenization import ModelTokenizer
from miner.test_model import create_test_model
from tests.coordinator_text import qwen_style_dir, sentencepiece_style_dir

LAYOUTS: dict[str, Callable[[Path], Path]] = {
    "test-model": create_test_model,  # one token per byte: every multi-byte character is split
    "qwen2.5-style": qwen_style_dir,  # merges that end mid-character ('ĠðŁ' is half an emoji)
    "llama2-style": sentencepiece_style_dir,  # "▁" spaces, byte fallback, stripped first space
}
BYTE_LEVEL = ("test-model", "qwen2.5-style")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelTokenizer]:
    return {
        name: ModelTokenizer.from_dir(build(tmp_path_factory.mktemp(name)))
        for name, build in LAYOUTS.items()
    }


def stream(tokenizer: ModelTokenizer, chunks: Sequence[Sequence[int]]) -> list[str]:
    """Every delta, the flush last."""
    detokenizer = IncrementalDetokenizer(tokenizer)
    return [detokenizer.push(chunk) for chunk in chunks] + [detokenizer.flush()]


def split(ids: Sequence[int], cuts: Sequence[int]) -> list[list[int]]:
    """``ids`` cut at the given positions (taken modulo the length), empty chunks included."""
    points = sorted(cut % (len(ids) + 1) for cut in cuts)
    bounds = [0, *points, len(ids)]
    return [list(ids[start:end]) for start, end in itertools.pairwise(bounds)]


def reply_ids(tokenizer: ModelTokenizer, text: str) -> list[int]:
    """Ids of ``text`` as a model generates them: no BOS in front."""
    return tokenizer.text_ids(tokenizer.encode_prompt(text))


unicode_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\ufffd")
    | st.sampled_from("é你好😀🇫🇷ß\u0301 ▁\n"),
    max_size=60,
)
cuts = st.lists(st.integers(min_value=0, max_value=10_000), max_size=30)


@pytest.mark.parametrize("layout", LAYOUTS)
@settings(max_examples=150, deadline=None)
@given(text=unicode_text, cuts=cuts)
def test_text_encoded_then_resplit(
    tokenizers: dict[str, ModelTokenizer], layout: str, text: str, cuts: list[int]
) -> None:
    tokenizer = tokenizers[layout]
    ids = tokenizer.encode_prompt(text)
    deltas = stream(tokenizer, split(ids, cuts))
    assert "".join(deltas) == tokenizer.decode(ids)
    # Valid text never shows a half character, whatever the chunking.
    assert not any(REPLACEMENT_CHAR in delta for delta in deltas)
    if layout in BYTE_LEVEL:
        assert "".join(deltas) == tokenizer.decode(tokenizer.encode_prompt(text))


@pytest.mark.parametrize("layout", BYTE_LEVEL)
@settings(max_examples=200, deadline=None)
@given(data=st.data(), cuts=cuts)
def test_random_token_ids(
    tokenizers: dict[str, ModelTokenizer], layout: str, data: st.DataObject, cuts: list[int]
) -> None:
    """Any ids at all (broken UTF-8, special tokens, ids past the tokenizer): still exact."""
    tokenizer = tokenizers[layout]
    ids = data.draw(
        st.lists(st.integers(min_value=0, max_value=tokenizer.vocab_size - 1), max_size=80)
    )
    assert "".join(stream(tokenizer, split(ids, cuts))) == tokenizer.decode(ids)


@pytest.mark.parametrize("layout", LAYOUTS)
@settings(max_examples=50, deadline=None)
@given(text=unicode_text)
def test_chat_output_token_by_token(
    tokenizers: dict[str, ModelTokenizer], layout: str, text: str
) -> None:
    """What a miner streams: the assistant's text then a stop token, one token per chunk."""
    tokenizer = tokenizers[layout]
    ids = [*reply_ids(tokenizer, text), tokenizer.stop_token_ids[0]]
    deltas = stream(tokenizer, [[token] for token in ids])
    assert "".join(deltas) == tokenizer.decode(ids)
    assert deltas[-1] == deltas[-2] == ""  # the stop token adds no text, nothing left to flush


def test_characters_go_out_as_soon_as_complete(tokenizers: dict[str, ModelTokenizer]) -> None:
    tokenizer = tokenizers["test-model"]  # one token per UTF-8 byte
    ids = tokenizer.encode_prompt("a😀b")
    assert len(ids) == 6
    assert stream(tokenizer, [[token] for token in ids]) == ["a", "", "", "", "😀", "b", ""]


def test_first_space_of_sentencepiece_output(tokenizers: dict[str, ModelTokenizer]) -> None:
    tokenizer = tokenizers["llama2-style"]
    ids = tokenizer.encode_prompt("Hello world, it's 12345")[1:]  # without BOS
    deltas = stream(tokenizer, [[token] for token in ids])
    assert "".join(deltas) == "Hello world, it's 12345"
    # The first token's "▁" is dropped, later ones become spaces inside their deltas.
    assert not deltas[0].startswith(" ")
    assert any(delta.startswith(" ") for delta in deltas[1:])


def test_special_tokens_never_reach_the_text(tokenizers: dict[str, ModelTokenizer]) -> None:
    tokenizer = tokenizers["qwen2.5-style"]
    specials = list(tokenizer.stop_token_ids)
    deltas = stream(tokenizer, [specials, reply_ids(tokenizer, "hi"), specials, specials])
    assert "".join(deltas) == "hi"
    assert deltas[0] == ""


def test_undecodable_bytes_flow_after_the_pending_limit(
    tokenizers: dict[str, ModelTokenizer],
) -> None:
    """A miner sending broken UTF-8 cannot make every push re-decode a growing window."""
    tokenizer = tokenizers["test-model"]
    lead_byte = tokenizer.encode_prompt("😀")[0]  # 0xF0: opens a 4-byte character
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push([lead_byte]) for _ in range(MAX_PENDING_TOKENS + 10)]
    assert deltas[:MAX_PENDING_TOKENS] == [""] * MAX_PENDING_TOKENS
    assert deltas[MAX_PENDING_TOKENS] == REPLACEMENT_CHAR * (MAX_PENDING_TOKENS + 1)
    ids = [lead_byte] * (MAX_PENDING_TOKENS + 10)
    assert "".join(deltas) + detokenizer.flush() == tokenizer.decode(ids)


def test_nothing_pushed(tokenizers: dict[str, ModelTokenizer]) -> None:
    assert stream(tokenizers["test-model"], []) == [""]
    assert stream(tokenizers["test-model"], [[], []]) == ["", "", ""]


def test_work_per_push_stays_bounded(
    tokenizers: dict[str, ModelTokenizer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows stay short whatever a miner sends: special tokens, unknown ids, broken bytes."""
    tokenizer = tokenizers["test-model"]
    windows: list[int] = []
    decode = tokenizer.decode

    def recording_decode(ids: Sequence[int]) -> str:
        windows.append(len(ids))
        return decode(ids)

    monkeypatch.setattr(tokenizer, "decode", recording_decode)
    lead_byte = tokenizer.encode_prompt("😀")[0]
    silent = [*tokenizer.stop_token_ids, tokenizer.vocab_size + 5]  # decode to nothing
    hostile = [
        *silent * 500,
        lead_byte,
        *silent * 500,
        *[lead_byte] * 700,
        *reply_ids(tokenizer, "ok"),
    ]
    detokenizer = IncrementalDetokenizer(tokenizer)
    text = "".join(detokenizer.push([token]) for token in hostile) + detokenizer.flush()
    assert text == decode(hostile)
    assert max(windows) <= 2 * MAX_PENDING_TOKENS + 2
