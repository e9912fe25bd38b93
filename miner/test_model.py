"""A tiny, deterministic Llama-architecture model in standard Hugging Face layout.

Tests and offline demos use it because model weights cannot be downloaded at run time. The
directory it writes loads through exactly the path a real model takes (``config.json``,
``model.safetensors``, ``tokenizer.json`` with a chat template), so everything downstream of
loading is exercised for real. Its output is random-looking text; it is not a language model.
:func:`create_test_gguf` writes the same model as one GGUF file, as llama.cpp users have them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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

    vocab = {token: index for index, token in enumerate(_byte_level_tokens())}
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
    from transformers import GenerationConfig

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = write_byte_level_tokenizer(model_dir, context_length=context_length)
    model = _random_model(
        seed=seed,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        context_length=context_length,
    )
    model.save_pretrained(model_dir, safe_serialization=True)
    config = model.config
    GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    ).save_pretrained(model_dir)
    return model_dir


LLAMA_25M = {"hidden_size": 512, "num_layers": 11}
"""Arguments of :func:`create_test_model` for a random Llama of about 25M parameters (26.2M:
11 layers of 9 x 512^2 weights, plus the byte-level embeddings), for benchmarks that need the
engine's time to go into matrix products rather than Python: the default tiny model spends
about a millisecond a token, mostly outside the model."""


def create_test_gguf(
    path: Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    context_length: int = 512,
) -> Path:
    """Writes the model :func:`create_test_model` writes (same arguments, same weights) as one
    GGUF file at ``path``, the way llama.cpp's converter would; returns ``path``.

    F32 tensors under llama.cpp's names (Q/K rows permuted as its converter does), llama
    hyperparameters, and the same byte-level ChatML tokenizer as GGUF metadata, so transformers
    loads exactly the weights and tokenizer of the directory. One difference from a llama.cpp
    file: the vocabulary has token scores instead of an (empty) merges list, which GGUF cannot
    store, so llama.cpp itself would refuse the tokenizer. The file is byte-identical for the
    same arguments on the same torch version.
    """
    import numpy as np
    import torch
    from gguf import GGUFWriter, LlamaFileType, TokenType

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = _byte_level_tokens()
    model = _random_model(
        seed=seed,
        vocab_size=len(tokens),
        hidden_size=hidden_size,
        num_layers=num_layers,
        context_length=context_length,
    )
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    writer = GGUFWriter(path, arch="llama")
    writer.add_name("meshmint tiny test model")
    writer.add_file_type(LlamaFileType.ALL_F32)
    writer.add_vocab_size(len(tokens))
    writer.add_context_length(context_length)
    writer.add_embedding_length(hidden_size)
    writer.add_block_count(num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden_size // heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    # GGUF cannot store an empty merges list; without one, readers derive the merges from the
    # scores, and a vocabulary of single bytes plus specials yields none (bytes stay bytes).
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(
        [TokenType.CONTROL if token in SPECIAL_TOKENS else TokenType.NORMAL for token in tokens]
    )
    writer.add_bos_token_id(tokens.index(BOS_TOKEN))
    writer.add_eos_token_id(tokens.index(IM_END))
    # The directory's generation config stops at both; llama.cpp's spelling of the second one.
    writer.add_eot_token_id(tokens.index(EOS_TOKEN))
    writer.add_pad_token_id(tokens.index(EOS_TOKEN))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in model.state_dict().items():
        array = tensor.detach().to(torch.float32).numpy()
        if name.endswith("self_attn.q_proj.weight"):
            array = _llama_cpp_permute(array, heads)
        elif name.endswith("self_attn.k_proj.weight"):
            array = _llama_cpp_permute(array, kv_heads)
        writer.add_tensor(_gguf_tensor_name(name), np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _byte_level_tokens() -> list[str]:
    """The vocabulary in id order: the 256 byte symbols (sorted), then the special tokens."""
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet()) + list(SPECIAL_TOKENS)


def _random_model(
    *, seed: int, vocab_size: int, hidden_size: int, num_layers: int, context_length: int
) -> Any:
    """The tiny Llama with seeded random weights, in float32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

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
    return model


# Hugging Face Llama parameter names -> llama.cpp's, per block and for the whole model.
_GGUF_BLOCK_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GGUF_MODEL_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}


def _gguf_tensor_name(name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``blk.3.ffn_up.weight``."""
    module, _, kind = name.rpartition(".")
    if module in _GGUF_MODEL_NAMES:
        return f"{_GGUF_MODEL_NAMES[module]}.{kind}"
    _, _, layer, rest = module.split(".", 3)  # "model", "layers", "3", "mlp.up_proj"
    return f"blk.{layer}.{_GGUF_BLOCK_NAMES[rest]}.{kind}"


def _llama_cpp_permute(weight: Any, heads: int) -> Any:
    """Reorders a Q or K projection's rows as llama.cpp's converter does for llama.

    Hugging Face's rotary embedding rotates the two halves of each head; llama.cpp's rotates
    interleaved pairs, so its converter interleaves the halves of every head's rows, and
    transformers' GGUF loader undoes exactly this when it reads the file back.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )
