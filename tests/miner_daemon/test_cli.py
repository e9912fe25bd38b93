"""The meshmint-miner command line: argument errors, `id`, key locations (no model needed)."""

from __future__ import annotations

import importlib.util
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from miner.cli import KEY_ENV, main
from miner.config import default_cache_dir
from miner.identity import load_or_create_identity


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got {lines}"
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--model", "no-equals-sign"], "NAME=DIR"),
        (["--model", "=DIR"], "NAME=DIR"),
        (["--model", "tiny=/does/not/exist"], "does not exist"),
        (["--max-concurrency", "0"], "max-concurrency"),
        (["--drain-timeout", "-1"], "drain-timeout"),
    ],
)
def test_bad_run_arguments_exit_2_with_one_line(
    arguments: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", "--coordinator", "127.0.0.1:1", "--key", str(tmp_path / "k")]
    if "--model" not in arguments:
        argv += ["--model", f"tiny={tmp_path}"]
    assert main(argv + arguments) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "k").exists(), "nothing is created for a command that cannot run"


def test_a_malformed_coordinator_address_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", "--coordinator", "localhost", "--model", f"tiny={tmp_path}"]
    assert main(argv) == 2
    assert "HOST:PORT" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["run", "--model", "a=b"],  # no --coordinator
        ["run", "--coordinator", "h:1"],  # no --model
        ["run", "--coordinator", "h:1", "--model", "a=b", "--device", "tpu"],
        ["frobnicate"],
    ],
)
def test_argparse_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "error:" in capsys.readouterr().err


def test_id_prints_the_same_miner_id_every_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "miner" / "identity.key"
    assert main(["id", "--key", str(key)]) == 0
    first = capsys.readouterr().out.strip()
    assert main(["id", "--key", str(key)]) == 0
    assert capsys.readouterr().out.strip() == first == load_or_create_identity(key).miner_id
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_the_environment_names_the_default_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    env_key = tmp_path / "from-env.key"
    monkeypatch.setenv(KEY_ENV, str(env_key))
    assert main(["id"]) == 0
    assert capsys.readouterr().out.strip() == load_or_create_identity(env_key).miner_id
    # --key still wins over the environment.
    flag_key = tmp_path / "from-flag.key"
    assert main(["id", "--key", str(flag_key)]) == 0
    assert capsys.readouterr().out.strip() == load_or_create_identity(flag_key).miner_id


def test_the_default_key_lives_under_home(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["id"]) == 0
    key = tmp_path / ".meshmint" / "miner" / "identity.key"
    assert capsys.readouterr().out.strip() == load_or_create_identity(key).miner_id


def test_an_insecure_key_exits_1_with_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "identity.key"
    load_or_create_identity(key)
    key.chmod(0o644)
    assert main(["id", "--key", str(key)]) == 1
    assert f"chmod 600 {key}" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp / "gone.gguf", "GGUF file for 'x' does not exist"),
        (lambda tmp: _write(tmp / "weights.bin", b"\0"), "must be a directory or a .gguf file"),
    ],
)
def test_a_model_that_is_neither_a_directory_nor_a_gguf_file_exits_2(
    make: Callable[[Path], Path], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", "--coordinator", "127.0.0.1:1", "--key", str(tmp_path / "k")]
    assert main([*argv, "--model", f"x={make(tmp_path)}"]) == 2
    assert message in one_error_line(capsys.readouterr().err)


def test_a_gguf_file_that_cannot_load_exits_1_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _write(tmp_path / "bad.gguf", b"GGUF\x03\x00\x00\x00\x01")
    cache = tmp_path / "cache"
    argv = ["run", "--coordinator", "127.0.0.1:1", "--model", f"x={bad}", "--cache-dir", str(cache)]
    assert main([*argv, "--key", str(tmp_path / "k"), "--device", "cpu"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"meshmint-miner: error: cannot load a model: {bad}: ")
    assert "truncated" in line
    assert not cache.exists()


def test_the_model_cache_defaults_to_beside_the_key() -> None:
    key = Path("~/.meshmint/miner/identity.key")
    assert default_cache_dir(key) == Path.home() / ".meshmint" / "miner" / "model-cache"


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_the_vllm_engine_without_vllm_exits_1_saying_how_to_install_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model"
    assert main(["create-test-model", str(model)]) == 0
    capsys.readouterr()
    argv = ["run", "--coordinator", "127.0.0.1:1", "--model", f"tiny={model}", "--engine", "vllm"]
    assert main([*argv, "--key", str(tmp_path / "k")]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("meshmint-miner: error: cannot load a model: the vLLM engine needs vLLM")
    assert "pip install 'meshmint[vllm]'" in line


def test_an_unknown_engine_is_a_usage_error(tmp_path: Path) -> None:
    argv = ["run", "--coordinator", "127.0.0.1:1", "--model", f"x={tmp_path}"]
    assert main([*argv, "--engine", "llama.cpp"]) == 2
