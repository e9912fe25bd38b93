"""``meshmint-ledger balance`` against real databases, and its error paths."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import asyncpg
import pytest

from ledger.cli import main
from ledger.database import connect
from ledger.interface import AccountKind, AccountRef
from ledger.money import format_credits, parse_credits
from ledger.postgres import PostgresLedger

if TYPE_CHECKING:
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]

ALICE = AccountRef(AccountKind.BUYER, "alice")
BOB = AccountRef(AccountKind.BUYER, "bob")
MINER = AccountRef(AccountKind.MINER, "ab" * 32)


async def seed(pool: Pool) -> dict[tuple[str, str], int]:
    """Some history; returns the balances by (kind, owner) as the ledger reports them."""
    ledger = await PostgresLedger.create(pool)
    for account in (ALICE, BOB, MINER):
        await ledger.open_account(account)
    await ledger.mint(ALICE, parse_credits("12.5"))
    await ledger.mint(BOB, parse_credits("3"))
    hold = await ledger.hold(ALICE, parse_credits("2"), reference=b"r" * 32)
    await ledger.settle(hold, miner=MINER, miner_credit=1_234_567, fee=1, reference=b"s" * 32)
    await ledger.hold(BOB, 5, reference=b"t" * 32)  # still open: escrow holds it
    return {(str(b.account.kind), b.account.owner): b.balance for b in await ledger.balances()}


def table(out: str) -> tuple[list[str], dict[tuple[str, str], str], str]:
    """(header, {(kind, owner): credits}, total) parsed from the text output."""
    header, *rows, total = out.splitlines()
    body = {}
    for row in rows:
        kind, *owner, amount = row.split()
        body[(kind, " ".join(owner))] = amount
    assert total.split()[0] == "total"
    return header.split(), body, total.split()[-1]


async def run_cli(*argv: str) -> int:
    # main() runs its own event loop, so it cannot run on the test's.
    return await asyncio.to_thread(main, list(argv))


async def test_balance_lists_every_account(
    db_pool: Pool, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = await seed(db_pool)

    assert await run_cli("balance", "--database-url", database_url) == 0

    header, body, total = table(capsys.readouterr().out)
    assert header == ["KIND", "OWNER", "CREDITS"]
    assert body == {account: format_credits(micro) for account, micro in expected.items()}
    assert body[("buyer", "alice")] == "11.265432"  # 12.5 minted, 1.234568 charged
    assert total == "0.000000"
    assert list(body) == sorted(body)  # ordered by account


async def test_balance_json(
    db_pool: Pool,
    database_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expected = await seed(db_pool)
    monkeypatch.setenv("MESHMINT_DATABASE_URL", database_url)  # the default for --database-url

    assert await run_cli("balance", "--json") == 0

    rows = json.loads(capsys.readouterr().out)
    assert {(r["kind"], r["owner"]): r["balance"] for r in rows} == expected
    assert all(r["credits"] == format_credits(r["balance"]) for r in rows)
    assert sum(r["balance"] for r in rows) == 0
    assert all(isinstance(r["balance"], int) for r in rows)


async def test_balance_from_a_running_coordinators_data_dir(
    embedded_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The coordinator holds the embedded server; the CLI joins it, reads, and leaves it running.
    async with connect(database_url=None, data_dir=embedded_data_dir) as pool:
        expected = await seed(pool)

        assert await run_cli("balance", "--json", "--data-dir", str(embedded_data_dir)) == 0

        assert await pool.fetchval("SELECT count(*) FROM ledger_accounts") == len(expected)
    rows = json.loads(capsys.readouterr().out)
    assert {(r["kind"], r["owner"]): r["balance"] for r in rows} == expected


async def test_error_when_the_server_cannot_be_reached(capsys: pytest.CaptureFixture[str]) -> None:
    url = "postgresql://meshmint:hunter2@127.0.0.1:1/ledger"

    assert await run_cli("balance", "--database-url", url) == 2

    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("meshmint-ledger: error: cannot read the ledger from")
    assert captured.err.count("\n") == 1
    assert "hunter2" not in captured.err
    assert "127.0.0.1:1" in captured.err


async def test_error_when_the_database_has_no_ledger(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run_cli("balance", "--database-url", database_url) == 2
    err = capsys.readouterr().err
    assert err.startswith("meshmint-ledger: error: no ledger in") and err.count("\n") == 1


async def test_error_when_the_data_dir_has_no_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MESHMINT_DATABASE_URL", raising=False)
    missing = tmp_path / "nowhere"

    assert await run_cli("balance", "--data-dir", str(missing)) == 2

    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no coordinator database in {missing}" in err
    assert not missing.exists()  # nothing was created on the way


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2
    assert "COMMAND" in capsys.readouterr().err
