"""One exception root for the ledger package: every error it raises on purpose is a LedgerError,
and those that were ValueErrors or RuntimeErrors still are."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ledger
from ledger.audit_source import AuditSourceError
from ledger.checkpoint import CheckpointError
from ledger.checkpointer import LogForkError, SequencerFencedError, SigningKeyChangedError
from ledger.cli import CliError
from ledger.database import DatabaseUnreachableError
from ledger.dump import DumpError
from ledger.entry import EntryFormatError
from ledger.interface import (
    HoldClosedError,
    InsufficientFundsError,
    InvalidAmountError,
    LedgerError,
    UnknownAccountError,
)
from ledger.keyfile import KeyFileError
from ledger.log_reader import LogRangeError

# Every error class of the package, with the base it had before the one root.
ERRORS: dict[type[Exception], type[Exception]] = {
    InvalidAmountError: LedgerError,
    UnknownAccountError: LedgerError,
    InsufficientFundsError: LedgerError,
    HoldClosedError: LedgerError,
    SequencerFencedError: RuntimeError,
    SigningKeyChangedError: RuntimeError,
    LogForkError: RuntimeError,
    CheckpointError: ValueError,
    EntryFormatError: ValueError,
    LogRangeError: ValueError,
    KeyFileError: ValueError,
    DumpError: ValueError,
    AuditSourceError: LedgerError,
    DatabaseUnreachableError: OSError,
    CliError: Exception,
}
PACKAGE = Path(ledger.__file__).parent


@pytest.mark.parametrize("error", list(ERRORS), ids=lambda error: error.__name__)
def test_every_ledger_error_has_one_root_and_keeps_its_old_base(error: type[Exception]) -> None:
    assert issubclass(error, LedgerError)
    assert issubclass(error, ERRORS[error])
    assert f"── {error.__name__} " in (LedgerError.__doc__ or "")  # the tree names it


def test_the_tree_names_every_error_class_of_the_package() -> None:
    defined = {
        line.split("(")[0].removeprefix("class ")
        for path in PACKAGE.glob("*.py")
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.startswith("class ") and "Error(" in line
    }
    assert defined - {"LedgerError"} == {error.__name__ for error in ERRORS}


def test_the_interface_imports_nothing_else_of_the_package() -> None:
    """So every module can import LedgerError from it without a cycle."""
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, ledger.interface;"
            " print(sorted(m for m in sys.modules if m.startswith('ledger')))",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    ).stdout
    assert loaded.strip() == "['ledger', 'ledger.interface']"


@pytest.mark.parametrize("module", ["entry", "checkpoint"])
def test_the_standalone_modules_still_work_copied_out_of_the_package(
    module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / f"copied_{module}.py"
    copy.write_bytes((PACKAGE / f"{module}.py").read_bytes())
    for name in ("ledger", "ledger.interface"):  # no meshmint here: importing it fails
        monkeypatch.setitem(sys.modules, name, None)
    spec = importlib.util.spec_from_file_location(copy.stem, copy)
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, copy.stem, loaded)  # as an import would (dataclasses)
    spec.loader.exec_module(loaded)
    error = loaded.EntryFormatError if module == "entry" else loaded.CheckpointError
    assert issubclass(error, ValueError) and issubclass(error, loaded.LedgerError)
    assert loaded.LedgerError is not LedgerError
