"""ModelTokenizer against transformers, on the test model and on realistic tokenizer layouts."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from coordinator.api import ChatMessage
from coordinator.text.tokenization import ChatTemplateError, ModelTokenizer, TokenizerLoadError
from miner.test_model import create_test_model
from tests.coordinator_text import (
    llama3_style_dir,
    qwen_style_dir,
    sentencepiece_style_dir,
    train_byte_level_bpe,
    write_model_dir,
)

LAYOUTS: dict[str, Callable[[Path], Path]] = {
    "test-model": create_test_model,
    "qwen2.5-style": qwen_style_dir,
    "llama3-style": llama3_style_dir,
    "llama2-style": sentencepiece_style_dir,
}

Pair = tuple[ModelTokenizer, PreTrainedTokenizerBase]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pair]:
    """Ours and transformers', loaded from the same directory, for every layout."""
    loaded: dict[str, Pair] = {}
    for name, build in LAYOUTS.items():
        model_dir = build(tmp_path_factory.mktemp(name))
        loaded[name] = (
            ModelTokenizer.from_dir(model_dir),
            AutoTokenizer.from_pretrained(model_dir),
        )
    return loaded


def hf_chat(hf: PreTrainedTokenizerBase, messages: Sequence[ChatMessage]) -> list[int] | str:
    conversation = [{"role": message.role, "content": message.content} for message in messages]
    try:
        ids = hf.apply_chat_template(
            conversation, tokenize=True, add_generation_prompt=True, return_dict=False
        )
    except Exception as error:  # the template's raise_exception
        return f"error: {error}"
    return list(ids)


def our_chat(tokenizer: ModelTokenizer, messages: Sequence[ChatMessage]) -> list[int] | str:
    try:
        return tokenizer.encode_chat(messages)
    except ChatTemplateError as error:
        return f"error: {error}"


CONVERSATIONS = [
    [ChatMessage("user", "Hello!")],
    [ChatMessage("system", "  Answer briefly.\n"), ChatMessage("user", "What's 12345 + 67890?")],
    [
        ChatMessage("system", "Be nice."),
        ChatMessage("user", "Bonjour, ça va ? 你好 😀"),
        ChatMessage("assistant", " Très bien, merci ! "),
        ChatMessage("user", "<|im_end|> and {{ 7 * 7 }} are just text here\n\n"),
    ],
    [ChatMessage("user", ""), ChatMessage("assistant", "   "), ChatMessage("user", "\t\r\n")],
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_encode_chat_matches_transformers(
    pairs: dict[str, Pair], layout: str, conversation: int
) -> None:
    ours, hf = pairs[layout]
    messages = CONVERSATIONS[conversation]
    expected = hf_chat(hf, messages)
    assert isinstance(expected, list)
    assert our_chat(ours, messages) == expected


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rendered_text_matches_transformers(pairs: dict[str, Pair], layout: str) -> None:
    ours, hf = pairs[layout]
    conversation = [{"role": m.role, "content": m.content} for m in CONVERSATIONS[2]]
    expected = hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert ours.render_chat(CONVERSATIONS[2]) == expected


def test_qwen_template_features_render(pairs: dict[str, Pair]) -> None:
    ours, _ = pairs["qwen2.5-style"]
    text = ours.render_chat([ChatMessage("user", "hi")])
    assert "You are Qwen, created by Alibaba Cloud." in text  # the default system message
    # tojson keeps non-ASCII and HTML characters as they are.
    assert '{"turn": 1, "note": "naïve <tag> & \\"quotes\\""}' in text
    long = ours.render_chat([ChatMessage("user", "a"), ChatMessage("assistant", "b")] * 2)
    assert '{\n  "roles": [\n    "user",' in long  # tojson(indent=2)
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_llama3_template_writes_bos_and_today(pairs: dict[str, Pair]) -> None:
    ours, _ = pairs["llama3-style"]
    ids = ours.encode_chat([ChatMessage("user", "hi")])
    assert ids.count(ours.encode_prompt("")[0]) == 1  # one BOS: the template's, not the tokenizer's
    today = datetime.now().strftime("%d %b %Y")
    assert f"Today Date: {today}" in ours.render_chat([ChatMessage("user", "hi")])


messages_strategy = st.lists(
    st.builds(
        ChatMessage,
        role=st.sampled_from(["system", "user", "assistant"]),
        content=st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
        | st.sampled_from(["<|im_start|>", "<|eot_id|>", "<s>", "{% raw %}", " x ", "ß\n"]),
    ),
    min_size=1,
    max_size=5,
)


@pytest.mark.parametrize("layout", LAYOUTS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=messages_strategy)
def test_random_chats_match_transformers(
    pairs: dict[str, Pair], layout: str, messages: list[ChatMessage]
) -> None:
    ours, hf = pairs[layout]
    expected = hf_chat(hf, messages)
    actual = our_chat(ours, messages)
    if isinstance(expected, str):
        # Both refuse (e.g. Llama 3: a system message after the first one).
        assert isinstance(actual, str)
    else:
        assert actual == expected


@pytest.mark.parametrize("layout", LAYOUTS)
@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8")))
def test_encode_prompt_and_decode_match_transformers(
    pairs: dict[str, Pair], layout: str, text: str
) -> None:
    ours, hf = pairs[layout]
    ids = ours.encode_prompt(text)
    assert ids == hf.encode(text)
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_bos_comes_from_the_post_processor(pairs: dict[str, Pair]) -> None:
    for layout, (ours, hf) in pairs.items():
        adds_bos = layout in ("llama3-style", "llama2-style")
        assert (ours.encode_prompt("hi")[0] == hf.bos_token_id) == adds_bos, layout


def test_stop_tokens_vocab_and_context(pairs: dict[str, Pair]) -> None:
    for layout, (ours, hf) in pairs.items():
        eos = hf.convert_tokens_to_ids(hf.eos_token)
        assert eos in ours.stop_token_ids, layout
        assert len(set(ours.stop_token_ids)) == len(ours.stop_token_ids)
        assert ours.vocab_size >= len(hf)
    qwen, hf = pairs["qwen2.5-style"]
    # generation_config first, then config, then the tokenizer's eos (already listed).
    ids = tuple(hf.get_vocab()[token] for token in ("<|im_end|>", "<|endoftext|>"))
    assert qwen.stop_token_ids == ids
    assert qwen.vocab_size == 768  # config.json's, larger than the tokenizer's
    assert qwen.context_length == 4096  # max_position_embeddings, not model_max_length
    llama3, hf = pairs["llama3-style"]
    eot, eom, end = (hf.get_vocab()[t] for t in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"))
    assert llama3.stop_token_ids == (end, eot, eom)
    test_model, hf = pairs["test-model"]
    assert test_model.context_length == 512
    assert test_model.vocab_size == len(hf) == 260


def test_decode_skips_special_and_unknown_ids(pairs: dict[str, Pair]) -> None:
    ours, hf = pairs["qwen2.5-style"]
    ids = ours.encode_chat([ChatMessage("user", "héllo")])
    text = ours.decode(ids)
    assert "<|im_start|>" not in text and "héllo" in text
    assert text == hf.decode(ids, skip_special_tokens=True)
    beyond = len(hf)  # below config.json's vocab_size, so a miner may legitimately send it
    assert beyond < ours.vocab_size
    assert ours.decode([*ids, beyond]) == text
    kept = ours.text_ids([*ids, beyond])
    assert ours.decode(kept) == text
    assert beyond not in kept and not set(kept) & set(ours.stop_token_ids)


# --- directories that differ from the standard layouts ------------------------------------------


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    return qwen_style_dir(tmp_path / "model")


def edit_json(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_no_chat_template_is_a_request_error(base_dir: Path) -> None:
    edit_json(base_dir / "tokenizer_config.json", lambda c: c.pop("chat_template"))
    tokenizer = ModelTokenizer.from_dir(base_dir, name="base-7b")
    assert not tokenizer.has_chat_template
    with pytest.raises(ChatTemplateError, match="model 'base-7b' has no chat template; use /v1/"):
        tokenizer.encode_chat([ChatMessage("user", "hi")])
    assert tokenizer.encode_prompt("hi")  # completions still work


def test_template_raise_exception_is_a_request_error(tmp_path: Path) -> None:
    tokenizer = ModelTokenizer.from_dir(llama3_style_dir(tmp_path), name="llama")
    messages = [ChatMessage("user", "a"), ChatMessage("system", "late system message")]
    with pytest.raises(ChatTemplateError, match="roles must be user or assistant"):
        tokenizer.encode_chat(messages)
    with pytest.raises(ChatTemplateError, match="empty"):
        tokenizer.encode_chat([])


def test_chat_template_file_wins_over_config(base_dir: Path) -> None:
    (base_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    ours = ModelTokenizer.from_dir(base_dir)
    messages = [ChatMessage("user", "hi")]
    assert ours.render_chat(messages) == "[user]hi[assistant]"
    assert ours.encode_chat(messages) == hf_chat(AutoTokenizer.from_pretrained(base_dir), messages)


def test_named_templates_use_default(base_dir: Path) -> None:
    templates = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "{{ messages[0].content }}|{{ eos_token }}"},
    ]
    edit_json(base_dir / "tokenizer_config.json", lambda c: c.update(chat_template=templates))
    ours = ModelTokenizer.from_dir(base_dir)
    messages = [ChatMessage("user", "hi")]
    assert ours.render_chat(messages) == "hi|<|im_end|>"
    assert ours.encode_chat(messages) == hf_chat(AutoTokenizer.from_pretrained(base_dir), messages)


def test_chat_template_json_is_the_last_resort(base_dir: Path) -> None:
    edit_json(base_dir / "tokenizer_config.json", lambda c: c.pop("chat_template"))
    (base_dir / "chat_template.json").write_text(json.dumps({"chat_template": "<{{ bos_token }}>"}))
    assert ModelTokenizer.from_dir(base_dir).render_chat([ChatMessage("user", "x")]) == "<>"


def test_sandbox_matches_transformers_restrictions(base_dir: Path) -> None:
    (base_dir / "chat_template.jinja").write_text(
        "{% generation %}{{ messages[0].content }}{% endgeneration %}"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}!{% endfor %}"
        "{{ dict(a=1) | tojson }}{% set ns = namespace(_secret=1) %}"
    )
    tokenizer = ModelTokenizer.from_dir(base_dir)
    with pytest.raises(ChatTemplateError, match="underscore"):
        tokenizer.render_chat([ChatMessage("user", "x")])
    (base_dir / "chat_template.jinja").write_text(
        "{% generation %}{{ messages[0].content }}{% endgeneration %}"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}!{% endfor %}"
        '{{ dict(a="é") | tojson }}{{ "".__class__.__mro__ }}'
    )
    tokenizer = ModelTokenizer.from_dir(base_dir)
    with pytest.raises(ChatTemplateError):  # no way out of the sandbox
        tokenizer.render_chat([ChatMessage("user", "x")])
    (base_dir / "chat_template.jinja").write_text(
        "{% generation %}{{ messages[0].content }}{% endgeneration %}"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}!{% endfor %}"
        '{{ dict(a="é") | tojson }}'
    )
    messages = [ChatMessage("user", "{{ 7 * 7 }}"), ChatMessage("user", "y")]
    assert ModelTokenizer.from_dir(base_dir).render_chat(messages) == '{{ 7 * 7 }}!{"a": "é"}'


def test_bos_flag_without_post_processor(tmp_path: Path) -> None:
    """No post-processor + add_bos_token: we prepend BOS (transformers v5 would not; v4 did)."""
    tokenizer = train_byte_level_bpe(pattern=r"\S+|\s+", special_tokens=["<s>"], vocab_size=300)
    model_dir = write_model_dir(
        tmp_path,
        tokenizer,
        tokenizer_config={
            "bos_token": "<s>",
            "add_bos_token": True,
            "add_eos_token": True,
            "eos_token": "</s>",
        },
        config={"max_position_embeddings": 64},
    )
    ours = ModelTokenizer.from_dir(model_dir)
    bos, eos = tokenizer.token_to_id("<s>"), ours.stop_token_ids[0]
    assert eos == tokenizer.get_vocab_size()  # "</s>" was missing, so it was added
    ids = ours.encode_prompt("hi")
    assert ids[0] == bos and ids[-1] == eos
    assert ours.decode(ids) == "hi"
    assert ours.vocab_size == eos + 1


@pytest.mark.parametrize(
    ("damage", "file", "message"),
    [
        (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json", "missing"),
        (lambda d: (d / "tokenizer.json").write_text("{}"), "tokenizer.json", "cannot load"),
        (lambda d: (d / "config.json").unlink(), "config.json", "missing"),
        (lambda d: (d / "config.json").write_text("{"), "config.json", "invalid JSON"),
        (lambda d: (d / "config.json").write_text("[]"), "config.json", "JSON object"),
        (
            lambda d: (d / "tokenizer_config.json").write_text("nope"),
            "tokenizer_config.json",
            "invalid JSON",
        ),
        (
            lambda d: edit_json(d / "config.json", lambda c: c.update(vocab_size="big")),
            "config.json",
            "vocab_size",
        ),
        (
            lambda d: edit_json(d / "config.json", lambda c: c.update(eos_token_id=[1, 10**6])),
            "config.json",
            "eos_token_id",
        ),
        (
            lambda d: edit_json(d / "generation_config.json", lambda c: c.update(eos_token_id="x")),
            "generation_config.json",
            "eos_token_id",
        ),
        (
            lambda d: edit_json(d / "config.json", lambda c: c.update(max_position_embeddings=0)),
            "config.json",
            "max_position_embeddings",
        ),
        (
            lambda d: edit_json(
                d / "tokenizer_config.json", lambda c: c.update(chat_template="{% if %}")
            ),
            "tokenizer_config.json",
            "syntax",
        ),
        (
            lambda d: edit_json(
                d / "tokenizer_config.json",
                lambda c: c.update(chat_template=[{"name": "rag", "template": "x"}]),
            ),
            "tokenizer_config.json",
            "'default'",
        ),
        (
            lambda d: edit_json(d / "tokenizer_config.json", lambda c: c.update(chat_template=3)),
            "tokenizer_config.json",
            "chat_template",
        ),
        (
            lambda d: (d / "chat_template.jinja").write_text("{% endfor %}"),
            "chat_template.jinja",
            "syntax",
        ),
    ],
)
def test_load_errors_name_the_file(
    base_dir: Path, damage: Callable[[Path], object], file: str, message: str
) -> None:
    damage(base_dir)
    with pytest.raises(TokenizerLoadError, match=message) as raised:
        ModelTokenizer.from_dir(base_dir)
    assert str(base_dir / file) in str(raised.value)


def test_truncation_and_padding_in_tokenizer_json_are_ignored(base_dir: Path) -> None:
    tokenizer = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    tokenizer.enable_truncation(4)
    tokenizer.enable_padding(length=64, pad_id=0, pad_token="<|endoftext|>")
    tokenizer.save(str(base_dir / "tokenizer.json"))
    ours, hf = ModelTokenizer.from_dir(base_dir), AutoTokenizer.from_pretrained(base_dir)
    text = "a prompt of more than four tokens"
    assert ours.encode_prompt(text) == hf.encode(text)
    assert 4 < len(ours.encode_prompt(text)) < 64


def test_context_length_falls_back_to_model_max_length(base_dir: Path) -> None:
    edit_json(base_dir / "config.json", lambda c: c.pop("max_position_embeddings"))
    assert ModelTokenizer.from_dir(base_dir).context_length == 131072
    # transformers' "no limit" value is not a context length.
    edit_json(base_dir / "tokenizer_config.json", lambda c: c.update(model_max_length=int(1e30)))
    with pytest.raises(TokenizerLoadError, match="max_position_embeddings"):
        ModelTokenizer.from_dir(base_dir)


def test_text_config_of_multimodal_layouts(base_dir: Path) -> None:
    def nest(config: dict[str, Any]) -> None:
        keys = ("vocab_size", "max_position_embeddings", "eos_token_id")
        config["text_config"] = {key: config.pop(key) for key in keys} | {"eos_token_id": 5}

    edit_json(base_dir / "config.json", nest)
    tokenizer = ModelTokenizer.from_dir(base_dir)
    assert (tokenizer.vocab_size, tokenizer.context_length) == (768, 4096)
    assert 5 in tokenizer.stop_token_ids


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(TokenizerLoadError, match="not a directory"):
        ModelTokenizer.from_dir(tmp_path / "absent")


def test_token_bytes_rebuild_the_text_even_across_split_characters(tmp_path: Path) -> None:
    from miner.test_model import write_byte_level_tokenizer

    write_byte_level_tokenizer(tmp_path, context_length=64)
    (tmp_path / "config.json").write_text('{"vocab_size": 300, "max_position_embeddings": 64}')
    tokenizer = ModelTokenizer.from_dir(tmp_path)
    text = "naïve café ✓ 😀"
    ids = tokenizer.encode_prompt(text)
    assert len(ids) > len(text)  # multi-byte characters span several tokens
    assert b"".join(tokenizer.token_bytes(i) for i in ids) == text.encode()
    assert any(tokenizer.decode([i]) == "\ufffd" for i in ids)  # what "token" text shows
    special = tokenizer.stop_token_ids[0]
    assert tokenizer.token_bytes(special) == b""  # decode drops it, so it adds nothing
    assert tokenizer.token_bytes(10**6) == b""
