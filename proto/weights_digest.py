"""The weights hash a miner announces and the coordinator's catalog expects.

Defined here, in the protocol package, because both ends must compute exactly the same value.
A model source is either a Hugging Face model directory or a single GGUF file:

- **Directory:** SHA-256 over the weight files, taken in sorted name order, each contributing
  its name, its size and its bytes (domain ``meshmint/v1/weights``).
- **GGUF file:** SHA-256 over the file's size and bytes (domain ``meshmint/v1/gguf``). The file
  name is left out, so two miners holding the same download under different names agree; the
  metadata is in, so a different quantization (or a re-upload with another tokenizer or chat
  template) of the same model is a different model.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from proto.gguf import is_gguf_path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_CHUNK = 8 * 1024 * 1024


class NoWeightFilesError(ValueError):
    """The directory holds no weight file (``*.safetensors``, ``*.bin``, ...)."""


def weight_files(model_dir: Path) -> list[Path]:
    """Weight files of a model directory, sorted by name. Index JSON files are not weights."""
    files = sorted(
        path
        for path in model_dir.iterdir()
        if path.is_file()
        and path.name.endswith(WEIGHT_SUFFIXES)
        and "training_args" not in path.name
    )
    if not files:
        raise NoWeightFilesError(f"no weight files in {model_dir}")
    return files


def weights_sha256(source: Path) -> bytes:
    """The 32-byte weights digest of a model directory or a ``.gguf`` file; reads it once."""
    source = Path(source)
    if is_gguf_path(source):
        return gguf_sha256(source)
    digest = hashlib.sha256(b"meshmint/v1/weights\x00")
    for path in weight_files(source):
        name = path.name.encode("utf-8")
        digest.update(struct.pack(">IQ", len(name), path.stat().st_size) + name)
        _update(digest, path)
    return digest.digest()


def gguf_sha256(path: Path) -> bytes:
    """The 32-byte weights digest of one GGUF file: its size and bytes, not its name."""
    digest = hashlib.sha256(b"meshmint/v1/gguf\x00")
    digest.update(struct.pack(">Q", Path(path).stat().st_size))
    _update(digest, Path(path))
    return digest.digest()


def _update(digest: hashlib._Hash, path: Path) -> None:
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
