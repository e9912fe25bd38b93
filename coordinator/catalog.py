"""The models this coordinator sells: names, weights hashes, prices, tokenizers.

A catalog comes from ``--model NAME=DIR`` or ``--model NAME=FILE.gguf`` flags
(:func:`catalog_from_specs`, one price for all) or from a TOML file (:func:`load_catalog`, a price
per model)::

    [[models]]
    name = "qwen2.5-0.5b-instruct"
    path = "/models/Qwen2.5-0.5B-Instruct"  # tokenizer/config files; weights unless hashed below
    weights_sha256 = "ab12..."               # optional: then no weight file is read
    input_price_per_million = "0.10"         # credits per million prompt tokens
    output_price_per_million = "0.30"        # credits per million completion tokens
    context_length = 32768                   # optional: at most the model's own

    [models.verification]                    # optional: spot-check thresholds for this model
    max_mean_abs_dlogprob = 0.02             # any field of verification.judge.Thresholds

A ``path`` ending in ``.gguf`` is a single GGUF file (llama.cpp's format): the tokenizer, chat
template and context length come from its metadata, and the weights digest is the file's
(:func:`proto.weights_digest.weights_sha256`). A missing or truncated file is a CatalogError.

Amounts are integers in micro-units (1 credit = 1,000,000). :func:`request_cost` is the one
billing formula.

Exceptions: :class:`CatalogError` (a ``ValueError``) for every invalid spec, file or field; it
names the file, the entry and the field. ``coordinator.errors.ModelNotFoundError`` from
:meth:`Catalog.get`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from coordinator.errors import CoordinatorError, ModelNotFoundError
from coordinator.text.tokenization import ModelTokenizer, TokenizerLoadError
from coordinator.verification.judge import Thresholds
from proto.weights_digest import NoWeightFilesError, weights_sha256

logger = logging.getLogger(__name__)

MICRO_UNITS = 1_000_000
"""Micro-units per credit."""
TOKENS_PER_PRICE_UNIT = 1_000_000
"""Prices are per million tokens."""
MAX_PRICE_PER_MTOK = 10**12
"""A million credits per million tokens: keeps every cost far inside a signed 64-bit integer."""

_Fail = Callable[[str, str], "CatalogError"]  # (field, problem) -> the error to raise
_NAME = re.compile(r"[A-Za-z0-9._:/-]{1,64}")
_ENTRY_KEYS = frozenset(
    {
        "name",
        "path",
        "weights_sha256",
        "input_price_per_million",
        "output_price_per_million",
        "context_length",
        "verification",
    }
)


class CatalogError(CoordinatorError, ValueError):
    """An invalid --model spec, catalog file or catalog field."""


@dataclass(frozen=True)
class CatalogEntry:
    """One model on sale."""

    name: str  # what buyers put in "model" and miners announce
    model_dir: Path | None  # where its tokenizer and config were read: a directory or a .gguf
    weights_sha256: bytes  # 32 bytes; a miner must announce exactly this
    context_length: int  # prompt + completion tokens, at most the model's own
    input_price_per_mtok: int  # micro-units per million prompt tokens
    output_price_per_mtok: int  # micro-units per million completion tokens
    tokenizer: ModelTokenizer  # the coordinator's own tokenizer for the model
    created: int  # unix time the entry was loaded
    verification: Thresholds = dataclasses.field(
        default_factory=Thresholds
    )  # when a spot check fails


def request_cost(entry: CatalogEntry, *, prompt_tokens: int, completion_tokens: int) -> int:
    """THE billing formula: what a request costs the buyer, in micro-units.

    ``ceil((prompt_tokens * input_price_per_mtok + completion_tokens * output_price_per_mtok)
    / 1_000_000)``, in exact integer arithmetic, rounded up once per request (never per token,
    so a request is never billed more than one micro-unit above its exact price).
    """
    if prompt_tokens < 0 or completion_tokens < 0:
        raise ValueError("token counts cannot be negative")
    exact = (
        prompt_tokens * entry.input_price_per_mtok + completion_tokens * entry.output_price_per_mtok
    )
    return -(-exact // TOKENS_PER_PRICE_UNIT)


def price_per_mtok(value: object) -> int:
    """Credits per million tokens (a decimal string or a number) as micro-units per million.

    Exact: a decimal with at most 6 places converts without rounding; anything else is refused.
    """
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"a price must be a decimal string or a number, not {value!r}")
    try:
        # str() of a float is its shortest repr, so TOML's 0.1 arrives as exactly 0.1.
        credits = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a decimal number") from None
    if not credits.is_finite() or credits < 0:
        raise ValueError(f"a price must be a finite, non-negative number, not {value!r}")
    micro = credits * MICRO_UNITS
    if micro != micro.to_integral_value():
        raise ValueError(f"a price has at most 6 decimal places, not {value!r}")
    if micro > MAX_PRICE_PER_MTOK:
        raise ValueError(f"a price above {MAX_PRICE_PER_MTOK // MICRO_UNITS} credits is refused")
    return int(micro)


class Catalog:
    """The entries by name. Like a read-only mapping, except that :meth:`get` raises."""

    def __init__(self, entries: Iterable[CatalogEntry]) -> None:
        self._entries: dict[str, CatalogEntry] = {}
        for entry in entries:
            if entry.name in self._entries:
                raise CatalogError(f"model '{entry.name}' is listed twice")
            self._entries[entry.name] = entry

    def get(self, name: str) -> CatalogEntry:
        """The entry for ``name``; ModelNotFoundError when there is none."""
        try:
            return self._entries[name]
        except KeyError:
            raise ModelNotFoundError(f"model '{name}' does not exist") from None

    def entries(self) -> list[CatalogEntry]:
        return list(self._entries.values())

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def catalog_from_specs(
    specs: Sequence[str], *, input_price_per_mtok: int, output_price_per_mtok: int
) -> Catalog:
    """A catalog from ``NAME=DIR`` or ``NAME=FILE.gguf`` specs, all at one price; hashes every
    model's weights."""
    for price in (input_price_per_mtok, output_price_per_mtok):
        if isinstance(price, bool) or not 0 <= price <= MAX_PRICE_PER_MTOK:
            raise CatalogError(f"price {price!r} is outside 0..{MAX_PRICE_PER_MTOK} micro-units")
    entries = []
    for spec in specs:
        name, separator, source = spec.partition("=")
        if not separator or not source:
            raise CatalogError(f"--model {spec!r}: expected NAME=DIR or NAME=FILE.gguf")
        _check_name(name, where=f"--model {spec!r}")
        model_dir = Path(source).expanduser()
        entries.append(
            _entry(
                name=name,
                model_dir=model_dir,
                digest=None,
                input_price=input_price_per_mtok,
                output_price=output_price_per_mtok,
                context_length=None,
                where=f"--model {spec!r}",
            )
        )
    if not entries:
        raise CatalogError(
            "no models: give --model NAME=DIR, --model NAME=FILE.gguf or --catalog FILE"
        )
    return Catalog(entries)


def load_catalog(path: Path) -> Catalog:
    """A catalog from a TOML file; relative model paths are relative to the file."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except OSError as error:
        raise CatalogError(f"{path}: cannot read: {error}") from error
    except tomllib.TOMLDecodeError as error:
        raise CatalogError(f"{path}: invalid TOML: {error}") from error
    unknown = set(document) - {"models"}
    if unknown:
        raise CatalogError(f"{path}: unknown top-level keys {sorted(unknown)}; expected [[models]]")
    models = document.get("models")
    if not isinstance(models, list) or not models:
        raise CatalogError(f"{path}: no [[models]] entries")
    entries: list[CatalogEntry] = []
    seen: set[str] = set()
    for index, table in enumerate(models):
        entry = _toml_entry(table, path=path, index=index)
        if entry.name in seen:
            raise CatalogError(f"{path}: models[{index}] ('{entry.name}'): name: listed twice")
        seen.add(entry.name)
        entries.append(entry)
    return Catalog(entries)


def _toml_entry(table: object, *, path: Path, index: int) -> CatalogEntry:
    where = f"{path}: models[{index}]"
    if not isinstance(table, dict):
        raise CatalogError(f"{where}: expected a table")
    name = table.get("name")
    if not isinstance(name, str):
        raise CatalogError(f"{where}: name: required, a string")
    _check_name(name, where=where)
    where = f"{where} ('{name}')"

    def fail(field: str, problem: str) -> CatalogError:
        return CatalogError(f"{where}: {field}: {problem}")

    unknown = set(table) - _ENTRY_KEYS
    if unknown:
        raise fail(sorted(unknown)[0], f"unknown field (known: {', '.join(sorted(_ENTRY_KEYS))})")
    source = table.get("path")
    if not isinstance(source, str) or not source:
        raise fail("path", "required, the model directory or .gguf file")
    model_dir = path.parent / Path(source).expanduser()
    digest = _hex_digest(table.get("weights_sha256"), fail)
    prices = []
    for field in ("input_price_per_million", "output_price_per_million"):
        if field not in table:
            raise fail(field, 'required, credits per million tokens (e.g. "0.25")')
        try:
            prices.append(price_per_mtok(table[field]))
        except ValueError as error:
            raise fail(field, str(error)) from None
    context_length = table.get("context_length")
    if context_length is not None and (type(context_length) is not int or context_length < 1):
        raise fail("context_length", f"must be a positive integer, not {context_length!r}")
    verification = _thresholds(table.get("verification", {}), fail)
    return _entry(
        name=name,
        model_dir=model_dir,
        digest=digest,
        input_price=prices[0],
        output_price=prices[1],
        context_length=context_length,
        where=where,
        verification=verification,
    )


def _thresholds(table: object, fail: _Fail) -> Thresholds:
    """Spot-check thresholds from a [models.verification] table; unset fields keep defaults."""
    if not isinstance(table, dict):
        raise fail("verification", "must be a table of threshold values")
    known = {item.name: item for item in dataclasses.fields(Thresholds)}
    values: dict[str, object] = {}
    for key, value in table.items():
        if key not in known:
            raise fail(f"verification.{key}", f"unknown (known: {', '.join(sorted(known))})")
        wanted = type(getattr(Thresholds(), key))
        if wanted is float and type(value) is int:
            value = float(value)
        if type(value) is not wanted:
            kind = {int: "an integer", float: "a number", bool: "true or false"}[wanted]
            raise fail(f"verification.{key}", f"must be {kind}, not {value!r}")
        values[key] = value
    try:
        return Thresholds(**values)  # type: ignore[arg-type]
    except ValueError as error:
        raise fail("verification", str(error)) from None


def _hex_digest(value: object, fail: _Fail) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise fail("weights_sha256", "must be a string of 64 hex digits")
    try:
        digest = bytes.fromhex(value.strip())
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise fail("weights_sha256", f"must be 64 hex digits, not {value!r}")
    return digest


def _check_name(name: str, *, where: str) -> None:
    if not _NAME.fullmatch(name):
        raise CatalogError(
            f"{where}: name: {name!r} must be 1-64 characters of letters, digits and ._:/-"
        )


def _entry(
    *,
    name: str,
    model_dir: Path,
    digest: bytes | None,
    input_price: int,
    output_price: int,
    context_length: int | None,
    where: str,
    verification: Thresholds | None = None,
) -> CatalogEntry:
    """Loads the tokenizer (and hashes the weights when no digest is given) for one entry."""
    try:
        tokenizer = ModelTokenizer.from_source(model_dir, name=name)
    except TokenizerLoadError as error:
        raise CatalogError(f"{where}: path: {error}") from error
    if context_length is None:
        context_length = tokenizer.context_length
    elif context_length > tokenizer.context_length:
        raise CatalogError(
            f"{where}: context_length: {context_length} exceeds the model's own "
            f"{tokenizer.context_length}"
        )
    if digest is None:
        try:
            digest = weights_sha256(model_dir)
        except (NoWeightFilesError, OSError) as error:
            raise CatalogError(
                f"{where}: path: cannot hash the weights ({error}); "
                "give weights_sha256 to serve without weight files"
            ) from error
    logger.info("catalog: %s from %s, weights %s", name, model_dir, digest.hex()[:16])
    return CatalogEntry(
        name=name,
        model_dir=model_dir,
        weights_sha256=digest,
        context_length=context_length,
        input_price_per_mtok=input_price,
        output_price_per_mtok=output_price,
        tokenizer=tokenizer,
        created=int(time.time()),
        verification=verification or Thresholds(),
    )
