"""The weights hash a miner announces and the coordinator's catalog expects.

Defined here, in the protocol package, because both ends must compute exactly the same value:
SHA-256 over the weight files of a Hugging Face model directory, taken in sorted name order,
each contributing its name and its bytes.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

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


def weights_sha256(model_dir: Path) -> bytes:
    """The 32-byte weights digest of ``model_dir``. Reads every weight file once."""
    digest = hashlib.sha256(b"meshmint/v1/weights\x00")
    for path in weight_files(Path(model_dir)):
        name = path.name.encode("utf-8")
        digest.update(struct.pack(">IQ", len(name), path.stat().st_size) + name)
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.digest()
