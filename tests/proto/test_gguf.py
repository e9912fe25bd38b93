"""proto.gguf (our header reader) against gguf-py's reader, and the GGUF weights digest."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import gguf
import pytest

from proto.gguf import GGML_TYPES, GGUFError, is_gguf_path, read_gguf
from proto.weights_digest import gguf_sha256, weights_sha256


def test_the_header_reads_as_gguf_py_reads_it(smollm2_gguf: Path) -> None:
    ours = read_gguf(smollm2_gguf)
    theirs = gguf.GGUFReader(smollm2_gguf)
    assert ours.version == 3
    assert ours.architecture == "llama"
    assert ours.arch_value("context_length") == 8192
    keys = {key for key in theirs.fields if not key.startswith("GGUF.")}
    assert set(ours.metadata) == keys
    for key in keys:
        expected = theirs.fields[key].contents()
        value = ours.metadata[key]
        if isinstance(expected, float):
            assert value == pytest.approx(expected)
        else:
            assert value == expected, key
    assert len(ours.tensors) == len(theirs.tensors) == 272
    for mine, reference in zip(ours.tensors, theirs.tensors, strict=True):
        assert mine.name == reference.name
        assert mine.shape == tuple(int(d) for d in reference.shape)
        assert mine.type_name == reference.tensor_type.name
        assert ours.data_offset + mine.offset == reference.data_offset
        assert mine.size == reference.n_bytes
    assert ours.tensor_types() == {"Q4_1": 210, "F32": 61, "Q8_0": 1}


def test_every_type_size_matches_ggml() -> None:
    for type_id, (name, block, block_bytes) in GGML_TYPES.items():
        quant = gguf.GGMLQuantizationType(type_id)
        assert quant.name == name
        if name == "Q8_1":
            # ggml's block_q8_1 holds two fp16 scales (36 bytes); gguf-py still lists the old
            # fp32 layout (40). Never stored in files: it only carries activations.
            assert block_bytes == 2 + 2 + block
            continue
        assert gguf.GGML_QUANT_SIZES[quant] == (block, block_bytes)


def _copy_prefix(source: Path, target: Path, size: int) -> Path:
    with source.open("rb") as handle:
        target.write_bytes(handle.read(size))
    return target


@pytest.mark.parametrize("size", [0, 3, 20, 5000, 1_000_000, 98_000_000])
def test_a_truncated_file_is_refused_with_its_path(
    smollm2_gguf: Path, tmp_path: Path, size: int
) -> None:
    truncated = _copy_prefix(smollm2_gguf, tmp_path / "cut.gguf", size)
    with pytest.raises(GGUFError, match="truncated") as caught:
        read_gguf(truncated)
    assert str(truncated) in str(caught.value)


def test_other_files_are_refused_with_the_reason(tmp_path: Path) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("this is not a model\n")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf(text)
    with pytest.raises(GGUFError, match="directory"):
        read_gguf(tmp_path)
    with pytest.raises(GGUFError, match="cannot read"):
        read_gguf(tmp_path / "missing.gguf")
    old = tmp_path / "v1.gguf"
    old.write_bytes(b"GGUF" + struct.pack("<I", 1) + bytes(16))
    with pytest.raises(GGUFError, match="version 1"):
        read_gguf(old)
    swapped = tmp_path / "big.gguf"
    swapped.write_bytes(b"GGUF" + struct.pack(">I", 3) + bytes(16))
    with pytest.raises(GGUFError, match="big-endian"):
        read_gguf(swapped)


def test_an_implausible_header_is_refused_before_allocating(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**40))
    with pytest.raises(GGUFError, match="implausible"):
        read_gguf(bogus)


def test_the_digest_ignores_the_name_but_not_the_bytes(smollm2_gguf: Path, tmp_path: Path) -> None:
    renamed = shutil.copyfile(smollm2_gguf, tmp_path / "model.gguf")
    assert weights_sha256(renamed) == weights_sha256(smollm2_gguf) == gguf_sha256(renamed)
    data = bytearray(renamed.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor
    altered = tmp_path / "altered.gguf"
    altered.write_bytes(bytes(data))
    assert weights_sha256(altered) != weights_sha256(renamed)
    # A directory holding the file is a Hugging Face-style source with its own digest rule.
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copyfile(smollm2_gguf, folder / "model.gguf")
    assert weights_sha256(folder) != weights_sha256(renamed)


def test_gguf_paths_are_recognised_by_suffix(tmp_path: Path) -> None:
    assert is_gguf_path(Path("a/b/Model.Q4_K_M.GGUF"))
    assert not is_gguf_path(Path("a/b/model.safetensors"))
    (tmp_path / "odd.gguf").mkdir()
    assert not is_gguf_path(tmp_path / "odd.gguf")  # a model directory with an odd name
