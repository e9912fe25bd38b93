"""The committed generated code must be exactly what `make proto` produces from miner.proto."""

from __future__ import annotations

from pathlib import Path

from proto import generate


def test_committed_stubs_match_the_generator(tmp_path: Path) -> None:
    generate.generate(tmp_path)
    stale = [
        name
        for name in generate.generated_names()
        if (tmp_path / "proto" / name).read_bytes() != (generate.PROTO_DIR / name).read_bytes()
    ]
    assert not stale, f"generated code drifted from miner.proto; run `make proto`: {stale}"
