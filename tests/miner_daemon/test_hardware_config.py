"""Hardware detection and the configuration parsers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from miner.config import MinerConfig, ModelSpec, parse_coordinator, parse_model_spec
from miner.daemon import software_version
from miner.hardware import cpu_name, detect_hardware, system_memory_bytes


def test_cpu_hardware_is_described_without_an_accelerator() -> None:
    hardware = detect_hardware("cpu")
    assert hardware.accelerator == "cpu"
    assert hardware.device_name == cpu_name() != ""
    assert hardware.memory_bytes == system_memory_bytes() > 0
    assert hardware.cpu_count == os.cpu_count()


def test_auto_detection_reports_what_torch_sees() -> None:
    torch = pytest.importorskip("torch")
    hardware = detect_hardware()
    if torch.cuda.is_available():
        expected = "cuda"
        assert hardware.device_name == torch.cuda.get_device_name(0)
        assert hardware.memory_bytes == torch.cuda.get_device_properties(0).total_memory
    elif torch.backends.mps.is_available():
        expected = "mps"
    else:
        expected = "cpu"
    assert hardware.accelerator == expected
    assert hardware.memory_bytes > 0
    # Forced onto the CPU, a GPU machine describes its CPU.
    assert detect_hardware("cpu").accelerator == "cpu"


def test_software_version_is_the_installed_package_version() -> None:
    import importlib.metadata

    assert software_version() == importlib.metadata.version("meshmint")


@pytest.mark.parametrize(
    ("address", "expected"),
    [("127.0.0.1:50051", ("127.0.0.1", 50051)), ("[::1]:7", ("::1", 7)), ("a.b:1", ("a.b", 1))],
)
def test_coordinator_addresses_parse(address: str, expected: tuple[str, int]) -> None:
    assert parse_coordinator(address) == expected


@pytest.mark.parametrize("address", ["localhost", ":50051", "host:", "host:0", "host:70000", "h:x"])
def test_malformed_coordinator_addresses_are_rejected(address: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_coordinator(address)


def test_model_specs_need_a_name_and_an_existing_directory(tmp_path: Path) -> None:
    assert parse_model_spec(f"tiny={tmp_path}") == ModelSpec(name="tiny", path=tmp_path)
    for bad in ("tiny", f"={tmp_path}", "tiny="):
        with pytest.raises(ValueError, match="NAME=DIR"):
            parse_model_spec(bad)
    with pytest.raises(ValueError, match="does not exist"):
        parse_model_spec(f"tiny={tmp_path / 'missing'}")


def test_config_rejects_impossible_settings(tmp_path: Path) -> None:
    MinerConfig(coordinator="h:1")
    with pytest.raises(ValueError, match="max_concurrency"):
        MinerConfig(coordinator="h:1", max_concurrency=0)
    with pytest.raises(ValueError, match="backoff"):
        MinerConfig(coordinator="h:1", backoff_min_s=2, backoff_max_s=1)
    with pytest.raises(ValueError, match="served twice"):
        MinerConfig(coordinator="h:1", models=(ModelSpec("a", tmp_path), ModelSpec("a", tmp_path)))
    with pytest.raises(ValueError, match="HOST:PORT"):
        MinerConfig(coordinator="nowhere")
