"""`meshmint-miner earnings`: totals from stored receipts, each verified again offline."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from ledger.checkpoint import parse_signed_checkpoint, parse_verifier_key
from miner.cli import main
from miner.config import default_witness_dir
from miner.earnings import PENDING_NOTE
from miner.identity import load_or_create_identity
from miner.witness_store import ReceiptRecord, WitnessStore
from tests.miner_witness.log_fixture import ORIGIN, MemoryLog

AMOUNTS = (950, 1900, 37)


def store_receipts(key: Path, log: MemoryLog, amounts: tuple[int, ...]) -> list[ReceiptRecord]:
    """Credits the key's miner once per amount and stores the receipts as the witness would."""
    miner_id = load_or_create_identity(key).miner_id
    indices = []
    for number, amount in enumerate(amounts):
        indices.append(log.credit(miner_id, amount, job_id=f"job-{number}"))
        log.filler(number + 1)
    store = WitnessStore.open(default_witness_dir(key))
    records = []
    for number, index in enumerate(indices):
        receipt = log.receipt(f"job-{number}", index)
        record = ReceiptRecord(
            job_id=receipt.job_id,
            index=index,
            amount=amounts[number],
            tree_size=receipt.tree_size,
            entry=receipt.entry,
            inclusion_proof=tuple(receipt.inclusion_proof),
            checkpoint=receipt.checkpoint,
            origin=ORIGIN,
            verifier_key=log.signer.verifier_key,
            received_at=1.0,
        )
        assert store.add_receipt(record)
        records.append(record)
    note = log.note()
    checkpoint = parse_signed_checkpoint(note, parse_verifier_key(log.signer.verifier_key))
    store.pin(checkpoint, note=note, verifier_key=log.signer.verifier_key)
    return records


def earnings_json(key: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, object]]:
    code = main(["earnings", "--key", str(key), "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_json_reports_every_verified_credit_as_pending(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "miner.key"
    log = MemoryLog()
    log.filler(2)
    records = store_receipts(key, log, AMOUNTS)
    code, report = earnings_json(key, capsys)
    assert code == 0
    assert report["total_credited"] == report["pending"] == sum(AMOUNTS)
    assert report["matured"] == 0 and report["jobs"] == 3 and report["verified"] is True
    assert report["miner_id"] == load_or_create_identity(key).miner_id
    receipts = report["receipts"]
    assert isinstance(receipts, list)
    assert [(r["job_id"], r["index"], r["amount"]) for r in receipts] == [
        (r.job_id, r.index, r.amount) for r in records
    ]
    assert all(r["status"] == "pending" and r["verified"] for r in receipts)
    assert report["checkpoint"] == {
        "origin": ORIGIN,
        "size": len(log.leaves),
        "root": parse_signed_checkpoint(
            log.note(), parse_verifier_key(log.signer.verifier_key)
        ).root_hash.hex(),
    }
    assert report["trusted_keys"] == [log.signer.verifier_key]
    assert report["note"] == PENDING_NOTE and report["alarms"] == 0


def test_text_shows_the_total_and_says_nothing_matured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "miner.key"
    store_receipts(key, MemoryLog(), AMOUNTS)
    assert main(["earnings", "--key", str(key)]) == 0
    out = capsys.readouterr().out
    assert "credited 0.002887 credits for 3 jobs; all proofs verified" in out
    assert "pending 0.002887, matured 0.000000" in out
    assert out.count("pending, proof verified") == 3
    assert PENDING_NOTE in out


def test_a_tampered_receipt_is_reported_left_out_and_fails_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "miner.key"
    store_receipts(key, MemoryLog(), AMOUNTS)
    path = default_witness_dir(key) / "receipts.jsonl"
    lines = path.read_text().splitlines()
    second = json.loads(lines[1])
    entry = bytearray(base64.b64decode(second["entry"]))
    entry[40] ^= 1  # somewhere in the accounts or the amount
    second["entry"] = base64.b64encode(bytes(entry)).decode()
    lines[1] = json.dumps(second)
    lines.append("not json at all")
    path.write_text("\n".join(lines) + "\n")
    code, report = earnings_json(key, capsys)
    assert code == 1 and report["verified"] is False
    assert report["total_credited"] == AMOUNTS[0] + AMOUNTS[2] and report["jobs"] == 2
    receipts = report["receipts"]
    assert isinstance(receipts, list) and len(receipts) == 4
    assert [r["verified"] for r in receipts] == [True, False, True, False]
    assert "not a receipt" in receipts[3]["problem"]


def test_receipts_of_another_miner_do_not_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    theirs = tmp_path / "theirs.key"
    store_receipts(theirs, MemoryLog(), AMOUNTS)
    mine = tmp_path / "mine.key"
    load_or_create_identity(mine)
    # Someone copied another miner's receipts next to this key.
    default_witness_dir(mine).mkdir()
    (default_witness_dir(mine) / "receipts.jsonl").write_bytes(
        (default_witness_dir(theirs) / "receipts.jsonl").read_bytes()
    )
    code, report = earnings_json(mine, capsys)
    assert code == 1 and report["total_credited"] == 0
    receipts = report["receipts"]
    assert isinstance(receipts, list)
    assert all("not this miner" in r["problem"] for r in receipts)


def test_a_miner_without_receipts_has_earned_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "fresh.key"
    load_or_create_identity(key)
    code, report = earnings_json(key, capsys)
    assert code == 0 and report["total_credited"] == 0 and report["receipts"] == []
    assert report["checkpoint"] is None
    assert not default_witness_dir(key).exists(), "reading creates nothing"


def test_a_missing_key_is_an_error_and_is_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "absent.key"
    assert main(["earnings", "--key", str(key)]) == 1
    assert "no miner key" in capsys.readouterr().err
    assert not key.exists()


def test_a_damaged_checkpoint_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "miner.key"
    store_receipts(key, MemoryLog(), AMOUNTS)
    note = default_witness_dir(key) / "checkpoint.txt"
    lines = note.read_bytes().split(b"\n")
    lines[1] = str(int(lines[1]) + 1).encode()  # the size, under the old signature
    note.write_bytes(b"\n".join(lines))
    code, report = earnings_json(key, capsys)
    assert code == 1 and "unusable" in str(report["state_problem"])
    assert report["total_credited"] == sum(AMOUNTS)  # the receipts themselves still verify
