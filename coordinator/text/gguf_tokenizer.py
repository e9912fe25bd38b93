"""The tokenizer a GGUF file describes, rebuilt as a ``tokenizers.Tokenizer``.

A GGUF has no tokenizer.json: llama.cpp keeps the vocabulary, merges, token types and special
ids as ``tokenizer.ggml.*`` metadata, and names how text is split before the merges in
``tokenizer.ggml.pre``. :func:`load_gguf_tokenizer` turns that back into what
:class:`coordinator.text.tokenization.ModelTokenizer` needs. Two vocabularies:

- ``gpt2``: byte-level BPE, split by the regexes llama.cpp's ``llama-vocab.cpp`` maps the pre
  name to, in order, each isolating its matches: what the original tokenizer.json did (SmolLM2
  splits every digit apart). Transformers' GGUF loader knows fewer names and falls back to
  GPT-2's regex, so its ids can differ from ours (SmolLM2: " ½"); ours are the trained ones.
- ``llama``: SentencePiece (Llama 2, Mistral 7B, TinyLlama, Phi-3), as transformers builds it:
  BPE with merges ranked by the tokens' scores, byte fallback to the ``<0xNN>`` pieces, ``▁``
  for spaces and before the first word (unless ``tokenizer.ggml.add_space_prefix`` is false,
  which transformers ignores and llama.cpp honours).

Control and unknown tokens (types 3 and 2) become special added tokens and user-defined ones (4)
plain added tokens, so that ``<|im_start|>`` in a rendered chat is one token. Errors are
:class:`coordinator.text.tokenization.TokenizerLoadError`, naming the file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from coordinator.text.chat_template import compile_chat_template
from coordinator.text.tokenization import TokenizerLoadError, apply_bos_eos, unique_in_order
from proto.gguf import GGUFError, GGUFFile, read_gguf

logger = logging.getLogger(__name__)

SUPPORTED_MODELS = ("gpt2", "llama")
"""Values of ``tokenizer.ggml.model`` this module rebuilds."""

# llama_token_type in llama.cpp.
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4
_SPACE = "\u2581"  # SentencePiece's "▁"
_NAMED_IDS = {  # the chat template's variables, as transformers' GGUF loader names them
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}
_STOP_IDS = ("eos_token_id", "eot_token_id", "eom_token_id")  # generation ends after these
# Transformers builds these SentencePiece vocabularies in ways of their own (respelled tokens,
# merges in file order); without that code they would tokenize wrongly, so they are refused.
_UNSUPPORTED_SENTENCEPIECE_ARCHS = ("gemma", "gemma2", "gemma3")

# Pre-tokenizer regexes, written as the original tokenizer.json files write them.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_QWEN35 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _PreTokenizer:
    splits: tuple[str, ...]  # applied in order, each isolating its matches
    ignore_merges: bool = False  # a piece that is a whole token is taken as is
    add_bos: bool = False  # llama.cpp's default when the file has no add_bos_token


def _names(names: str, pre: _PreTokenizer) -> dict[str, _PreTokenizer]:
    return dict.fromkeys(names.split(), pre)


_PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    # llama.cpp's fallback for files without a (known) name: punctuation runs, then GPT-2's
    # regex, then digit runs cut into threes.
    **_names(
        "default",
        _PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")),
    ),
    **_names("falcon", _PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"))),
    **_names(
        "gpt-2 phi-2 mpt olmo jais exaone4 trillion granite-docling mellum a.x-4.0 gigachat",
        _PreTokenizer((_GPT2,)),
    ),
    **_names(
        "starcoder refact command-r smollm codeshell exaone minerva-7b mellum2",
        _PreTokenizer((r"\p{N}", _GPT2)),
    ),
    **_names(
        "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2",
        _PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True),
    ),
    **_names("dbrx smaug-bpe", _PreTokenizer((_LLAMA3,))),
    **_names(
        "qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open grok-2",
        _PreTokenizer((_QWEN2,)),
    ),
    **_names("qwen35", _PreTokenizer((_QWEN35,))),
    **_names("tekken", _PreTokenizer((_TEKKEN,), ignore_merges=True, add_bos=True)),
    **_names("gpt-4o llama4 kanana2 talkie minimax-m2", _PreTokenizer((_GPT4O,))),
}
SUPPORTED_PRE_TOKENIZERS = frozenset(_PRE_TOKENIZERS)
"""Values of ``tokenizer.ggml.pre`` this module knows (for ``gpt2`` vocabularies)."""


@dataclass(frozen=True)
class GGUFTokenizerParts:
    """What :class:`ModelTokenizer` is built from, read from one GGUF file."""

    tokenizer: Tokenizer
    chat_template: jinja2.Template | None
    template_tokens: dict[str, str]  # bos_token, eos_token, ... for the chat template
    stop_token_ids: tuple[int, ...]
    vocab_size: int
    context_length: int


def load_gguf_tokenizer(path: Path) -> GGUFTokenizerParts:
    """Reads the header of the GGUF file ``path`` (no tensor data) and rebuilds its tokenizer.

    Raises :class:`TokenizerLoadError` naming the file: unreadable, truncated, not a GGUF, or a
    tokenizer this module cannot rebuild.
    """
    try:
        return gguf_tokenizer_parts(read_gguf(path))
    except GGUFError as error:  # its message names the file already
        raise TokenizerLoadError(str(error)) from error


def gguf_tokenizer_parts(gguf: GGUFFile) -> GGUFTokenizerParts:
    """Rebuilds the tokenizer, chat template and limits of ``gguf`` from its metadata.

    Raises :class:`TokenizerLoadError` naming the file, or ``GGUFError`` when the file has no
    ``general.architecture``.
    """
    meta = _Metadata(gguf)
    model = meta.get("tokenizer.ggml.model")
    if model not in SUPPORTED_MODELS:
        raise meta.fail(
            f"tokenizer model {model!r} is not supported (supported: {', '.join(SUPPORTED_MODELS)})"
        )
    tokens = meta.tokens()
    types = meta.numbers("tokenizer.ggml.token_type", len(tokens), integers=True)
    if model == "gpt2":
        tokenizer, add_bos_default = _byte_level(meta, tokens)
    else:
        tokenizer, add_bos_default = _sentencepiece(meta, tokens), True

    ids = {key: meta.token_id(key, len(tokens)) for key in {*_NAMED_IDS.values(), *_STOP_IDS}}
    named = {name: tokens[i] for name, key in _NAMED_IDS.items() if (i := ids[key]) is not None}
    bos, eos = ids["bos_token_id"], ids["eos_token_id"]
    kinds = types or [1] * len(tokens)
    # BOS and EOS are special even in a file that types them as normal tokens.
    special = {i for i, kind in enumerate(kinds) if kind in (_UNKNOWN, _CONTROL)}
    special.update(i for i in (bos, eos) if i is not None)
    tokenizer.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special)]
    )
    user = [i for i, kind in enumerate(kinds) if kind == _USER_DEFINED and i not in special]
    tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])

    add_bos, add_eos = meta.flag("add_bos_token"), meta.flag("add_eos_token")
    for flag, token_id, what in ((add_bos, bos, "bos"), (add_eos, eos, "eos")):
        if flag and token_id is None:
            raise meta.fail(f"tokenizer.ggml.add_{what}_token is true, but no {what} id is set")
    if add_bos is None:
        add_bos = add_bos_default and bos is not None
    apply_bos_eos(tokenizer, {"add_bos_token": add_bos, "add_eos_token": add_eos}, named)

    stop_ids = unique_in_order(ids[key] for key in _STOP_IDS if ids[key] is not None)
    if not stop_ids:
        logger.warning("%s: no end-of-sequence token; completions stop at max_tokens", gguf.path)
    vocab_size = len(tokens)
    if gguf.arch_value("vocab_size") is not None:
        vocab_size = max(vocab_size, meta.positive("vocab_size"))
    return GGUFTokenizerParts(
        tokenizer=tokenizer,
        chat_template=meta.chat_template(),
        template_tokens=named,
        stop_token_ids=stop_ids,
        vocab_size=vocab_size,
        context_length=meta.positive("context_length"),
    )


def _byte_level(meta: _Metadata, tokens: list[str]) -> tuple[Tokenizer, bool]:
    """Byte-level BPE split as llama.cpp splits it; and whether llama.cpp adds BOS by default."""
    name = meta.get("tokenizer.ggml.pre")
    if name is None:
        logger.warning("%s: no tokenizer.ggml.pre; splitting as llama.cpp's 'default'", meta.path)
        name = "default"
    pre = _PRE_TOKENIZERS.get(name) if isinstance(name, str) else None
    if pre is None:
        raise meta.fail(
            f"pre-tokenizer {name!r} (tokenizer.ggml.pre) is not supported "
            f"(known: {', '.join(sorted(_PRE_TOKENIZERS))})"
        )
    tokenizer = _bpe(meta, tokens, _merges(meta, tokens), ignore_merges=pre.ignore_merges)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            *(pre_tokenizers.Split(Regex(split), behavior="isolated") for split in pre.splits),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, pre.add_bos


def _sentencepiece(meta: _Metadata, tokens: list[str]) -> Tokenizer:
    """A SentencePiece vocabulary as transformers' GGUF conversion builds it."""
    architecture = meta.gguf.architecture
    if architecture in _UNSUPPORTED_SENTENCEPIECE_ARCHS:
        raise meta.fail(f"the SentencePiece vocabulary of a {architecture} model is not supported")
    merges = _merges(meta, tokens)
    unk = meta.token_id("unknown_token_id", len(tokens))
    unk_token = None if unk is None else tokens[unk]
    tokenizer = _bpe(meta, tokens, merges, unk_token=unk_token, byte_fallback=True)
    prefix = meta.flag("add_space_prefix") is not False
    if architecture == "phi3":
        # Phi-3's tokenizer.json puts the space in a normalizer: before every text segment.
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Prepend(_SPACE), normalizers.Replace(" ", _SPACE)]
        )
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=_SPACE, prepend_scheme="first" if prefix else "never", split=False
        )
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _merges(meta: _Metadata, tokens: Sequence[str]) -> list[tuple[str, str]]:
    """The file's merges; without them, merges derived from the token scores, as transformers
    does (a byte-level vocabulary of single bytes has none: GGUF cannot store an empty list)."""
    merges = meta.merges()
    if merges is not None:
        return merges
    scores = meta.numbers("tokenizer.ggml.scores", len(tokens), integers=False)
    if scores is None:
        raise meta.fail("the vocabulary needs tokenizer.ggml.merges or tokenizer.ggml.scores")
    return _merges_from_scores(tokens, scores)


def _merges_from_scores(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, best score first: the merges of a SentencePiece
    vocabulary, in exactly the order transformers' ``generate_merges`` gives them."""
    rank = {token: index for index, token in enumerate(tokens)}
    candidates: list[tuple[str, str, float]] = []
    for token, score in zip(tokens, scores, strict=True):
        pairs = [
            (token[:cut], token[cut:])
            for cut in range(1, len(token))
            if token[:cut] in rank and token[cut:] in rank
        ]
        pairs.sort(key=lambda pair: (rank[pair[0]], rank[pair[1]]))
        candidates.extend((left, right, score) for left, right in pairs)
    # Stable and descending on all three keys, as transformers sorts them.
    candidates.sort(key=lambda item: (item[2], len(item[0]), len(item[1])), reverse=True)
    return [(left, right) for left, right, _ in candidates]


def _bpe(
    meta: _Metadata,
    tokens: list[str],
    merges: list[tuple[str, str]],
    *,
    ignore_merges: bool = False,
    unk_token: str | None = None,
    byte_fallback: bool = False,
) -> Tokenizer:
    try:
        model = models.BPE(
            vocab={token: index for index, token in enumerate(tokens)},
            merges=merges,
            unk_token=unk_token,
            fuse_unk=byte_fallback,
            byte_fallback=byte_fallback,
            ignore_merges=ignore_merges,
        )
    except Exception as error:  # the Rust builder raises a bare Exception
        raise meta.fail(f"invalid vocabulary or merges: {error}") from error
    return Tokenizer(model)


class _Metadata:
    """Typed reads of a GGUF's metadata; errors name the file and the key."""

    def __init__(self, gguf: GGUFFile) -> None:
        self.gguf = gguf
        self.path = gguf.path

    def fail(self, problem: str) -> TokenizerLoadError:
        return TokenizerLoadError(f"{self.path}: {problem}")

    def get(self, key: str) -> object:
        return self.gguf.metadata.get(key)

    def tokens(self) -> list[str]:
        key = "tokenizer.ggml.tokens"
        value = self.get(key)
        if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
            raise self.fail(f"{key} must be a non-empty list of strings")
        # llama.cpp's names for empty entries, which a vocabulary cannot hold twice.
        tokens = [token or f"[EMPTY_{index}]" for index, token in enumerate(value)]
        first: dict[str, int] = {}
        for index, token in enumerate(tokens):
            if first.setdefault(token, index) != index:
                raise self.fail(f"{key}: {token!r} is listed twice (ids {first[token]}, {index})")
        return tokens

    def merges(self) -> list[tuple[str, str]] | None:
        key = "tokenizer.ggml.merges"
        value = self.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(merge, str) for merge in value):
            raise self.fail(f"{key} must be a list of strings")
        merges = []
        for merge in value:
            # The first space after the first character separates the pair, as in llama.cpp.
            cut = merge.find(" ", 1)
            if cut < 0:
                raise self.fail(f"{key}: {merge!r} is not a pair")
            merges.append((merge[:cut], merge[cut + 1 :]))
        return merges

    def numbers(self, key: str, count: int, *, integers: bool) -> list[Any] | None:
        """The first ``count`` items of a list of numbers (of integers with ``integers``)."""
        value = self.get(key)
        if value is None:
            return None
        kinds = (int,) if integers else (int, float)
        if (
            not isinstance(value, list)
            or len(value) < count
            or not all(type(item) in kinds for item in value)
        ):
            raise self.fail(f"{key} must list {count} {'integers' if integers else 'numbers'}")
        return value[:count]

    def token_id(self, name: str, count: int) -> int | None:
        key = f"tokenizer.ggml.{name}"
        value = self.get(key)
        if value is None:
            return None
        if type(value) is not int or value < 0:
            raise self.fail(f"{key} must be a token id, not {value!r}")
        if value >= count:
            # llama.cpp ignores such an id with a warning rather than refusing the file.
            logger.warning("%s: %s = %d is not a token id; ignored", self.path, key, value)
            return None
        return value

    def flag(self, name: str) -> bool | None:
        key = f"tokenizer.ggml.{name}"
        value = self.get(key)
        if value is not None and not isinstance(value, bool):
            raise self.fail(f"{key} must be true or false, not {value!r}")
        return value

    def positive(self, name: str) -> int:
        """``<architecture>.<name>``, a positive integer."""
        value = self.gguf.arch_value(name)
        if type(value) is int and value > 0:
            return value
        raise self.fail(
            f"{self.gguf.architecture}.{name} must be a positive integer, not {value!r}"
        )

    def chat_template(self) -> jinja2.Template | None:
        source = self.get("tokenizer.chat_template")
        if source is None:
            return None
        if not isinstance(source, str):
            raise self.fail("tokenizer.chat_template must be a string")
        try:
            return compile_chat_template(source)
        except jinja2.TemplateSyntaxError as error:
            raise self.fail(f"chat template syntax error: {error}") from error
