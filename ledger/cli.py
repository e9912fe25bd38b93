"""``meshmint-ledger``: inspect the ledger from a shell.

    meshmint-ledger balance [--json] [--database-url URL] [--data-dir DIR]
    meshmint-ledger dump --out FILE [--database-url URL] [--data-dir DIR]
    meshmint-ledger audit (--coordinator URL | --dump FILE) [--trusted-checkpoint FILE]
                          [--verifier-key VKEY] [--json]

Exit status: 0 on success, 1 when an audit has findings, 2 when the ledger cannot be reached or
read (one line on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TextIO, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from ledger.audit import audit
from ledger.audit_report import ProgressBar, render_text, report_json
from ledger.audit_source import AuditSource, AuditSourceError, DumpAuditSource, HttpAuditSource
from ledger.checkpoint import (
    Checkpoint,
    CheckpointError,
    Verifier,
    parse_signed_checkpoint,
    parse_verifier_key,
)
from ledger.database import EMBEDDED_SUBDIR, connect
from ledger.dump import DumpError, dump_ledger
from ledger.interface import AccountBalance, LedgerError
from ledger.money import format_credits
from ledger.postgres import PostgresLedger

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

PROG = "meshmint-ledger"
DEFAULT_DATA_DIR = Path("~/.meshmint/coordinator")


class CliError(LedgerError):
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
        if args.command == "audit":
            return _audit(args)
        data_dir = args.data_dir.expanduser()
        if not args.database_url:
            _check_data_dir(data_dir)
        if args.command == "dump":
            count = asyncio.run(
                _dump(database_url=args.database_url or None, data_dir=data_dir, out=args.out)
            )
            sys.stdout.write(f"wrote {count} entries to {args.out}\n")
            return 0
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
    dump = commands.add_parser("dump", help="write the whole ledger to a file for offline audit")
    dump.add_argument("--out", type=Path, required=True, metavar="FILE", help="the dump file")
    for sub in (balance, dump):
        sub.add_argument(
            "--database-url",
            default=default_url,
            metavar="URL",
            help="PostgreSQL URL (default: $MESHMINT_DATABASE_URL, else the embedded server)",
        )
        sub.add_argument(
            "--data-dir",
            type=Path,
            default=default_data_dir,
            metavar="DIR",
            help="the coordinator's data dir, for its embedded server"
            " (default: $MESHMINT_DATA_DIR, else ~/.meshmint/coordinator)",
        )
    audit = commands.add_parser(
        "audit", help="check the whole ledger from outside: signatures, roots, balances, holds"
    )
    where = audit.add_mutually_exclusive_group(required=True)
    where.add_argument("--coordinator", metavar="URL", help="the coordinator's base URL")
    where.add_argument("--dump", type=Path, metavar="FILE", help="a ledger dump file")
    audit.add_argument(
        "--ca",
        type=Path,
        metavar="FILE",
        help="trust this CA (PEM) for an https:// coordinator, e.g. tls-init's ca.pem "
        "(default: the system's trust store)",
    )
    audit.add_argument(
        "--trusted-checkpoint",
        type=Path,
        metavar="FILE",
        help="a signed checkpoint kept from an earlier audit: the log must still extend it",
    )
    audit.add_argument(
        "--verifier-key",
        metavar="VKEY",
        help="the log's checkpoint key (default: the one the operator publishes; pin it)",
    )
    audit.add_argument("--json", action="store_true", help="print JSON instead of a report")
    return parser


def _ssl_context(ca_file: Path | None) -> ssl.SSLContext | None:
    """The context verifying an https coordinator against ``ca_file``; None: system roots."""
    if ca_file is None:
        return None
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise CliError(f"--ca {ca_file}: not a readable PEM certificate ({exc})") from exc


def _audit(args: argparse.Namespace) -> int:
    """``meshmint-ledger audit``: 0 clean, 1 findings; CliError when it cannot audit."""
    source: AuditSource = (
        HttpAuditSource(args.coordinator, ssl_context=_ssl_context(args.ca))
        if args.coordinator
        else DumpAuditSource(args.dump)
    )
    progress = ProgressBar(sys.stderr) if sys.stderr.isatty() else None
    notes: list[str] = []
    try:
        with source:
            published = source.key()
            vkey = args.verifier_key or published.verifier_key
            if args.verifier_key and args.verifier_key != published.verifier_key:
                notes.append(f"the operator publishes a different key: {published.verifier_key}")
            try:
                verifier = parse_verifier_key(vkey)
            except CheckpointError as exc:
                raise CliError(f"verifier key {vkey!r}: {exc}") from exc
            trusted = None
            if args.trusted_checkpoint:
                trusted = _trusted(args.trusted_checkpoint, verifier, published.origin)
            report = audit(
                source.audit_input(),
                verifier=verifier,
                origin=published.origin,
                trusted=trusted,
                progress=progress,
            )
    except AuditSourceError as exc:
        raise CliError(f"cannot audit {source.description}: {exc}") from exc
    finally:
        if progress is not None:
            progress.close()
    render = report_json if args.json else render_text
    shown = render(
        report,
        source=source.description,
        origin=published.origin,
        verifier_key=vkey,
        key_pinned=bool(args.verifier_key),
        notes=notes,
    )
    sys.stdout.write(shown if isinstance(shown, str) else json.dumps(shown, indent=2) + "\n")
    return 0 if report.ok else 1


def _trusted(path: Path, verifier: Verifier, origin: str) -> Checkpoint:
    try:
        return parse_signed_checkpoint(path.read_bytes(), verifier, origin=origin)
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except CheckpointError as exc:
        raise CliError(f"trusted checkpoint {path}: {exc}") from exc


def _check_data_dir(data_dir: Path) -> None:
    # Starting an embedded server in the wrong place would create an empty database there.
    if not (data_dir / EMBEDDED_SUBDIR / "PG_VERSION").is_file():
        raise CliError(
            f"no coordinator database in {data_dir} (expected {data_dir / EMBEDDED_SUBDIR});"
            " pass --data-dir or --database-url"
        )


async def _read_balances(*, database_url: str | None, data_dir: Path) -> list[AccountBalance]:
    async def read(pool: asyncpg.Pool[asyncpg.Record]) -> list[AccountBalance]:
        # No create(): a read-only command must not add tables to a database that has none.
        return await PostgresLedger(pool).balances()

    return await _read(read, database_url=database_url, data_dir=data_dir)


async def _dump(*, database_url: str | None, data_dir: Path, out: Path) -> int:
    async def write(pool: asyncpg.Pool[asyncpg.Record]) -> int:
        with out.open("wb") as handle:
            return await dump_ledger(pool, handle)

    return await _read(write, database_url=database_url, data_dir=data_dir)


async def _read(
    action: Callable[[asyncpg.Pool[asyncpg.Record]], Awaitable[_T]],
    *,
    database_url: str | None,
    data_dir: Path,
) -> _T:
    where = _redact(database_url) if database_url else f"the embedded server in {data_dir}"
    try:
        async with connect(database_url=database_url, data_dir=data_dir, max_size=1) as pool:
            return await action(pool)
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
        DumpError,
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
