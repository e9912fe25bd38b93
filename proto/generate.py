"""Regenerates the committed gRPC/protobuf Python code from proto/*.proto.

Run with ``make proto`` (or ``python -m proto.generate``). ``tests/proto/test_drift.py`` runs
the same generator into a temporary directory and fails when the committed files differ.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
SOURCES = ("miner.proto",)


def generated_names() -> list[str]:
    """Names of the files the generator writes for every source, relative to proto/."""
    names: list[str] = []
    for source in SOURCES:
        stem = source.removesuffix(".proto")
        names += [
            f"{stem}_pb2.py",
            f"{stem}_pb2.pyi",
            f"{stem}_pb2_grpc.py",
            f"{stem}_pb2_grpc.pyi",
        ]
    return names


def generate(out_root: Path) -> None:
    """Writes generated code for every source under ``out_root/proto/``."""
    from grpc_tools import protoc  # dev dependency: only the generator needs it

    (out_root / "proto").mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).resolve().parent / "_proto")
    # The mypy-protobuf plugins sit beside the interpreter, which need not be on PATH.
    bin_dir = Path(sys.executable).parent
    for source in SOURCES:
        args = [
            "grpc_tools.protoc",
            f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
            f"-I{PROTO_DIR.parent}",
            f"-I{include}",
            f"--python_out={out_root}",
            f"--grpc_python_out={out_root}",
            f"--mypy_out={out_root}",
            f"--mypy_grpc_out={out_root}",
            str(PROTO_DIR / source),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {source}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        for name in generated_names():
            shutil.copyfile(Path(tmp) / "proto" / name, PROTO_DIR / name)
    sys.stdout.write("regenerated: " + ", ".join(generated_names()) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
