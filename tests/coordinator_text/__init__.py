"""Tests of the coordinator's tokenizer, detokenizer and catalog.

Builders shared by the test modules live here: model directories whose tokenizers are trained
on the spot (byte-level BPE with real merges, so multi-byte characters split across tokens, and a
SentencePiece-style one with byte fallback) and chat templates written the way Qwen2.5 and
Llama 3 write theirs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 12345 o'clock, isn't it?",
    "Ça va très bien, merci ! Żółć gęślą jaźń. Grüße aus Köln.",
    "你好，世界。我们今天去公园散步吧。你好你好世界",  # noqa: RUF001 (CJK punctuation on purpose)
    "こんにちは世界、カタカナとひらがな。",
    "emoji 😀🎉🚀 and flags 🇫🇷🇯🇵, numbers 67890",
    "def f(x):\n    return x * 2  # double\n\n",
    "Привет, как дела? Хорошо, спасибо.",
] * 20

# The pre-tokenizer patterns of Qwen2 and Llama 3 (they differ in how digits are grouped).
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2.5's template (default system message, loop.first), plus what Qwen3 and others use:
# namespace(), tojson with non-ASCII and HTML characters, tojson(indent=...), loop.last, and
# blocks without "-" so that trim_blocks / lstrip_blocks decide the whitespace.
QWEN_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_user=-1, users=0) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}
        {%- set ns.last_user = loop.index0 %}
        {%- set ns.users = ns.users + 1 %}
    {%- endif %}
{%- endfor %}
{% if messages | length > 3 %}
    {% set turns = messages | length %}
    {{ '<|im_start|>system\\nturns: ' ~ turns }}
    {{ {'roles': messages | map(attribute='role') | list, 'note': 'café ☕ <b>&'} | tojson(indent=2) }}
{% endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content }}
        {%- if loop.index0 == ns.last_user %}
            {{- '\\n' + {'turn': ns.users, 'note': 'naïve <tag> & "quotes"'} | tojson }}
        {%- endif %}
        {{- '<|im_end|>' + ('\\n' if not loop.last or add_generation_prompt else '') }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501 (templates are quoted as their authors write them)

# Llama 3.1's template, tools left out: BOS written by the template, strftime_now, trim, roles
# checked with raise_exception.
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('Conversation roles must be user or assistant after the system message') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""  # noqa: E501

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
]


def train_byte_level_bpe(*, pattern: str, special_tokens: list[str], vocab_size: int) -> Tokenizer:
    """A GPT-2-style byte-level BPE trained on :data:`CORPUS`, specials first."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=special_tokens,
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return tokenizer


def train_sentencepiece_bpe() -> Tokenizer:
    """A Llama-2-style tokenizer: "▁" for spaces, byte fallback, BOS from the post-processor."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    # Trained on ASCII only, so every other character goes through byte fallback.
    tokenizer.train_from_iterator([line for line in CORPUS if line.isascii()], trainer=trainer)
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["pre_tokenizer"] = None
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    result = Tokenizer.from_str(json.dumps(spec))
    result.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return result


def write_model_dir(
    model_dir: Path,
    tokenizer: Tokenizer,
    *,
    tokenizer_config: dict[str, Any],
    config: dict[str, Any],
    generation_config: dict[str, Any] | None = None,
) -> Path:
    """A model directory without weights: what the coordinator reads."""
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    if generation_config is not None:
        (model_dir / "generation_config.json").write_text(json.dumps(generation_config))
    return model_dir


def qwen_style_dir(model_dir: Path) -> Path:
    """Qwen2.5 layout: no BOS, ChatML, eos <|im_end|>, config vocab larger than the tokenizer's."""
    tokenizer = train_byte_level_bpe(
        pattern=QWEN_PATTERN, special_tokens=QWEN_SPECIALS, vocab_size=700
    )
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    ids = {token: tokenizer.token_to_id(token) for token in QWEN_SPECIALS}
    return write_model_dir(
        model_dir,
        tokenizer,
        tokenizer_config={
            "tokenizer_class": "Qwen2Tokenizer",
            "add_bos_token": False,
            "add_prefix_space": False,
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "errors": "replace",
            "split_special_tokens": False,
            "model_max_length": 131072,
            "clean_up_tokenization_spaces": False,
            "chat_template": QWEN_TEMPLATE,
        },
        config={
            "model_type": "qwen2",
            "vocab_size": 768,
            "max_position_embeddings": 4096,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|endoftext|>"],
        },
        generation_config={
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        },
    )


def llama3_style_dir(model_dir: Path) -> Path:
    """Llama 3.1 layout: BOS added by the post-processor, the template writes it for chats."""
    tokenizer = train_byte_level_bpe(
        pattern=LLAMA3_PATTERN, special_tokens=LLAMA3_SPECIALS, vocab_size=600
    )
    bos = "<|begin_of_text|>"
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, tokenizer.token_to_id(bos))],
            ),
        ]
    )
    ids = {token: tokenizer.token_to_id(token) for token in LLAMA3_SPECIALS}
    return write_model_dir(
        model_dir,
        tokenizer,
        tokenizer_config={
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": bos,
            "eos_token": "<|eot_id|>",
            "clean_up_tokenization_spaces": True,
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 131072,
            "chat_template": LLAMA3_TEMPLATE,
        },
        config={
            "model_type": "llama",
            "vocab_size": tokenizer.get_vocab_size(),
            "max_position_embeddings": 131072,
            "bos_token_id": ids[bos],
            "eos_token_id": [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]],
        },
        generation_config={
            "bos_token_id": ids[bos],
            "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]],
        },
    )


def sentencepiece_style_dir(model_dir: Path) -> Path:
    """Llama 2 layout: SentencePiece-style BPE with byte fallback, BOS from the post-processor."""
    tokenizer = train_sentencepiece_bpe()
    return write_model_dir(
        model_dir,
        tokenizer,
        tokenizer_config={
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": {"__type": "AddedToken", "content": "<s>", "normalized": False},
            "eos_token": {"__type": "AddedToken", "content": "</s>", "normalized": False},
            "unk_token": "<unk>",
            "legacy": False,
            "chat_template": (
                "{{ bos_token }}{% for message in messages %}"
                "{% if message['role'] == 'user' %}"
                "{{ '[INST] ' + message['content'] + ' [/INST]' }}"
                "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
            ),
        },
        config={"model_type": "llama", "vocab_size": 600, "max_position_embeddings": 2048},
    )
