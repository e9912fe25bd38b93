"""`meshmint-miner earnings`: totals from stored receipts, each verified again offline."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from ledger.checkpoint import parse_signed_checkpoint, parse_verifier_key
from ledger.money import format_credits
from miner.cli import main
from miner.config import default_witness_dir
from miner.earnings import PENDING_NOTE
from miner.identity import load_or_create_identity
from miner.slashes import SLASHES_FILE, record_slash
from miner.witness_store import ReceiptRecord, WitnessStore
from proto import miner_pb2
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


SLASHES = (("job-1", 1000, "tokens off the sampler"), ("job-7", 250, "forged end of sequence"))


def store_slashes(key: Path, slashes: tuple[tuple[str, int, str], ...], *, banned: bool) -> None:
    """Records slash notices as the daemon does when the coordinator sends them."""
    for number, (job_id, amount, reason) in enumerate(slashes):
        notice = miner_pb2.SlashNotice(
            job_id=job_id,
            amount=amount,
            reason=reason,
            banned=banned and number == len(slashes) - 1,
        )
        record_slash(notice, directory=default_witness_dir(key))


def test_slashes_are_listed_and_subtracted_from_the_total(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "miner.key"
    store_receipts(key, MemoryLog(), AMOUNTS)
    store_slashes(key, SLASHES, banned=False)
    slashed = sum(amount for _, amount, _ in SLASHES)
    code, report = earnings_json(key, capsys)
    assert code == 0, "a slash is not a failed proof"
    assert report["total_credited"] == sum(AMOUNTS)
    assert report["slashed"] == slashed
    assert report["net"] == report["pending"] == sum(AMOUNTS) - slashed
    slashes = report["slashes"]
    assert isinstance(slashes, list)
    assert [(s["job_id"], s["amount"], s["reason"]) for s in slashes] == list(SLASHES)
    assert report["banned"] is False

    assert main(["earnings", "--key", str(key)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("slashed job"))
    last_credit = max(i for i, line in enumerate(lines) if "pending, proof verified" in line)
    assert header > last_credit, "slashes come after the credits"
    for offset, (job_id, amount, reason) in enumerate(SLASHES, start=1):
        row = lines[header + offset]
        assert row.split()[0] == job_id
        assert f"-{format_credits(amount)}" in row and row.endswith(reason)
    net = format_credits(sum(AMOUNTS) - slashed)
    assert f"slashed {format_credits(slashed)} credits for 2 failed spot checks" in out
    assert f"total {net} credits after slashes" in out
    assert f"pending {net}, matured 0.000000" in out
    assert "BANNED" not in out


def test_a_banning_slash_is_shown_and_slashes_can_exceed_the_credits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "miner.key"
    load_or_create_identity(key)
    store_slashes(key, SLASHES, banned=True)
    code, report = earnings_json(key, capsys)
    assert code == 0 and report["banned"] is True
    assert report["net"] == -sum(amount for _, amount, _ in SLASHES)
    assert main(["earnings", "--key", str(key)]) == 0
    assert "BANNED" in capsys.readouterr().out


def test_an_unreadable_slash_line_is_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "miner.key"
    store_receipts(key, MemoryLog(), AMOUNTS)
    store_slashes(key, SLASHES[:1], banned=False)
    with (default_witness_dir(key) / SLASHES_FILE).open("a") as handle:
        handle.write('{"job_id": "job-2", "amount": -5}\n')
    code, report = earnings_json(key, capsys)
    assert code == 0
    assert report["slashed"] == SLASHES[0][1]
    problems = report["slash_problems"]
    assert isinstance(problems, list) and len(problems) == 1 and "line 2" in problems[0]
    main(["earnings", "--key", str(key)])
    assert "WARNING: line 2 of slashes.jsonl" in capsys.readouterr().out


def test_without_slashes_nothing_is_subtracted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "miner.key"
    store_receipts(key, MemoryLog(), AMOUNTS)
    code, report = earnings_json(key, capsys)
    assert code == 0 and report["slashed"] == 0 and report["slashes"] == []
    assert report["net"] == report["pending"] == report["total_credited"] == sum(AMOUNTS)
    main(["earnings", "--key", str(key)])
    out = capsys.readouterr().out
    assert "slashed" not in out and "after slashes" not in out
