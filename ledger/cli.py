"""``meshmint-ledger``: inspect the ledger from a shell.

    meshmint-ledger balance [--json] [--database-url URL] [--data-dir DIR]

Exit status: 0 on success, 2 when the ledger cannot be reached or read (one line on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from ledger.database import EMBEDDED_SUBDIR, connect
from ledger.interface import AccountBalance
from ledger.money import format_credits
from ledger.postgres import PostgresLedger

logger = logging.getLogger(__name__)

PROG = "meshmint-ledger"
DEFAULT_DATA_DIR = Path("~/.meshmint/coordinator")


class CliError(Exception):
    """A failure the user can act on; printed as one line, exit status 2."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser(
        default_url=os.environ.get("MESHMINT_DATABASE_URL") or None,
        default_data_dir=Path(os.environ.get("MESHMINT_DATA_DIR") or DEFAULT_DATA_DIR),
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # pgserver logs whole server logs on failure; the one-line error below is what users need.
    logging.getLogger("pgserver").setLevel(logging.CRITICAL)
    try:
        if args.command == "balance":
            data_dir = args.data_dir.expanduser()
            if not args.database_url:
                _check_data_dir(data_dir)
            balances = asyncio.run(
                _read_balances(database_url=args.database_url or None, data_dir=data_dir)
            )
            _print_balances(balances, as_json=args.json, out=sys.stdout)
        return 0
    except CliError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    except BrokenPipeError:
        # The reader left early (`| head`); the recipe from the Python docs, without a traceback
        # from the interpreter flushing stdout again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _parser(*, default_url: str | None, default_data_dir: Path) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Inspect the meshmint ledger.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    balance = commands.add_parser("balance", help="list every account's balance")
    balance.add_argument("--json", action="store_true", help="print JSON instead of a table")
    balance.add_argument(
        "--database-url",
        default=default_url,
        metavar="URL",
        help="PostgreSQL URL (default: $MESHMINT_DATABASE_URL, else the embedded server)",
    )
    balance.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir,
        metavar="DIR",
        help="the coordinator's data dir, for its embedded server"
        " (default: $MESHMINT_DATA_DIR, else ~/.meshmint/coordinator)",
    )
    return parser


def _check_data_dir(data_dir: Path) -> None:
    # Starting an embedded server in the wrong place would create an empty database there.
    if not (data_dir / EMBEDDED_SUBDIR / "PG_VERSION").is_file():
        raise CliError(
            f"no coordinator database in {data_dir} (expected {data_dir / EMBEDDED_SUBDIR});"
            " pass --data-dir or --database-url"
        )


async def _read_balances(*, database_url: str | None, data_dir: Path) -> list[AccountBalance]:
    where = _redact(database_url) if database_url else f"the embedded server in {data_dir}"
    try:
        async with connect(database_url=database_url, data_dir=data_dir, max_size=1) as pool:
            # No create(): a read-only command must not add tables to a database that has none.
            return await PostgresLedger(pool).balances()
    except asyncpg.UndefinedTableError as exc:
        raise CliError(f"no ledger in {where}: {exc}") from exc
    except (
        OSError,
        TimeoutError,
        ValueError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        subprocess.SubprocessError,
        RuntimeError,
    ) as exc:
        raise CliError(f"cannot read the ledger from {where}: {exc or type(exc).__name__}") from exc


def _print_balances(balances: list[AccountBalance], *, as_json: bool, out: TextIO) -> None:
    if as_json:
        rows = [
            {
                "kind": str(b.account.kind),
                "owner": b.account.owner,
                "balance": b.balance,
                "credits": format_credits(b.balance),
            }
            for b in balances
        ]
        json.dump(rows, out, indent=2)
        out.write("\n")
        return
    total = sum(b.balance for b in balances)
    table = [("KIND", "OWNER", "CREDITS")]
    table += [(str(b.account.kind), b.account.owner, format_credits(b.balance)) for b in balances]
    table += [("total", "", format_credits(total))]
    kind_w, owner_w, amount_w = (max(len(row[i]) for row in table) for i in range(3))
    for kind, owner, amount in table:
        out.write(f"{kind:<{kind_w}}  {owner:<{owner_w}}  {amount:>{amount_w}}\n")


def _redact(url: str) -> str:
    """The URL without its password, for error messages."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
