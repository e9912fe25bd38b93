"""ModelTokenizer.from_gguf: the real SmolLM2 file against transformers, and synthetic files.

Transformers' GGUF loader is the reference where it reads the file as llama.cpp does. It ignores
some ``tokenizer.ggml.pre`` names (SmolLM2's "smollm" among them: it then splits with GPT-2's
regex), so on text where that matters our ids follow llama.cpp's rule instead, asserted directly.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from gguf import GGUFWriter
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from coordinator.api import ChatMessage
from coordinator.text.gguf_tokenizer import (
    SUPPORTED_PRE_TOKENIZERS,
    gguf_tokenizer_parts,
    load_gguf_tokenizer,
)
from coordinator.text.tokenization import ChatTemplateError, ModelTokenizer, TokenizerLoadError
from proto.gguf import read_gguf
from tests.coordinator_text import (
    CORPUS,
    LLAMA3_PATTERN,
    QWEN_PATTERN,
    QWEN_SPECIALS,
    train_byte_level_bpe,
    train_sentencepiece_bpe,
)

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# Texts on which SmolLM2's "smollm" split and transformers' GPT-2 split agree: no numerals.
AGREEING_TEXTS = [
    "Hello world",
    " leading space",
    "def f(x):\n    return x * 2  # double\n\n",
    "class Foo<T> { fn bar(&self) -> Option<T> { None } }",
    "Ça va très bien, merci ! Żółć gęślą jaźń. Grüße aus Köln.",
    "你好，世界。こんにちは世界、カタカナ。Привет, как дела?",  # noqa: RUF001 (CJK punctuation)
    "emoji 😀🎉🚀 👩‍👩‍👧 and flags 🇫🇷🇯🇵",
    "a   b\t\tc\n\n\n  d  \r\n",
    "   ",
    "it's we'll DON'T they've",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text <|endoftext|> more <jupyter_code>x",
    "",
]

CONVERSATIONS = [
    [ChatMessage(role="user", content="Hi there!")],
    [
        ChatMessage(role="system", content="You are terse."),
        ChatMessage(role="user", content="What is 2+2? Answer in 1 word."),
        ChatMessage(role="assistant", content="Four."),
        ChatMessage(role="user", content="Und auf Deutsch? 🙂"),
    ],
]


@pytest.fixture(scope="module")
def smol(smollm2_gguf: Path) -> ModelTokenizer:
    return ModelTokenizer.from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def smol_hf(smollm2_gguf: Path) -> PreTrainedTokenizerBase:
    """Transformers' own conversion of the same file (takes a few seconds)."""
    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


def conversation(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": message.role, "content": message.content} for message in messages]


# --- SmolLM2, the real file ----------------------------------------------------------------------


def test_smollm2_fields(smol: ModelTokenizer, smollm2_gguf: Path) -> None:
    assert smol.name == smollm2_gguf.stem
    assert ModelTokenizer.from_gguf(smollm2_gguf, name="smol").name == "smol"
    assert 2 in smol.stop_token_ids  # <|im_end|>
    assert smol.context_length == 8192
    assert smol.vocab_size == 49152
    assert smol.has_chat_template


@pytest.mark.parametrize("text", AGREEING_TEXTS)
def test_smollm2_matches_transformers(
    smol: ModelTokenizer, smol_hf: PreTrainedTokenizerBase, text: str
) -> None:
    ids = smol.encode_prompt(text)
    assert ids == smol_hf.encode(text)
    assert smol.decode(ids) == smol_hf.decode(ids, skip_special_tokens=True)
    assert b"".join(smol.token_bytes(i) for i in smol.text_ids(ids)) == smol.decode(ids).encode()
    if "<" not in text:  # no special tokens to drop: the text comes back whole
        assert smol.decode(ids) == text


def test_smollm2_splits_digits_as_llama_cpp(smol: ModelTokenizer) -> None:
    """llama.cpp's "smollm" rule (the original tokenizer.json's): every numeral alone."""
    ids = smol.encode_prompt("2024")
    assert [smol.token_bytes(i) for i in ids] == [b"2", b"0", b"2", b"4"]
    ids = smol.encode_prompt("pi is 3.14159, not 22/7")
    digits = [smol.token_bytes(i) for i in ids if smol.token_bytes(i).strip().isdigit()]
    assert digits == [digit.encode() for digit in "314159227"]
    assert smol.decode(ids) == "pi is 3.14159, not 22/7"
    # A space before a numeral stays apart from it; transformers' GPT-2 split would merge them.
    assert smol.encode_prompt(" ½") == smol.encode_prompt(" ") + smol.encode_prompt("½")
    assert smol.decode(smol.encode_prompt(" ½ ²")) == " ½ ²"


def test_smollm2_special_tokens_are_single_and_special(smol: ModelTokenizer) -> None:
    assert smol.encode_prompt("<|im_start|>") == [1]
    ids = smol.encode_prompt("a<|im_end|>b")
    assert 2 in ids and smol.text_ids(ids) == [i for i in ids if i != 2]
    assert smol.decode(ids) == "ab"


def test_smollm2_chat(smol: ModelTokenizer, smol_hf: PreTrainedTokenizerBase) -> None:
    first = smol.render_chat(CONVERSATIONS[0])
    assert first == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n"
    )
    for messages in CONVERSATIONS:
        turns = conversation(messages)
        assert smol.render_chat(messages) == smol_hf.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=True
        )
        expected = smol_hf.apply_chat_template(
            turns, tokenize=True, add_generation_prompt=True, return_dict=False
        )
        assert smol.encode_chat(messages) == list(expected)
    assert smol.encode_chat(CONVERSATIONS[0])[:2] == [1, 9690]  # <|im_start|> "system"


# --- synthetic files -----------------------------------------------------------------------------


def write_gguf(path: Path, metadata: Mapping[str, object], *, arch: str = "llama") -> Path:
    """A GGUF holding ``metadata`` and no tensors (all the tokenizer reads)."""
    writer = GGUFWriter(path, arch)
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def vocabulary(tokenizer: Tokenizer) -> tuple[list[str], list[str]]:
    """The tokens in id order and the merges as "a b" strings, as a GGUF stores them."""
    model = json.loads(tokenizer.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    return tokens, merges


def byte_level_metadata(pattern: str, pre: str) -> dict[str, object]:
    """A Qwen-style vocabulary: ChatML specials (control) and <think> (user-defined)."""
    specials = [*QWEN_SPECIALS, "<think>"]
    trained = train_byte_level_bpe(pattern=pattern, special_tokens=specials, vocab_size=700)
    tokens, merges = vocabulary(trained)
    return {
        "llama.context_length": 2048,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [
            3 if token in QWEN_SPECIALS else 4 if token == "<think>" else 1 for token in tokens
        ],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": tokens.index("<|endoftext|>"),
        "tokenizer.ggml.eos_token_id": tokens.index("<|im_end|>"),
        "tokenizer.ggml.add_bos_token": False,
    }


@pytest.fixture(scope="module")
def qwen_metadata() -> dict[str, object]:
    return byte_level_metadata(QWEN_PATTERN, "qwen2")


def sentencepiece_metadata(arch: str = "llama") -> dict[str, object]:
    """A Llama-2-style vocabulary: <unk> <s> </s>, pieces scored by rank, <0xNN> bytes."""
    tokens, _ = vocabulary(train_sentencepiece_bpe())
    types = [
        2 if token == "<unk>" else 3 if token in ("<s>", "</s>") else 6 if token[:3] == "<0x" else 1
        for token in tokens
    ]
    return {
        f"{arch}.context_length": 4096,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [-float(i) if kind == 1 else 0.0 for i, kind in enumerate(types)],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.chat_template": "{{ bos_token }}{% for m in messages %}[INST] {{ m.content }}"
        " [/INST]{% endfor %}",
    }


def transformers_gguf(path: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


ADDS_BOS_BY_DEFAULT = {
    *("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
    "tekken",
}
TEXTS = [*CORPUS[:7], "Hello   world\n\n  x", "numbers 1234567 and 12", "it's THEY'LL", "a\r\n\rb"]


@pytest.mark.parametrize(
    ("pre", "pattern"), [("qwen2", QWEN_PATTERN), ("llama-bpe", LLAMA3_PATTERN), ("gpt-2", None)]
)
def test_pre_tokenizers_transformers_also_knows_give_its_ids(
    tmp_path: Path, pre: str, pattern: str | None
) -> None:
    """Transformers maps these names to the same regexes, so both agree on every text."""
    path = write_gguf(tmp_path / f"{pre}.gguf", byte_level_metadata(pattern or GPT2_PATTERN, pre))
    ours, theirs = ModelTokenizer.from_gguf(path), transformers_gguf(path)
    for text in [*TEXTS, "<|im_start|>hi<|im_end|> <think>x"]:
        assert ours.encode_prompt(text) == theirs.encode(text), text
        special_free = text.replace("<|im_start|>", "").replace("<|im_end|>", "")
        assert ours.decode(ours.encode_prompt(text)) == special_free


@pytest.mark.parametrize(
    ("pre", "pieces"),
    [
        ("default", ["don", "'", "t", "Ġ", "123", "456", "7", "!"]),
        ("falcon", ["don", "'", "t", "Ġ", "123", "456", "7", "!"]),
        ("gpt-2", ["don", "'t", "Ġ1234567", "!"]),
        ("smollm", ["don", "'t", "Ġ", "1", "2", "3", "4", "5", "6", "7", "!"]),
        ("llama-bpe", ["don", "'t", "Ġ", "123", "456", "7", "!"]),
        ("qwen2", ["don", "'t", "Ġ", "1", "2", "3", "4", "5", "6", "7", "!"]),
    ],
)
def test_text_splits_as_llama_cpp_splits_it(
    tmp_path: Path, qwen_metadata: dict[str, object], pre: str, pieces: list[str]
) -> None:
    path = write_gguf(tmp_path / "m.gguf", {**qwen_metadata, "tokenizer.ggml.pre": pre})
    pre_tokenizer = load_gguf_tokenizer(path).tokenizer.pre_tokenizer
    assert [piece for piece, _ in pre_tokenizer.pre_tokenize_str("don't 1234567!")] == pieces


@pytest.mark.parametrize("pre", sorted(SUPPORTED_PRE_TOKENIZERS))
def test_every_known_pre_tokenizer_round_trips(
    tmp_path: Path, qwen_metadata: dict[str, object], pre: str
) -> None:
    metadata = {**qwen_metadata, "tokenizer.ggml.pre": pre}
    del metadata["tokenizer.ggml.add_bos_token"]  # llama.cpp's default for the name applies
    tokenizer = ModelTokenizer.from_gguf(write_gguf(tmp_path / "m.gguf", metadata))
    for text in TEXTS:
        ids = tokenizer.encode_prompt(text)
        assert tokenizer.decode(ids) == text
        assert b"".join(tokenizer.token_bytes(i) for i in ids) == text.encode()
    # Without add_bos_token, llama.cpp adds BOS for the Llama 3 and Tekken families only.
    bos = metadata["tokenizer.ggml.bos_token_id"]
    assert (tokenizer.encode_prompt("x")[0] == bos) == (pre in ADDS_BOS_BY_DEFAULT)


def test_bos_eos_stop_ids_and_user_defined_tokens(
    tmp_path: Path, qwen_metadata: dict[str, object]
) -> None:
    tokens = qwen_metadata["tokenizer.ggml.tokens"]
    assert isinstance(tokens, list)
    bos, eos, think = (tokens.index(t) for t in ("<|endoftext|>", "<|im_end|>", "<think>"))
    metadata = {
        **qwen_metadata,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": True,
        "tokenizer.ggml.eot_token_id": 1,
        "tokenizer.ggml.eom_token_id": eos,  # listed once
        "llama.vocab_size": 768,
    }
    tokenizer = ModelTokenizer.from_gguf(write_gguf(tmp_path / "m.gguf", metadata))
    ids = tokenizer.encode_prompt("hi <think>")
    assert ids[0] == bos and ids[-1] == eos
    assert think in ids and tokenizer.decode(ids) == "hi <think>"  # user-defined: not special
    assert tokenizer.stop_token_ids == (eos, 1)
    assert tokenizer.vocab_size == 768
    assert tokenizer.context_length == 2048
    assert not tokenizer.has_chat_template
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tokenizer.encode_chat([ChatMessage(role="user", content="hi")])


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_sentencepiece_matches_transformers(tmp_path: Path, arch: str) -> None:
    path = write_gguf(tmp_path / f"{arch}.gguf", sentencepiece_metadata(arch), arch=arch)
    ours, theirs = ModelTokenizer.from_gguf(path), transformers_gguf(path)
    for text in [*TEXTS, "  two spaces", " one", "</s>x<s> y", "Ünïcödé → 😀"]:
        ids = ours.encode_prompt(text)
        assert ids == theirs.encode(text), text
        assert ids[0] == 1  # llama.cpp and transformers add BOS to a SentencePiece vocabulary
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.decode(ours.encode_prompt("Ünïcödé → 😀 x")) == "Ünïcödé → 😀 x"
    assert ours.stop_token_ids == (2,) and ours.context_length == 4096
    messages = [ChatMessage(role="user", content="hello")]
    assert ours.render_chat(messages) == "<s>[INST] hello [/INST]"
    assert ours.encode_chat(messages) == list(
        theirs.apply_chat_template(
            conversation(messages), tokenize=True, add_generation_prompt=True, return_dict=False
        )
    )


def test_sentencepiece_without_space_prefix(tmp_path: Path) -> None:
    metadata = {**sentencepiece_metadata(), "tokenizer.ggml.add_space_prefix": False}
    metadata["tokenizer.ggml.add_bos_token"] = False
    tokenizer = ModelTokenizer.from_gguf(write_gguf(tmp_path / "m.gguf", metadata))
    ids = tokenizer.encode_prompt("the fox")
    assert not tokenizer.token_bytes(ids[0]).startswith(b" ")
    assert tokenizer.decode(ids) == "the fox"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"tokenizer.ggml.model": "bert"},
            r"tokenizer model 'bert' is not supported \(supported: gpt2, llama\)",
        ),
        ({"tokenizer.ggml.model": "t5"}, "tokenizer model 't5' is not supported"),
        ({"tokenizer.ggml.pre": "no-such-pre"}, "pre-tokenizer 'no-such-pre' .* is not supported"),
        ({"tokenizer.ggml.merges": None}, "needs tokenizer.ggml.merges or tokenizer.ggml.scores"),
        ({"tokenizer.ggml.tokens": ["a", "b", "a"]}, "'a' is listed twice"),
        ({"tokenizer.ggml.bos_token_id": None, "tokenizer.ggml.add_bos_token": True}, "no bos"),
        ({"llama.context_length": None}, "llama.context_length must be a positive integer"),
        ({"tokenizer.chat_template": "{% if %}"}, "chat template syntax error"),
    ],
)
def test_refused_files_name_the_path_and_reason(
    tmp_path: Path, qwen_metadata: dict[str, object], change: dict[str, object], message: str
) -> None:
    merged = {**qwen_metadata, **change}
    metadata = {key: value for key, value in merged.items() if value is not None}
    if "tokenizer.ggml.tokens" in change:
        metadata["tokenizer.ggml.token_type"] = [1, 1, 1]
    path = write_gguf(tmp_path / "bad.gguf", metadata)
    with pytest.raises(TokenizerLoadError, match=message) as caught:
        ModelTokenizer.from_gguf(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_gemma_sentencepiece_is_refused(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "g.gguf", sentencepiece_metadata(), arch="gemma2")
    with pytest.raises(TokenizerLoadError, match="vocabulary of a gemma2 model is not supported"):
        gguf_tokenizer_parts(read_gguf(path))


def test_missing_and_truncated_files(tmp_path: Path, smollm2_gguf: Path) -> None:
    with pytest.raises(TokenizerLoadError, match=r"absent\.gguf: cannot read"):
        ModelTokenizer.from_gguf(tmp_path / "absent.gguf")
    truncated = tmp_path / "truncated.gguf"
    with smollm2_gguf.open("rb") as source, truncated.open("wb") as target:
        target.write(source.read(1 << 20))
    with pytest.raises(TokenizerLoadError, match=r"truncated\.gguf: truncated"):
        ModelTokenizer.from_gguf(truncated)
    not_gguf = shutil.copy(__file__, tmp_path / "text.gguf")
    with pytest.raises(TokenizerLoadError, match="not a GGUF file"):
        ModelTokenizer.from_gguf(Path(not_gguf))


def test_the_test_models_gguf_tokenizes_as_its_directory(tmp_path: Path) -> None:
    from miner.test_model import create_test_gguf, create_test_model

    from_dir = ModelTokenizer.from_dir(create_test_model(tmp_path / "dir"))
    from_file = ModelTokenizer.from_gguf(create_test_gguf(tmp_path / "tiny.gguf"))
    chat = [ChatMessage(role="user", content="Héllo, wörld! 1234 <|im_end|>")]
    assert from_file.encode_chat(chat) == from_dir.encode_chat(chat)
    assert from_file.encode_prompt("def f(x):\n\treturn x") == from_dir.encode_prompt(
        "def f(x):\n\treturn x"
    )
    assert set(from_file.stop_token_ids) == set(from_dir.stop_token_ids)
    assert (from_file.vocab_size, from_file.context_length) == (
        from_dir.vocab_size,
        from_dir.context_length,
    )
