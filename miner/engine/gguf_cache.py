"""Serving a GGUF file with transformers: convert it once into a cached model directory.

transformers reads GGUF files by dequantizing every tensor into a dense model, which takes
seconds per hundred million parameters, and the result cannot be ``save_pretrained``-ed. So the
miner converts a GGUF file once into a plain Hugging Face directory (float32 safetensors and
``config.json``) and loads that, in seconds, every later time.

Layout of ``cache_dir``, keyed by the file's weights digest (``proto.weights_digest``), so two
copies of one download share an entry and a re-quantized file never hits a stale one::

    <digest hex>/              model.safetensors, config.json, [generation_config.json],
                               manifest.json (written last: its presence marks a finished entry)
    <digest hex>.lock          flock()ed while an entry is checked or converted; never deleted,
                               since deleting a lock file lets two processes lock two inodes
    .<digest hex>.*.tmp/       a conversion in progress, renamed onto <digest hex>/ when complete

An entry is served only if its manifest names :data:`FORMAT_VERSION`, the same source digest,
the same transformers and gguf versions, and every file it lists has that size and SHA-256.
Anything else (a truncated or flipped file, a missing file, another format) is logged at
WARNING, deleted and converted again: a wrong cache would make the miner announce the GGUF's
digest while serving other weights, and fail spot checks. The converter versions are part of the
key because the conversion (tensor renaming, Q/K un-permutation, config mapping, dequantization)
is transformers' and gguf-py's code, and a fix there must reach a miner's weights; an upgrade
costs one conversion. Checking hashes reads the entry once per load (about 1 s per GB).

The conversion stays float32 whatever the serving dtype, so one entry serves every dtype and the
dequantized values (products of float16 scales) are kept exactly.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miner.engine.base import ModelLoadError
from proto.gguf import GGML_TYPES, GGUFError, GGUFFile, read_gguf
from proto.weights_digest import gguf_sha256

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""The cache layout; bump it whenever what a conversion writes changes."""
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
_REQUIRED = (WEIGHTS, "config.json")
_CHUNK = 8 * 1024 * 1024

# File spellings of architectures that transformers' GGUF loader renames before looking them up
# (modeling_gguf_pytorch_utils.load_gguf_checkpoint); its own list holds only the new names.
_RENAMED_ARCHITECTURES = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
    "t5encoder": "t5",
}
# Sections of transformers' GGUF config mapping that are not architectures.
_NOT_ARCHITECTURES = frozenset({"general", "tokenizer"})
# Float types both of transformers' GGUF loaders take as they are.
_FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})


@dataclass(frozen=True)
class CachedModel:
    """A GGUF file made loadable: the result of :func:`prepare_gguf`."""

    source: Path  # the GGUF file
    source_sha256: bytes  # its weights digest (proto.weights_digest), the one to announce
    directory: Path  # the cache entry: a Hugging Face model directory with the same weights
    converted: bool  # True when this call converted the file; False when the cache served it


def prepare_gguf(path: Path, *, cache_dir: Path) -> CachedModel:
    """Hashes ``path`` and returns its cache entry, checking and converting the file first when
    there is none.

    Blocking (seconds to minutes on a first conversion); safe to call from several threads or
    processes at once: one converts, the others wait for it. Raises :class:`ModelLoadError`.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    digest = gguf_sha256(path)
    key = digest.hex()
    cache_dir = Path(cache_dir).expanduser()
    entry = cache_dir / key
    if not (entry / MANIFEST).is_file():
        # Only a file about to be converted needs checking (about a second: transformers' GGUF
        # tables, a trial dequantization per type). A finished entry's file passed the check
        # when it was converted; its digest pins the bytes and the manifest the converter.
        check_gguf(path)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelLoadError(f"cannot create the model cache {cache_dir}: {exc}") from exc
    with _locked(cache_dir / f"{key}.lock", what=path.name):
        if entry.exists():
            problem = entry_problem(entry, digest)
            if problem is None:
                logger.info("%s: using its cached conversion %s", path, entry)
                return CachedModel(path, digest, entry, converted=False)
            logger.warning("%s: discarding the cache entry %s: %s", path, entry, problem)
            _remove(entry)
        for leftover in cache_dir.glob(f".{key}.*.tmp"):
            # We hold the lock, so no live process is writing it: an interrupted conversion.
            _remove(leftover)
        _convert(path, entry, digest)
    return CachedModel(path, digest, entry, converted=True)


def check_gguf(path: Path) -> GGUFFile:
    """Reads the header of ``path`` and checks transformers can load it; returns the header.

    Raises :class:`ModelLoadError` naming the path and the reason: not a (complete) GGUF file,
    an architecture transformers cannot load from GGUF, or tensor types it cannot dequantize.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    try:
        header = read_gguf(path)
        architecture = header.architecture
    except GGUFError as exc:
        raise ModelLoadError(str(exc)) from exc
    supported = supported_architectures()
    if architecture not in supported:
        raise ModelLoadError(
            f"{path}: architecture {architecture!r} is not supported "
            f"(supported: {', '.join(sorted(supported))})"
        )
    usable = _dequantizable_types(architecture, header)
    unusable = {name: n for name, n in header.tensor_types().items() if name not in usable}
    if unusable:
        listed = ", ".join(f"{name} ({count} tensors)" for name, count in sorted(unusable.items()))
        raise ModelLoadError(f"{path}: tensor types that cannot be dequantized: {listed}")
    return header


def supported_architectures() -> frozenset[str]:
    """``general.architecture`` values the installed transformers can load from a GGUF file."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    names = set(GGUF_SUPPORTED_ARCHITECTURES) - _NOT_ARCHITECTURES
    names |= {spelling for spelling, name in _RENAMED_ARCHITECTURES.items() if name in names}
    names |= set(_native_gguf_architectures())
    return frozenset(names)


def entry_problem(entry: Path, digest: bytes) -> str | None:
    """Why the cache entry ``entry`` cannot serve the GGUF file of ``digest``; None if it can."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"no readable {MANIFEST} ({type(exc).__name__})"
    if not isinstance(manifest, dict):
        return f"{MANIFEST} is not an object"
    if manifest.get("format") != FORMAT_VERSION:
        return f"format version {manifest.get('format')!r}, expected {FORMAT_VERSION}"
    if manifest.get("source_sha256") != digest.hex():
        return "it was converted from another file"
    versions = _converter_versions()
    if manifest.get("converter") != versions:
        return f"converted by {manifest.get('converter')!r}, this miner runs {versions}"
    files = manifest.get("files")
    if not isinstance(files, list) or not all(isinstance(item, dict) for item in files):
        return f"{MANIFEST} lists no files"
    names = {item.get("name") for item in files}
    missing = [name for name in _REQUIRED if name not in names]
    if missing:
        return f"{MANIFEST} does not list {', '.join(missing)}"
    for item in files:
        problem = _file_problem(entry, item)
        if problem is not None:
            return problem
    return None


def _file_problem(entry: Path, item: dict[str, Any]) -> str | None:
    name = item.get("name")
    if not isinstance(name, str) or Path(name).name != name:
        return f"{MANIFEST} lists a bad file name {name!r}"
    file = entry / name
    try:
        size = file.stat().st_size
    except OSError:
        return f"{name} is missing"
    if size != item.get("size"):
        return f"{name} has {size} bytes, expected {item.get('size')}"
    if _sha256(file) != item.get("sha256"):
        return f"{name} does not match its SHA-256"
    return None


def _convert(path: Path, entry: Path, digest: bytes) -> None:
    """Converts ``path`` into a temporary sibling of ``entry``, then renames it into place."""
    logger.info("converting %s into %s (once; later loads use the cache)", path, entry)
    started = time.monotonic()
    staging: Path | None = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=entry.parent))
        _write_model(path, staging)
        files = sorted(child.name for child in staging.iterdir())
        manifest = {
            "format": FORMAT_VERSION,
            "source_sha256": digest.hex(),
            "source_name": path.name,  # for people reading the cache; not checked
            "converter": _converter_versions(),
            "files": [_describe(staging / name) for name in files],
        }
        _write_durably(staging / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        os.rename(staging, entry)
        _fsync_dir(entry.parent)
    except Exception as exc:  # transformers raises ValueError, OSError, KeyError, ...
        if staging is not None:
            _remove(staging)
        if isinstance(exc, ModelLoadError):
            raise
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line for the CLI
        raise ModelLoadError(f"cannot convert {path}: {reason}") from exc
    logger.info("converted %s in %.1f s", path.name, time.monotonic() - started)


def _write_model(path: Path, target: Path) -> None:
    """Dequantizes the GGUF file with transformers and writes it as a model directory."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM

    options: dict[str, Any] = {}
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers before 5.x always dequantizes
        pass
    else:
        # Its default may keep quantized blocks in custom layers, which cannot be saved.
        options["quantization_config"] = GgufConfig(dequantize=True)
    # Any: transformers' own annotations of from_pretrained confuse mypy.
    model: Any = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, local_files_only=True, **options
    )
    # save_pretrained refuses a model loaded from GGUF; save_model also drops tied duplicates.
    save_model(model, str(target / WEIGHTS), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        # The cache holds plain float weights: a GGUF quantization config would misdescribe it.
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.save_pretrained(target)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(target)


def _describe(file: Path) -> dict[str, Any]:
    with file.open("rb") as handle:
        os.fsync(handle.fileno())  # the rename must not outlive the data after a power cut
    return {"name": file.name, "size": file.stat().st_size, "sha256": _sha256(file)}


def _converter_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("transformers", "gguf"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "absent"
    return versions


def _native_gguf_architectures() -> tuple[str, ...]:
    """Architectures transformers' newer GGUF path loads (with its own dequantizer)."""
    try:
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS
    except ImportError:  # transformers without that path: every architecture is legacy
        return ()
    return tuple(GGUF_ARCHS)


def _dequantizable_types(architecture: str, header: GGUFFile) -> frozenset[str]:
    """Names of the file's tensor types that transformers' loader for ``architecture`` reads."""
    if architecture in _native_gguf_architectures():
        from transformers.integrations.gguf.dequant import GGML_BLOCK

        return _FLOAT_TYPES | {GGML_TYPES[t][0] for t in GGML_BLOCK if t in GGML_TYPES}
    # The legacy path dequantizes with gguf-py: ask it, one all-zero block per type.
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    usable = set()
    for type_id in {tensor.type_id for tensor in header.tensors}:
        try:
            quant_type = GGMLQuantizationType(type_id)
            _, block_bytes = GGML_QUANT_SIZES[quant_type]
            dequantize(np.zeros(block_bytes, dtype=np.uint8), quant_type)
        except (ValueError, KeyError, NotImplementedError):
            continue
        usable.add(GGML_TYPES[type_id][0])
    return frozenset(usable)


@contextmanager
def _locked(lock_path: Path, *, what: str) -> Iterator[None]:
    """Holds an exclusive flock() on ``lock_path``: one process converts, the others wait."""
    if sys.platform == "win32":  # no flock(); concurrent miners there may convert twice
        yield
        return
    import fcntl

    try:
        handle = lock_path.open("a")
    except OSError as exc:
        raise ModelLoadError(f"cannot lock {lock_path}: {exc}") from exc
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process preparing %s (%s)", what, lock_path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_durably(file: Path, text: str) -> None:
    with file.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(directory: Path) -> None:
    if sys.platform == "win32":  # directories cannot be opened there; NTFS journals renames
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
