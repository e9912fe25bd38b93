"""Reading a GGUF model file's header: metadata and tensor table, never the tensor data.

GGUF (llama.cpp's single-file format, what Ollama, LM Studio and llama.cpp users have on disk)
carries the architecture, hyperparameters, tokenizer and chat template as typed key/value
metadata, followed by a table of tensors and then their data. Both ends of meshmint read it:
the coordinator takes its tokenizer and context length from the file (without torch or numpy),
and the miner checks architecture and quantization before handing the file to transformers.
Pure Python, little-endian files of versions 2 and 3 (the only ones llama.cpp writes).

Exceptions: :class:`GGUFError` (a ``ValueError``) for anything that is not a complete,
well-formed GGUF file; the message names the path and the reason (truncated, bad magic, ...).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

GGUF_SUFFIX = ".gguf"
_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
# Bounds that keep a corrupt header from asking for gigabytes of strings or list entries.
_MAX_STRING_BYTES = 64 * 1024 * 1024
_MAX_ARRAY_ITEMS = 64 * 1024 * 1024
_MAX_TENSORS = 1_000_000
_MAX_DIMS = 8

# Metadata value types (gguf.GGUFValueType): id -> struct format of one scalar.
_SCALARS = {
    0: "B",  # UINT8
    1: "b",  # INT8
    2: "H",  # UINT16
    3: "h",  # INT16
    4: "I",  # UINT32
    5: "i",  # INT32
    6: "f",  # FLOAT32
    7: "?",  # BOOL
    10: "Q",  # UINT64
    11: "q",  # INT64
    12: "d",  # FLOAT64
}
_STRING = 8
_ARRAY = 9

GGML_TYPES: dict[int, tuple[str, int, int]] = {
    # id: (name, elements per block, bytes per block), as ggml's type traits define them.
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}
"""Every tensor type this reader can size. A type outside it is refused as unknown."""


class GGUFError(ValueError):
    """Not a complete, well-formed GGUF file; the message names the file and the reason."""


@dataclass(frozen=True)
class GGUFTensor:
    """One entry of the tensor table."""

    name: str  # llama.cpp's tensor name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # ggml order: the fastest-varying dimension first
    type_id: int  # a key of GGML_TYPES
    offset: int  # from the start of the data section
    size: int  # bytes of data

    @property
    def type_name(self) -> str:
        """The ggml type's name ("Q4_1", "F32", ...)."""
        return GGML_TYPES[self.type_id][0]


@dataclass(frozen=True)
class GGUFFile:
    """What :func:`read_gguf` read: the metadata and tensor table of one file."""

    path: Path
    version: int  # 2 or 3
    metadata: Mapping[str, object]  # str, int, float, bool or lists of them
    tensors: tuple[GGUFTensor, ...]
    data_offset: int  # where tensor data begins in the file

    @property
    def architecture(self) -> str:
        """``general.architecture`` ("llama", "qwen2", ...); GGUFError when missing."""
        value = self.metadata.get("general.architecture")
        if not isinstance(value, str) or not value:
            raise GGUFError(f"{self.path}: no general.architecture in the metadata")
        return value

    def arch_value(self, key: str) -> object:
        """``<architecture>.<key>``, e.g. ``arch_value("context_length")``; None when absent."""
        return self.metadata.get(f"{self.architecture}.{key}")

    def tensor_types(self) -> dict[str, int]:
        """How many tensors of each ggml type the file holds, by type name."""
        counts: dict[str, int] = {}
        for tensor in self.tensors:
            counts[tensor.type_name] = counts.get(tensor.type_name, 0) + 1
        return counts


def is_gguf_path(path: Path) -> bool:
    """True when ``path`` names a GGUF file by its suffix (whether or not it exists); a
    directory that happens to be called ``*.gguf`` is a model directory, not a GGUF file."""
    path = Path(path)
    return path.suffix.lower() == GGUF_SUFFIX and not path.is_dir()


def read_gguf(path: Path) -> GGUFFile:
    """Reads the header, metadata and tensor table of ``path``; the tensor data is not read.

    Checks that the file is long enough to hold every tensor the table lists, so a truncated
    download is refused here rather than half-way through loading. Raises :class:`GGUFError`.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            return _Parser(handle, path=path, file_size=size).parse()
    except IsADirectoryError:
        raise GGUFError(f"{path}: is a directory, not a GGUF file") from None
    except OSError as error:
        raise GGUFError(f"{path}: cannot read: {error.strerror or error}") from error


class _Parser:
    def __init__(self, handle: BinaryIO, *, path: Path, file_size: int) -> None:
        self._handle = handle
        self._path = path
        self._file_size = file_size
        self._position = 0

    def fail(self, reason: str) -> GGUFError:
        return GGUFError(f"{self._path}: {reason}")

    def parse(self) -> GGUFFile:
        magic = self._read(4, "the magic number")
        if magic != _MAGIC:
            raise self.fail(f"not a GGUF file (starts with {magic!r}, expected {_MAGIC!r})")
        version = self._unpack("I")
        if version not in _SUPPORTED_VERSIONS:
            if version.to_bytes(4, "little") in (b"\x00\x00\x00\x02", b"\x00\x00\x00\x03"):
                raise self.fail("big-endian GGUF files are not supported")
            raise self.fail(f"GGUF version {version} is not supported (only 2 and 3)")
        tensor_count = self._unpack("Q")
        kv_count = self._unpack("Q")
        if tensor_count > _MAX_TENSORS or kv_count > _MAX_TENSORS:
            raise self.fail(f"implausible header: {tensor_count} tensors, {kv_count} keys")
        metadata: dict[str, object] = {}
        for _ in range(kv_count):
            key = self._string("a metadata key")
            metadata[key] = self._value(self._unpack("I"), key)
        raw_tensors = [self._tensor_info() for _ in range(tensor_count)]
        alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
            raise self.fail(f"general.alignment must be a power of two, not {alignment!r}")
        data_offset = -(-self._position // alignment) * alignment
        tensors = tuple(self._sized(*raw, data_offset=data_offset) for raw in raw_tensors)
        return GGUFFile(
            path=self._path,
            version=version,
            metadata=metadata,
            tensors=tensors,
            data_offset=data_offset,
        )

    def _tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string("a tensor name")
        n_dims = self._unpack("I")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise self.fail(f"tensor {name!r} has {n_dims} dimensions")
        shape = tuple(self._unpack("Q") for _ in range(n_dims))
        type_id = self._unpack("I")
        offset = self._unpack("Q")
        return name, shape, type_id, offset

    def _sized(
        self, name: str, shape: tuple[int, ...], type_id: int, offset: int, *, data_offset: int
    ) -> GGUFTensor:
        if type_id not in GGML_TYPES:
            raise self.fail(f"tensor {name!r} has unknown ggml type {type_id}")
        type_name, block, block_bytes = GGML_TYPES[type_id]
        elements = 1
        for dimension in shape:
            elements *= dimension
        if shape[0] % block:
            raise self.fail(f"tensor {name!r}: {type_name} rows of {shape[0]} are not whole blocks")
        size = elements // block * block_bytes
        end = data_offset + offset + size
        if end > self._file_size:
            raise self.fail(
                f"truncated: tensor {name!r} ends at byte {end}, the file has {self._file_size}"
            )
        return GGUFTensor(name=name, shape=shape, type_id=type_id, offset=offset, size=size)

    def _value(self, type_id: int, key: str) -> object:
        if type_id in _SCALARS:
            fmt = _SCALARS[type_id]
            (value,) = struct.unpack(f"<{fmt}", self._read(struct.calcsize(fmt), key))
            return value
        if type_id == _STRING:
            return self._string(f"the value of {key}")
        if type_id == _ARRAY:
            item_type = self._unpack("I")
            count = self._unpack("Q")
            if count > _MAX_ARRAY_ITEMS:
                raise self.fail(f"{key}: implausible array of {count} items")
            if item_type in _SCALARS:
                fmt = _SCALARS[item_type]
                data = self._read(count * struct.calcsize(fmt), f"the value of {key}")
                return list(struct.unpack(f"<{count}{fmt}", data))
            if item_type == _STRING:
                return [self._string(f"the value of {key}") for _ in range(count)]
            raise self.fail(f"{key}: arrays of value type {item_type} are not supported")
        raise self.fail(f"{key}: unknown value type {type_id}")

    def _string(self, what: str) -> str:
        length = self._unpack("Q")
        if length > _MAX_STRING_BYTES:
            raise self.fail(f"implausible length {length} of {what}")
        data = self._read(length, what)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            # llama.cpp vocabularies may hold invalid UTF-8 pieces; keep them readable.
            return data.decode("utf-8", errors="replace")

    def _unpack(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        (value,) = struct.unpack(f"<{fmt}", self._read(size, "the header"))
        return value  # type: ignore[no-any-return]

    def _read(self, size: int, what: str) -> bytes:
        data = self._handle.read(size)
        if len(data) != size:
            raise self.fail(f"truncated while reading {what} (at byte {self._position})")
        self._position += size
        return data
