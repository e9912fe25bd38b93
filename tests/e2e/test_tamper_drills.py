"""Tamper drills: an operator with psql (and even the signing key) edits a real ledger database;
`meshmint-ledger audit` run against the published API must catch every edit.

The ledger traffic is written by the real PostgresLedger, checkpoints are signed by the real
Checkpointer, the API is the coordinator's own routes, and the auditor is the installed CLI.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.http.ledger_routes import add_ledger_routes
from ledger.checkpoint import CheckpointSigner
from ledger.checkpointer import Checkpointer, CheckpointerConfig
from ledger.interface import AccountKind, AccountRef
from ledger.postgres import PostgresLedger
from ledger.public import PublishedLedger

ORIGIN = "drill.example/ledger"
SIGNER = CheckpointSigner(ORIGIN, Ed25519PrivateKey.generate())
BUYERS = [AccountRef(AccountKind.BUYER, f"key_{i}") for i in range(3)]
MINERS = [AccountRef(AccountKind.MINER, f"{i:064x}") for i in range(2)]


@dataclass
class Drill:
    pool: asyncpg.Pool[asyncpg.Record]
    url: str
    ledger: PostgresLedger
    checkpointer: Checkpointer


async def traffic(ledger: PostgresLedger, checkpointer: Checkpointer, *, requests: int) -> None:
    for account in BUYERS + MINERS:
        await ledger.open_account(account)
    for buyer in BUYERS:
        await ledger.mint(buyer, 1_000_000, memo="drill credits")
    await checkpointer.checkpoint()
    for i in range(requests):
        hold = await ledger.hold(BUYERS[i % 3], 500 + i, reference=bytes([i]) * 32)
        if i % 4 == 3:
            await ledger.release(hold)
        else:
            await ledger.settle(
                hold, miner=MINERS[i % 2], miner_credit=300, fee=15, reference=bytes([i + 1]) * 32
            )
        if i % 3 == 2:
            await checkpointer.checkpoint()
    await checkpointer.checkpoint()


@pytest.fixture
async def drill(db_pool: asyncpg.Pool[asyncpg.Record]) -> AsyncIterator[Drill]:
    ledger = await PostgresLedger.create(db_pool)
    config = CheckpointerConfig(ORIGIN, interval_s=3600)  # checkpoints only when the drill says
    async with Checkpointer.running(db_pool, SIGNER, config) as checkpointer:
        await traffic(ledger, checkpointer, requests=12)
        app = web.Application()
        add_ledger_routes(
            app, PublishedLedger(db_pool, origin=ORIGIN, verifier_key=SIGNER.verifier_key)
        )
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            port = runner.addresses[0][1]
            yield Drill(db_pool, f"http://127.0.0.1:{port}", ledger, checkpointer)
        finally:
            await runner.cleanup()
            await ledger.aclose()


async def audit(drill: Drill, *extra: str) -> tuple[int, set[str]]:
    cli = Path(sys.executable).parent / "meshmint-ledger"
    process = await asyncio.create_subprocess_exec(
        str(cli),
        "audit",
        "--coordinator",
        drill.url,
        "--verifier-key",
        SIGNER.verifier_key,
        "--json",
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode in (0, 1), err.decode()
    report = json.loads(out)
    return process.returncode, {finding["code"] for finding in report["findings"]}


async def test_an_untouched_ledger_audits_clean(drill: Drill) -> None:
    assert await audit(drill) == (0, set())


async def test_a_flipped_byte_is_caught(drill: Drill) -> None:
    await drill.pool.execute(
        "UPDATE ledger_entries SET leaf = overlay(leaf placing '\\xff'::bytea from 40 for 1)"
        " WHERE seq = 5"
    )
    status, codes = await audit(drill)
    assert status == 1 and codes


async def test_a_deleted_row_is_caught(drill: Drill) -> None:
    await drill.pool.execute("DELETE FROM ledger_entries WHERE seq = 7")
    status, codes = await audit(drill)
    assert status == 1 and "entry.seq_gap" in codes


async def test_swapped_rows_are_caught(drill: Drill) -> None:
    await drill.pool.execute(
        "UPDATE ledger_entries AS e SET leaf = o.leaf FROM ledger_entries AS o"
        " WHERE (e.seq, o.seq) IN ((8, 9), (9, 8))"
    )
    status, codes = await audit(drill)
    assert status == 1 and codes & {"entry.seq_order", "entry.prev_hash"}


async def test_a_truncated_tail_is_caught(drill: Drill) -> None:
    await drill.pool.execute(
        "DELETE FROM ledger_entries WHERE seq >= (SELECT size - 3 FROM ledger_head)"
    )
    status, codes = await audit(drill)
    assert status == 1 and "log.truncated" in codes


async def test_a_balance_updated_directly_is_caught(drill: Drill) -> None:
    await drill.pool.execute(
        "UPDATE ledger_accounts SET balance = balance + 1000"
        " WHERE kind = 'buyer' AND owner = 'key_0'"
    )
    status, codes = await audit(drill)
    assert status == 1 and "balance.mismatch" in codes


async def test_deleting_a_checkpoint_the_auditor_kept_is_caught(
    drill: Drill, tmp_path: Path
) -> None:
    row = await drill.pool.fetchrow(
        "SELECT size, note FROM ledger_checkpoints ORDER BY size LIMIT 1 OFFSET 2"
    )
    kept = tmp_path / "kept.checkpoint"
    kept.write_bytes(row["note"])
    assert await audit(drill, "--trusted-checkpoint", str(kept)) == (0, set())
    await drill.pool.execute("DELETE FROM ledger_checkpoints WHERE size = $1", row["size"])
    status, codes = await audit(drill, "--trusted-checkpoint", str(kept))
    assert status == 1 and codes == {"trusted.withdrawn"}


async def test_history_rewritten_and_re_signed_is_caught_through_a_kept_checkpoint(
    drill: Drill, tmp_path: Path
) -> None:
    kept = tmp_path / "kept.checkpoint"
    kept.write_bytes((await drill.checkpointer.checkpoint()).note)  # type: ignore[union-attr]
    # The operator wipes the log and writes another history, re-chained and signed with its own
    # key by a fresh checkpointer: internally consistent, so only outside memory can tell.
    await drill.pool.execute(
        "TRUNCATE ledger_entries, ledger_tree, ledger_checkpoints, ledger_holds;"
        " UPDATE ledger_accounts SET balance = 0;"
        " UPDATE ledger_head SET size = 0, frontier = decode('010000000000000000', 'hex'),"
        " last_leaf_hash = decode(repeat('00', 32), 'hex')"
    )
    drill.checkpointer.latest = None
    await traffic(drill.ledger, drill.checkpointer, requests=9)
    assert (await audit(drill))[0] == 0  # nothing inside the log can tell
    status, codes = await audit(drill, "--trusted-checkpoint", str(kept))
    assert status == 1 and codes & {"trusted.inconsistent", "trusted.missing"}


async def test_two_checkpoints_of_one_size_are_equivocation(drill: Drill, tmp_path: Path) -> None:
    from ledger.checkpoint import Checkpoint

    latest = await drill.checkpointer.checkpoint()
    assert latest is not None
    forged = SIGNER.sign(Checkpoint(ORIGIN, latest.size, bytes(32)))
    other = tmp_path / "other.checkpoint"
    other.write_bytes(forged)
    status, codes = await audit(drill, "--trusted-checkpoint", str(other))
    assert status == 1 and codes & {"trusted.inconsistent", "checkpoint.equivocation"}


async def run_cli(*args: str) -> tuple[int, str]:
    cli = Path(sys.executable).parent / "meshmint-ledger"
    process = await asyncio.create_subprocess_exec(
        str(cli), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, (out + err).decode()


async def test_an_offline_dump_audits_like_the_live_ledger(
    drill: Drill, database_url: str, tmp_path: Path
) -> None:
    dump = tmp_path / "ledger.dump"
    status, output = await run_cli("dump", "--database-url", database_url, "--out", str(dump))
    assert status == 0, output
    assert "wrote" in output
    audit_dump = ("audit", "--dump", str(dump), "--verifier-key", SIGNER.verifier_key, "--json")
    status, output = await run_cli(*audit_dump)
    assert status == 0, output
    assert json.loads(output)["findings"] == []

    await drill.pool.execute(
        "UPDATE ledger_entries SET leaf = overlay(leaf placing '\\xff'::bytea from 40 for 1)"
        " WHERE seq = 3"
    )
    assert (await run_cli("dump", "--database-url", database_url, "--out", str(dump)))[0] == 0
    status, output = await run_cli(*audit_dump)
    assert status == 1 and json.loads(output)["findings"]
