"""The coordinator's own tokenizer: plain prompts, chat templates, decoding and stop tokens.

The coordinator bills every token, so it tokenizes requests itself from the files of the model
directory, or the metadata of a GGUF file, and never trusts a miner's count. It runs without
torch and transformers: the ``tokenizers`` library encodes and decodes, and ``jinja2`` renders
chat templates in the same sandbox, with the same globals and filters, as transformers'
``apply_chat_template``, so the ids are the ones the model saw in training.

Exceptions::

    TokenizerError(ValueError)
    ├── TokenizerLoadError     a model file (directory or GGUF) is missing or invalid (startup)
    └── ChatTemplateError      no chat template, or the template rejected the messages (per request)
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import AddedToken, Tokenizer, decoders, processors

from coordinator.api import ChatMessage
from coordinator.errors import CoordinatorError
from coordinator.text.chat_template import TEMPLATE_FAILURES, compile_chat_template
from proto.gguf import is_gguf_path

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_JSON_FILE = "chat_template.json"
MODEL_CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"

_MAX_SANE_CONTEXT = 100_000_000
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


class TokenizerError(CoordinatorError, ValueError):
    """Root of the tokenizer's errors."""


class TokenizerLoadError(TokenizerError):
    """A file of the model directory, or the GGUF file, is missing or invalid; the message names
    the file."""


class ChatTemplateError(TokenizerError):
    """The model has no chat template, or its template rejected the messages (a buyer error)."""


class ModelTokenizer:
    """Everything the coordinator needs to turn a request into token ids and ids into text.

    Build it with :meth:`from_dir` or :meth:`from_gguf`. Instances are immutable after loading
    and safe to share between threads. Encoding takes about a microsecond per byte of text:
    inline is fine for normal prompts (a 20 kB chat encodes in ~7 ms), but hand prompts of
    hundreds of kilobytes to a thread rather than stall the event loop.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        name: str,
        chat_template: jinja2.Template | None,
        template_tokens: Mapping[str, str],
        stop_token_ids: tuple[int, ...],
        vocab_size: int,
        context_length: int,
    ) -> None:
        self._tokenizer = tokenizer
        self._chat_template = chat_template
        self._template_tokens = dict(template_tokens)
        added = tokenizer.get_added_tokens_decoder()
        self._special_ids = frozenset(id_ for id_, token in added.items() if token.special)
        self._known_ids = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self._added_ids = frozenset(added)
        self._byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
        self.name = name  # used in error messages only
        self.stop_token_ids = stop_token_ids  # generation ends after any of these
        self.vocab_size = vocab_size  # every valid token id is below this
        self.context_length = context_length  # prompt + completion tokens

    @classmethod
    def from_dir(cls, model_dir: Path, *, name: str | None = None) -> ModelTokenizer:
        """Loads the tokenizer of a Hugging Face model directory; no weight file is read.

        Raises :class:`TokenizerLoadError` naming the file that is missing or invalid.
        """
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise TokenizerLoadError(f"{model_dir}: not a directory")
        tokenizer_file = model_dir / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise TokenizerLoadError(f"{tokenizer_file}: missing (a fast tokenizer is required)")
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as error:  # the Rust loader raises a bare Exception
            raise TokenizerLoadError(f"{tokenizer_file}: cannot load: {error}") from error
        # transformers never truncates or pads unless asked; tokenizer.json may enable both.
        tokenizer.no_truncation()
        tokenizer.no_padding()

        tokenizer_config = _read_json(model_dir / TOKENIZER_CONFIG_FILE, required=False) or {}
        tokens = _named_tokens(model_dir, tokenizer_config)
        _add_missing_tokens(tokenizer, tokenizer_config, tokens)
        tokenizer.encode_special_tokens = bool(tokenizer_config.get("split_special_tokens", False))
        apply_bos_eos(tokenizer, tokenizer_config, tokens)

        config = _read_json(model_dir / MODEL_CONFIG_FILE, required=True) or {}
        generation_config = _read_json(model_dir / GENERATION_CONFIG_FILE, required=False) or {}
        vocab_size = _vocab_size(tokenizer, config, model_dir / MODEL_CONFIG_FILE)
        eos_id = tokenizer.token_to_id(tokens["eos_token"]) if "eos_token" in tokens else None
        stop_ids = unique_in_order(
            [
                *_token_ids(generation_config, model_dir / GENERATION_CONFIG_FILE, vocab_size),
                *_token_ids(config, model_dir / MODEL_CONFIG_FILE, vocab_size),
                *([eos_id] if eos_id is not None else []),
            ]
        )
        if not stop_ids:
            logger.warning(
                "%s: no end-of-sequence token; completions stop at max_tokens", model_dir
            )
        template = _load_chat_template(model_dir, tokenizer_config)
        return cls(
            tokenizer,
            name=name if name is not None else model_dir.name,
            chat_template=template,
            template_tokens=tokens,
            stop_token_ids=stop_ids,
            vocab_size=vocab_size,
            context_length=_context_length(config, tokenizer_config, model_dir),
        )

    @classmethod
    def from_gguf(cls, path: Path, *, name: str | None = None) -> ModelTokenizer:
        """Loads the tokenizer stored in a GGUF file's metadata; no tensor data is read.

        Raises :class:`TokenizerLoadError` naming the file (missing, truncated, unsupported).
        """
        # Imported here because that module builds on this one's errors and helpers.
        from coordinator.text.gguf_tokenizer import load_gguf_tokenizer

        parts = load_gguf_tokenizer(Path(path))
        return cls(
            parts.tokenizer,
            name=name if name is not None else Path(path).stem,
            chat_template=parts.chat_template,
            template_tokens=parts.template_tokens,
            stop_token_ids=parts.stop_token_ids,
            vocab_size=parts.vocab_size,
            context_length=parts.context_length,
        )

    @classmethod
    def from_source(cls, source: Path, *, name: str | None = None) -> ModelTokenizer:
        """:meth:`from_gguf` for a ``.gguf`` file, :meth:`from_dir` for anything else."""
        source = Path(source)
        if is_gguf_path(source):
            return cls.from_gguf(source, name=name)
        return cls.from_dir(source, name=name)

    @property
    def has_chat_template(self) -> bool:
        return self._chat_template is not None

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a plain completion prompt, with BOS/EOS where the tokenizer adds them."""
        return list(self._tokenizer.encode(text, add_special_tokens=True).ids)

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        """The chat template's text for ``messages``, ending with the assistant's turn header."""
        if self._chat_template is None:
            raise ChatTemplateError(
                f"model '{self.name}' has no chat template; use /v1/completions"
            )
        if not messages:
            raise ChatTemplateError("messages must not be empty")
        conversation = [{"role": message.role, "content": message.content} for message in messages]
        try:
            return self._chat_template.render(
                messages=conversation,
                tools=None,
                documents=None,
                add_generation_prompt=True,
                **self._template_tokens,
            )
        except TEMPLATE_FAILURES as error:
            # The error's type only: its message may quote the messages (README, "Privacy").
            logger.info(
                "chat template of %s rejected a request: %s", self.name, type(error).__name__
            )
            raise ChatTemplateError(
                f"the chat template of model '{self.name}' rejected the messages: {error}"
            ) from error

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Ids of a chat, rendered as ``apply_chat_template(..., add_generation_prompt=True)``.

        Special tokens the template writes are parsed as special tokens, and the tokenizer adds
        none of its own (the template places BOS itself), exactly as transformers does.
        """
        text = self.render_chat(messages)
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` without special tokens; ids outside the tokenizer's vocabulary vanish."""
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=True))

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes ``token_id`` adds to decoded text (OpenAI's logprobs ``bytes``): a token
        holding part of a UTF-8 character has the real part, not U+FFFD.

        Byte-level BPE pieces map back through GPT-2's byte alphabet, SentencePiece byte pieces
        (``<0x0A>``) are their byte and ``▁`` a space; added tokens are their text; special and
        unknown ids add nothing, as in :meth:`decode`.
        """
        if token_id in self._special_ids or not 0 <= token_id < self._known_ids:
            return b""
        piece = self._tokenizer.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self._added_ids:
            return piece.encode("utf-8")
        if self._byte_level and all(char in _BYTE_OF_SYMBOL for char in piece):
            return bytes(_BYTE_OF_SYMBOL[char] for char in piece)
        byte_piece = _BYTE_PIECE.fullmatch(piece)
        if byte_piece is not None:
            return bytes([int(byte_piece.group(1), 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def text_ids(self, ids: Sequence[int]) -> list[int]:
        """``ids`` less those :meth:`decode` drops (special or unknown): same text, fewer ids."""
        return [id_ for id_ in ids if id_ < self._known_ids and id_ not in self._special_ids]


def _byte_symbols() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: the symbol byte-level BPE writes for each byte."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    symbols = {chr(byte): byte for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in printable:
            symbols[chr(256 + extra)] = byte
            extra += 1
    return symbols


_BYTE_OF_SYMBOL = _byte_symbols()
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _read_json(path: Path, *, required: bool) -> dict[str, Any] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise TokenizerLoadError(f"{path}: missing") from None
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise TokenizerLoadError(f"{path}: cannot read: {error}") from error
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise TokenizerLoadError(f"{path}: invalid JSON: {error}") from error
    if not isinstance(data, dict):
        raise TokenizerLoadError(f"{path}: expected a JSON object")
    return data


def _token_content(value: object) -> str | None:
    """A special token written as a string or as a serialized AddedToken ``{"content": ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _named_tokens(model_dir: Path, tokenizer_config: Mapping[str, Any]) -> dict[str, str]:
    """``bos_token``, ``eos_token``, ... as transformers' ``special_tokens_map`` gives them.

    These are also the variables the chat template sees. Like transformers, the legacy
    special_tokens_map.json overrides the config unless the config lists its added tokens.
    """
    sources: list[Mapping[str, Any]] = [tokenizer_config]
    if "added_tokens_decoder" not in tokenizer_config:
        legacy = _read_json(model_dir / SPECIAL_TOKENS_MAP_FILE, required=False)
        if legacy is not None:
            sources.append(legacy)
    tokens: dict[str, str] = {}
    for source in sources:
        for key, value in source.items():
            content = _token_content(value)
            if key.endswith("_token") and content is not None:
                tokens[key] = content
    return tokens


def _add_missing_tokens(
    tokenizer: Tokenizer, tokenizer_config: Mapping[str, Any], tokens: Mapping[str, str]
) -> None:
    """Adds tokens the config declares but tokenizer.json lacks, as transformers does on load."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    declared = tokenizer_config.get("added_tokens_decoder")
    if isinstance(declared, dict):
        for spec in declared.values():
            content = _token_content(spec)
            if isinstance(spec, dict) and content is not None and content not in vocab:
                flags = {key: bool(spec[key]) for key in _ADDED_TOKEN_FLAGS if key in spec}
                tokenizer.add_tokens([AddedToken(content, **flags)])
    extra: list[str] = []
    for key in ("additional_special_tokens", "extra_special_tokens"):
        listed = tokenizer_config.get(key)
        if isinstance(listed, list):
            extra.extend(content for item in listed if (content := _token_content(item)))
    missing = [token for token in [*tokens.values(), *extra] if token not in vocab]
    if missing:
        tokenizer.add_special_tokens(
            [
                AddedToken(token, special=True, normalized=False)
                for token in unique_in_order(missing)
            ]
        )


def apply_bos_eos(
    tokenizer: Tokenizer, tokenizer_config: Mapping[str, Any], tokens: Mapping[str, str]
) -> None:
    """Honours ``add_bos_token`` / ``add_eos_token`` when tokenizer.json has no post-processor.

    With a post-processor, transformers (v5) lets it decide and ignores the flags, and so do we.
    Without one, transformers v5 adds nothing, but v4 and the slow Llama/Gemma tokenizers add
    BOS when the config asks for it; the config states the model's intent, so we follow it.
    """
    if tokenizer.post_processor is not None:
        return
    add_bos = tokenizer_config.get("add_bos_token") is True and "bos_token" in tokens
    add_eos = tokenizer_config.get("add_eos_token") is True and "eos_token" in tokens
    if not (add_bos or add_eos):
        return
    bos, eos = tokens.get("bos_token", ""), tokens.get("eos_token", "")
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = (
        f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single,
        pair=pair,
        special_tokens=[
            (token, tokenizer.token_to_id(token))
            for token, wanted in ((bos, add_bos), (eos, add_eos))
            if wanted
        ],
    )


def _section(config: Mapping[str, Any], key: str) -> object:
    """A top-level config value, or the one under ``text_config`` (multimodal layouts)."""
    if config.get(key) is not None:
        return config[key]
    text_config = config.get("text_config")
    return text_config.get(key) if isinstance(text_config, dict) else None


def _positive(value: object, path: Path, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise TokenizerLoadError(f"{path}: {key} must be a positive integer, not {value!r}")


def _vocab_size(tokenizer: Tokenizer, config: Mapping[str, Any], path: Path) -> int:
    tokenizer_size = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1
    declared = _section(config, "vocab_size")
    return (
        tokenizer_size
        if declared is None
        else max(tokenizer_size, _positive(declared, path, "vocab_size"))
    )


def _token_ids(config: Mapping[str, Any], path: Path, vocab_size: int) -> list[int]:
    value = _section(config, "eos_token_id")
    values = value if isinstance(value, list) else [] if value is None else [value]
    for item in values:
        if not isinstance(item, int) or isinstance(item, bool) or not 0 <= item < vocab_size:
            raise TokenizerLoadError(
                f"{path}: eos_token_id must be token ids below {vocab_size}, not {value!r}"
            )
    return list(values)


def _context_length(
    config: Mapping[str, Any], tokenizer_config: Mapping[str, Any], model_dir: Path
) -> int:
    for key in _CONTEXT_KEYS:
        if (value := _section(config, key)) is not None:
            return _positive(value, model_dir / MODEL_CONFIG_FILE, key)
    # transformers writes int(1e30) as model_max_length when a tokenizer has no limit.
    fallback = tokenizer_config.get("model_max_length")
    if type(fallback) is int and 0 < fallback <= _MAX_SANE_CONTEXT:
        return fallback
    raise TokenizerLoadError(
        f"{model_dir / MODEL_CONFIG_FILE}: no max_position_embeddings, and "
        f"{TOKENIZER_CONFIG_FILE} has no usable model_max_length"
    )


def unique_in_order(values: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(dict.fromkeys(values))


def _load_chat_template(
    model_dir: Path, tokenizer_config: Mapping[str, Any]
) -> jinja2.Template | None:
    """The default chat template, compiled; transformers' precedence between the files."""
    jinja_file = model_dir / CHAT_TEMPLATE_FILE
    source: tuple[Path, object]
    if jinja_file.is_file():
        try:
            source = (jinja_file, jinja_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as error:
            raise TokenizerLoadError(f"{jinja_file}: cannot read: {error}") from error
    elif tokenizer_config.get("chat_template") is not None:
        source = (model_dir / TOKENIZER_CONFIG_FILE, tokenizer_config["chat_template"])
    else:
        legacy = _read_json(model_dir / CHAT_TEMPLATE_JSON_FILE, required=False) or {}
        if legacy.get("chat_template") is None:
            return None
        source = (model_dir / CHAT_TEMPLATE_JSON_FILE, legacy["chat_template"])
    path, value = source
    text = _default_template(value, path)
    try:
        return compile_chat_template(text)
    except jinja2.TemplateSyntaxError as error:
        raise TokenizerLoadError(f"{path}: chat template syntax error: {error}") from error


def _default_template(value: object, path: Path) -> str:
    """A template string, or the ``"default"`` entry of a list of named templates."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        if isinstance(named.get("default"), str):
            return str(named["default"])
        raise TokenizerLoadError(f"{path}: chat_template lists no 'default' template")
    raise TokenizerLoadError(f"{path}: chat_template must be a string or a list of templates")
