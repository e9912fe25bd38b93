"""A tiny, deterministic Llama-architecture model in standard Hugging Face layout.

Tests and offline demos use it because model weights cannot be downloaded at run time. The
directory it writes loads through exactly the path a real model takes (``config.json``,
``model.safetensors``, ``tokenizer.json`` with a chat template), so everything downstream of
loading is exercised for real. Its output is random-looking text; it is not a language model.
"""

from __future__ import annotations

import json
from pathlib import Path

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, IM_START, IM_END)

# ChatML, the template most instruct models on the hub use.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_byte_level_tokenizer(model_dir: Path, *, context_length: int) -> int:
    """Writes a byte-level tokenizer (256 byte tokens plus the special tokens).

    Returns the vocabulary size. No merges: every UTF-8 byte is one token, so any text round-trips
    and the vocabulary is tiny.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.save(str(model_dir / "tokenizer.json"))
    write_tokenizer_config(model_dir, context_length=context_length)
    return len(vocab)


def write_tokenizer_config(model_dir: Path, *, context_length: int) -> None:
    """Writes tokenizer_config.json and special_tokens_map.json for a ChatML tokenizer."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": IM_END,
        "pad_token": EOS_TOKEN,
        "model_max_length": context_length,
        "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": BOS_TOKEN, "eos_token": IM_END, "pad_token": EOS_TOKEN}
    (model_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def create_test_model(
    model_dir: Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    context_length: int = 512,
) -> Path:
    """Writes a tiny random Llama model with a byte-level ChatML tokenizer into ``model_dir``.

    The same arguments give byte-identical weights (and so the same weights hash) on the same
    torch version.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = write_byte_level_tokenizer(model_dir, context_length=context_length)
    token_id = {token: 256 + offset for offset, token in enumerate(SPECIAL_TOKENS)}
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context_length,
        bos_token_id=token_id[BOS_TOKEN],
        eos_token_id=[token_id[IM_END], token_id[EOS_TOKEN]],
        pad_token_id=token_id[EOS_TOKEN],
        tie_word_embeddings=False,
        dtype="float32",
    )
    generator = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                # Wider than the usual 0.02 so logits are peaked and greedy decoding is stable.
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.25)
    model.save_pretrained(model_dir, safe_serialization=True)
    GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    ).save_pretrained(model_dir)
    return model_dir
