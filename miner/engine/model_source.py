"""Where an engine's weights come from: a Hugging Face directory or a GGUF file, and its digest.

Every engine announces the same digest for the same source (``proto.weights_digest``), so a
coordinator can tell which miners serve the same weights whatever engine runs them. A GGUF file
is served from a plain model directory converted from it once (``miner.engine.gguf_cache``);
the digest announced is still the GGUF file's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miner.engine.base import ModelLoadError
from miner.engine.gguf_cache import prepare_gguf
from proto.gguf import is_gguf_path
from proto.weights_digest import NoWeightFilesError, weights_sha256

# Config attribute names that hold the context length, most common first.
CONTEXT_ATTRIBUTES = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "seq_length",
)


@dataclass(frozen=True)
class ModelSource:
    """A model ready to load."""

    directory: Path  # the Hugging Face directory an engine loads (a GGUF file's conversion)
    weights_sha256: bytes  # what the miner announces: the directory's or the GGUF file's digest
    origin: Path  # what the operator named: the directory itself or the GGUF file

    def describe(self) -> str:
        """The source for a message: the directory, or the GGUF file and where it was converted."""
        if self.directory == self.origin:
            return str(self.directory)
        return f"{self.origin} (converted in {self.directory})"


def resolve_source(source: Path, *, cache_dir: Path | None) -> ModelSource:
    """Blocking (hashes the weights, may convert a GGUF file): the directory to load ``source``
    from and its digest. Raises :class:`ModelLoadError` when ``source`` cannot be served.

    There is no default cache: a GGUF source without ``cache_dir`` is an error, rather than
    gigabytes written somewhere the caller did not choose.
    """
    if is_gguf_path(source):
        if cache_dir is None:
            raise ModelLoadError(
                f"{source}: serving a GGUF file needs a cache directory (cache_dir)"
            )
        cached = prepare_gguf(source, cache_dir=cache_dir)
        return ModelSource(
            directory=cached.directory, weights_sha256=cached.source_sha256, origin=source
        )
    if not source.is_dir():
        raise ModelLoadError(f"model directory {source} does not exist")
    if not (source / "config.json").is_file():
        raise ModelLoadError(f"{source} has no config.json; expected a Hugging Face model dir")
    try:
        digest = weights_sha256(source)
    except NoWeightFilesError as exc:
        raise ModelLoadError(f"{source} holds no weight files (*.safetensors, *.bin)") from exc
    return ModelSource(directory=source, weights_sha256=digest, origin=source)


def context_length(config: Any) -> int:
    """The context length a transformers (text) config names; :class:`ModelLoadError` if none."""
    for attribute in CONTEXT_ATTRIBUTES:
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ModelLoadError(f"the model config names no context length (one of {CONTEXT_ATTRIBUTES})")


def vocab_size(config: Any, *, where: Path) -> int:
    """The logits width a transformers (text) config names; :class:`ModelLoadError` if none."""
    value = getattr(config, "vocab_size", None)
    if not isinstance(value, int) or value < 1:
        raise ModelLoadError(f"the config of {where} has no vocab_size")
    return value
