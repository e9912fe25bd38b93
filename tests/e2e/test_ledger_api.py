"""The public ledger API of a running coordinator, checked from outside with ledger's own
verification functions: signed checkpoints, entries, proofs, balances, and the sequencer fence."""

from __future__ import annotations

import base64
import struct
import time
import urllib.request
from pathlib import Path

import pytest
from openai import OpenAI

from ledger.checkpoint import Checkpoint, parse_signed_checkpoint, parse_verifier_key
from ledger.entry import ZERO_HASH, AccountCode, EntryKind, decode_entry
from ledger.merkle import leaf_hash, root, verify_consistency, verify_inclusion
from tests.e2e.harness import (
    Coordinator,
    create_key,
    http,
    start_coordinator,
    start_miner,
    wait_for_miners,
)


def ledger_url(coordinator: Coordinator, path: str) -> str:
    return coordinator.base_url.removesuffix("/v1") + path


def raw_entries(coordinator: Coordinator, start: int, limit: int) -> list[bytes]:
    url = ledger_url(coordinator, f"/ledger/entries?start={start}&limit={limit}")
    with urllib.request.urlopen(url, timeout=30) as response:
        body = response.read()
    entries, at = [], 0
    while at < len(body):
        (length,) = struct.unpack(">I", body[at : at + 4])
        entries.append(body[at + 4 : at + 4 + length])
        at += 4 + length
    return entries


def signed_checkpoint(coordinator: Coordinator, size: int) -> tuple[Checkpoint, bytes]:
    """Waits for a checkpoint of at least ``size`` entries and verifies its signature."""
    _, _, key = http(ledger_url(coordinator, "/ledger/key"))
    verifier = parse_verifier_key(key["verifier_key"])
    deadline = time.monotonic() + 10
    while True:
        with urllib.request.urlopen(ledger_url(coordinator, "/ledger/checkpoint")) as response:
            note = response.read()
        checkpoint = parse_signed_checkpoint(note, verifier, origin=key["origin"])
        if checkpoint.size >= size or time.monotonic() > deadline:
            return checkpoint, note
        time.sleep(0.1)


def test_an_outsider_can_verify_the_ledger(
    coordinator: Coordinator, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    start_miner(coordinator, tmp_path, name="m", models={"tiny": model_dirs["tiny"]})
    _, key = create_key(coordinator.database_url, credits_micro=2_000_000)
    wait_for_miners(coordinator, key, "tiny", 1)
    first, _ = signed_checkpoint(coordinator, 1)  # the mint, written by another process
    sdk = OpenAI(base_url=coordinator.base_url, api_key=key, max_retries=0)
    for _ in range(2):
        sdk.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
    _, _, snapshot = http(ledger_url(coordinator, "/ledger/balances"))
    size = snapshot["size"]
    assert size >= 1 + 2 * 3  # mint, then per request a hold and at least settle + release
    checkpoint, _ = signed_checkpoint(coordinator, size)
    assert checkpoint.size == size

    leaves = raw_entries(coordinator, 0, size)
    assert len(leaves) == size
    hashes = [leaf_hash(leaf) for leaf in leaves]
    assert root(hashes) == checkpoint.root_hash
    previous = ZERO_HASH
    balances: dict[str, int] = {}
    for seq, leaf in enumerate(leaves):
        entry = decode_entry(leaf)
        assert entry.seq == seq and entry.prev_leaf_hash == previous
        previous = leaf_hash(leaf)
        for account, sign in ((entry.debit, -1), (entry.credit, 1)):
            name = account.kind.name.lower()
            label = f"{name}:{account.owner}" if account.owner else name
            balances[label] = balances.get(label, 0) + sign * entry.amount
    assert {k: v for k, v in snapshot["balances"].items() if v} == {
        k: v for k, v in balances.items() if v
    }
    settles = [i for i, leaf in enumerate(leaves) if decode_entry(leaf).kind is EntryKind.SETTLE]
    assert settles and decode_entry(leaves[settles[0]]).credit.kind is AccountCode.MINER

    _, _, proof = http(
        ledger_url(coordinator, f"/ledger/proof/inclusion?index={settles[0]}&size={size}")
    )
    path = [base64.b64decode(item) for item in proof["hashes"]]
    assert verify_inclusion(hashes[settles[0]], settles[0], size, path, checkpoint.root_hash)
    _, _, proof = http(
        ledger_url(coordinator, f"/ledger/proof/consistency?old={first.size}&new={size}")
    )
    path = [base64.b64decode(item) for item in proof["hashes"]]
    assert verify_consistency(first.size, size, path, first.root_hash, checkpoint.root_hash)


def test_bad_ledger_requests_are_400_or_404_never_500(coordinator: Coordinator) -> None:
    for path, status in [
        ("/ledger/entries?start=-1", 400),
        ("/ledger/entries?limit=0", 400),
        ("/ledger/entries?limit=999999", 400),
        ("/ledger/entries?start=abc", 400),
        ("/ledger/proof/inclusion?index=0", 400),
        ("/ledger/proof/inclusion?index=5&size=3", 404),
        ("/ledger/proof/inclusion?index=0&size=99999999", 404),
        ("/ledger/proof/consistency?old=9&new=2", 404),
        ("/ledger/proof/consistency?old=%D9%A3&new=2", 400),
    ]:
        got, headers, body = http(ledger_url(coordinator, path))
        assert got == status, (path, body)
        assert body["error"]["message"] and headers["x-request-id"]


def test_a_second_coordinator_on_the_same_database_is_fenced_off(
    coordinator: Coordinator, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "second").mkdir()
    with pytest.raises(AssertionError, match="another coordinator is already the ledger sequencer"):
        start_coordinator(
            tmp_path / "second",
            database_url=coordinator.database_url,
            models={"tiny": model_dirs["tiny"]},
        )
