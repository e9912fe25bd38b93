"""`meshmint-coordinator`: run the coordinator, administer keys and credits, read spot checks.

Environment variables are read here and nowhere else:
MESHMINT_DATA_DIR (default ~/.meshmint/coordinator) and MESHMINT_DATABASE_URL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from coordinator.billing.keys import KeyStore
from coordinator.billing.limits import LimitsConfig
from coordinator.config import CatalogSource, CoordinatorConfig, join_host_port
from coordinator.dispatch.dispatcher import DispatchConfig
from coordinator.dispatch.privacy import VettedMiners
from coordinator.errors import CoordinatorError
from coordinator.gateway.config import GatewayConfig
from coordinator.ops.admin_report import keys_report, miners_report
from coordinator.request_saga import BillingConfig
from coordinator.tls import CertificateFiles, TlsConfig
from coordinator.tls_init import SERVER_DAYS, init_tls
from coordinator.verification.policy import VerificationConfig
from coordinator.verification.report import checks_report
from ledger.checkpointer import SequencerFencedError, SigningKeyChangedError
from ledger.database import connect
from ledger.interface import AccountKind, AccountRef, LedgerError
from ledger.money import format_credits, parse_credits
from ledger.postgres import PostgresLedger

logger = logging.getLogger(__name__)


class UsageError(CoordinatorError):
    """A bad command-line value; reported in one line, exit status 2."""


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _price(text: str) -> int:
    try:
        return parse_credits(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _spend_limit(text: str) -> int | None:
    return None if text.lower() == "none" else _price(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshmint-coordinator", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    commands = parser.add_subparsers(dest="command", required=True)

    def storage(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--data-dir", type=Path, help="state directory (embedded PostgreSQL)")
        sub.add_argument("--database-url", help="use this PostgreSQL instead of the embedded one")

    serve = commands.add_parser("serve", help="run the coordinator")
    storage(serve)
    # Also after `serve` (where operators look for it); SUPPRESS keeps the top-level value
    # when it is given before the command instead.
    serve.add_argument(
        "--log-level", default=argparse.SUPPRESS, help="DEBUG, INFO, WARNING or ERROR"
    )
    serve.add_argument(
        "--nats",
        metavar="URL",
        help="run as one replica of several: link to the others through this NATS server "
        "(nats://HOST:PORT; comma-separated for a cluster); replicas share --database-url and "
        "the ledger key",
    )
    serve.add_argument(
        "--replica-id",
        metavar="NAME",
        help="this replica's name among the others (default: random at each start)",
    )
    serve.add_argument("--http", type=_address, default=("127.0.0.1", 8000), metavar="HOST:PORT")
    serve.add_argument("--grpc", type=_address, default=("127.0.0.1", 50051), metavar="HOST:PORT")
    tls = serve.add_argument_group(
        "TLS", "listeners off loopback need TLS or --allow-plaintext; SIGHUP reloads the files"
    )
    tls.add_argument("--tls-cert", type=Path, metavar="FILE", help="PEM certificate (chain)")
    tls.add_argument("--tls-key", type=Path, metavar="FILE", help="its PEM private key")
    tls.add_argument(
        "--grpc-tls-cert",
        type=Path,
        metavar="FILE",
        help="another certificate for the miners' gRPC port (default: --tls-cert's)",
    )
    tls.add_argument("--grpc-tls-key", type=Path, metavar="FILE", help="its PEM private key")
    tls.add_argument(
        "--client-ca",
        type=Path,
        metavar="FILE",
        help="require miners to present a client certificate signed by this CA (mutual TLS)",
    )
    tls.add_argument(
        "--allow-plaintext",
        action="store_true",
        default=TlsConfig.allow_plaintext,
        help="serve plaintext off loopback (only behind a TLS-terminating proxy)",
    )
    models = serve.add_mutually_exclusive_group(required=True)
    models.add_argument(
        "--model",
        action="append",
        metavar="NAME=DIR|FILE.gguf",
        help="sell a model: a Hugging Face directory or a GGUF file (repeatable)",
    )
    models.add_argument("--catalog", type=Path, metavar="FILE", help="TOML model catalog")
    serve.add_argument(
        "--input-price",
        type=_price,
        default=100_000,
        metavar="CREDITS",
        help="credits per million prompt tokens for --model entries (default 0.1)",
    )
    serve.add_argument(
        "--output-price",
        type=_price,
        default=300_000,
        metavar="CREDITS",
        help="credits per million completion tokens for --model entries (default 0.3)",
    )
    serve.add_argument(
        "--fee-bps", type=int, default=500, help="operator fee in basis points (default 500 = 5%%)"
    )
    serve.add_argument(
        "--ledger-key",
        type=Path,
        metavar="FILE",
        help="Ed25519 key that signs ledger checkpoints (default DATA_DIR/ledger.key, created)",
    )
    serve.add_argument(
        "--rotate-ledger-key",
        action="store_true",
        help="start even though the last checkpoint was signed by another key (key rotation)",
    )
    serve.add_argument(
        "--ledger-origin",
        default="meshmint.local/ledger",
        metavar="NAME",
        help="the ledger log's name in its checkpoints; set once, never change",
    )
    serve.add_argument(
        "--first-token-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="skip a miner that produces no token within this time (default 60)",
    )
    serve.add_argument(
        "--queue-wait",
        type=float,
        default=DispatchConfig.queue_wait_s,
        metavar="SECONDS",
        help="longest wait for a busy model's free miner, 0 = none (default %(default)g)",
    )
    serve.add_argument(
        "--max-queue",
        type=int,
        default=DispatchConfig.max_queue,
        metavar="N",
        help="requests that may wait per model; more are refused with 503 (default %(default)s)",
    )
    serve.add_argument(
        "--rpm",
        type=int,
        default=LimitsConfig.requests_per_minute,
        metavar="N",
        help="requests per minute per API key, 0 = unlimited (default %(default)s)",
    )
    serve.add_argument(
        "--tpm",
        type=int,
        default=LimitsConfig.tokens_per_minute,
        metavar="N",
        help="prompt + max_tokens per minute per API key, 0 = unlimited (default %(default)s)",
    )
    serve.add_argument(
        "--heartbeat-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="heartbeat period; a miner silent for 3 periods is evicted (default 1)",
    )

    serve.add_argument(
        "--spot-check-floor",
        type=float,
        default=VerificationConfig.floor,
        metavar="RATE",
        help="lowest share of a trusted miner's jobs that is re-scored (default %(default)s)",
    )
    serve.add_argument(
        "--verification-window",
        type=float,
        default=VerificationConfig.window_s / 3600,
        metavar="HOURS",
        help="credits mature after this; a confirmed cheat loses the rest (default %(default)g)",
    )
    serve.add_argument(
        "--no-spot-checks", action="store_true", help="never re-score miners' work (testing only)"
    )
    serve.add_argument(
        "--access-log", action="store_true", help="log one line per HTTP request (INFO)"
    )

    tls_init = commands.add_parser(
        "tls-init",
        help="write a private CA, a server certificate and client certificates into DIR",
        description="Creates DIR/ca.pem and ca.key once (reused later), then writes "
        "server.pem/server.key for the --host names and client-NAME.pem/.key per --client. "
        "Run it again to renew the server certificate under the same CA, then send SIGHUP.",
    )
    tls_init.add_argument("directory", type=Path, metavar="DIR")
    tls_init.add_argument(
        "--host",
        action="append",
        required=True,
        metavar="NAME",
        help="a DNS name or IP address miners and buyers use for this coordinator (repeatable)",
    )
    tls_init.add_argument(
        "--client",
        action="append",
        default=[],
        metavar="NAME",
        help="also write a client certificate for a miner, for --client-ca (repeatable)",
    )
    tls_init.add_argument(
        "--days",
        type=int,
        default=SERVER_DAYS,
        help="validity of the server and client certificates (default %(default)s)",
    )

    miners = commands.add_parser(
        "miners",
        help="connected miners (list), or vet / unvet one for buyers' provider.trust: vetted",
    )
    storage(miners)
    miners.add_argument("action", nargs="?", choices=("list", "vet", "unvet"), default="list")
    miners.add_argument(
        "miner_id",
        nargs="?",
        metavar="MINER_ID",
        help="for vet and unvet: the miner's id (64 hex digits, as `meshmint-miner id` prints)",
    )

    checks = commands.add_parser("checks", help="spot-check results per miner identity")
    storage(checks)
    checks.add_argument("--miner", metavar="ID", help="also list this identity's recent checks")
    checks.add_argument("--recent", type=int, default=20, metavar="N", help="checks to list")

    keys = commands.add_parser("keys", help="manage buyers' API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create an API key and print it")
    storage(create)
    create.add_argument("--name", required=True, help="a label for the key")
    create.add_argument("--credits", type=_price, default=0, help="credits to grant (e.g. 10.5)")
    create.add_argument(
        "--spend-limit", type=_price, metavar="CREDITS", help="most the key may ever spend"
    )
    listing = key_commands.add_parser("list", help="list API keys with balances and limits")
    storage(listing)
    revoke = key_commands.add_parser("revoke", help="revoke an API key")
    storage(revoke)
    revoke.add_argument("key_id")
    limit = key_commands.add_parser("limit", help="set or lift (none) a key's spend limit")
    storage(limit)
    limit.add_argument("key_id")
    limit.add_argument("spend_limit", type=_spend_limit, metavar="CREDITS|none")

    credits = commands.add_parser("credits", help="manage buyers' credits")
    credit_commands = credits.add_subparsers(dest="credits_command", required=True)
    add = credit_commands.add_parser("add", help="grant credits to an API key")
    storage(add)
    add.add_argument("key_id")
    add.add_argument("amount", type=_price)
    return parser


def _storage(args: argparse.Namespace) -> tuple[Path, str | None]:
    data_dir = args.data_dir or Path(
        os.environ.get("MESHMINT_DATA_DIR", Path.home() / ".meshmint" / "coordinator")
    )
    return data_dir, args.database_url or os.environ.get("MESHMINT_DATABASE_URL")


async def _serve(config: CoordinatorConfig) -> None:
    # Imported here: it imports grpc, which reads GRPC_VERBOSITY (set in main) only once.
    from coordinator.server import run_coordinator

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with run_coordinator(config) as running:
        # On the event loop's thread: the HTTP listener's handshakes run there too, so none
        # sees the SSL context half-loaded.
        loop.add_signal_handler(signal.SIGHUP, running.tls.reload)
        sys.stdout.write(
            f"meshmint coordinator: buyers {running.tls.http_scheme}://"
            f"{join_host_port(config.http_host, running.http_port)}/v1, "
            f"miners {join_host_port(config.grpc_host, running.grpc_port)}\n"
        )
        sys.stdout.flush()
        stopping = asyncio.ensure_future(stop.wait())
        lost = asyncio.ensure_future(running.lease_lost.wait())
        await asyncio.wait([stopping, lost], return_when=asyncio.FIRST_COMPLETED)
        for waiter in (stopping, lost):
            waiter.cancel()
        if running.lease_lost.is_set():
            logger.error("this replica's lease was taken over: stopping (its holds are gone)")


async def _with_ledger(
    args: argparse.Namespace, action: Callable[[KeyStore, PostgresLedger], Awaitable[str]]
) -> None:
    data_dir, database_url = _storage(args)
    async with connect(database_url=database_url, data_dir=data_dir, max_size=2) as pool:
        ledger = await PostgresLedger.create(pool)
        keys = await KeyStore.create(pool)
        try:
            sys.stdout.write(await action(keys, ledger) + "\n")
        finally:
            await ledger.aclose()


async def _create_key(args: argparse.Namespace, keys: KeyStore, ledger: PostgresLedger) -> str:
    key = await keys.issue(args.name, spend_limit=args.spend_limit)
    account = AccountRef(AccountKind.BUYER, key.key_id)
    await ledger.open_account(account)
    if args.credits:
        await ledger.mint(account, args.credits, memo=f"initial credits for {args.name}")
    logger.info(
        "created key %s (%s) with %s credits", key.key_id, args.name, format_credits(args.credits)
    )
    return key.secret


async def _revoke_key(args: argparse.Namespace, keys: KeyStore, ledger: PostgresLedger) -> str:
    if not await keys.revoke(args.key_id):
        raise UsageError(f"no active key {args.key_id!r}")
    return f"revoked {args.key_id}"


async def _limit_key(args: argparse.Namespace, keys: KeyStore, ledger: PostgresLedger) -> str:
    if not await keys.set_spend_limit(args.key_id, args.spend_limit):
        raise UsageError(f"no key {args.key_id!r}")
    if args.spend_limit is None:
        return f"{args.key_id}: no spend limit"
    return f"{args.key_id}: spend limit {format_credits(args.spend_limit)} credits"


async def _add_credits(args: argparse.Namespace, keys: KeyStore, ledger: PostgresLedger) -> str:
    account = AccountRef(AccountKind.BUYER, args.key_id)
    await ledger.mint(account, args.amount, memo="credits added by the operator")
    return f"{args.key_id}: balance {format_credits(await ledger.balance(account))} credits"


async def _checks(args: argparse.Namespace) -> None:
    data_dir, database_url = _storage(args)
    async with connect(database_url=database_url, data_dir=data_dir, max_size=2) as pool:
        sys.stdout.write(await checks_report(pool, miner_id=args.miner, recent=args.recent))


async def _miners(args: argparse.Namespace) -> None:
    if args.action == "list":
        if args.miner_id is not None:
            raise UsageError("miners list takes no MINER_ID")
    elif not _is_miner_id(args.miner_id):
        raise UsageError(f"miners {args.action} needs a MINER_ID of 64 hex digits")
    data_dir, database_url = _storage(args)
    async with connect(database_url=database_url, data_dir=data_dir, max_size=2) as pool:
        vetted = await VettedMiners.create(pool)
        if args.action == "list":
            sys.stdout.write(await miners_report(pool, vetted=await vetted.load()))
            return
        miner_id = args.miner_id.lower()
        if args.action == "vet":
            changed = await vetted.vet(miner_id)
            sys.stdout.write(f"{miner_id} {'vetted' if changed else 'was already vetted'}\n")
        else:
            changed = await vetted.unvet(miner_id)
            sys.stdout.write(f"{miner_id} {'unvetted' if changed else 'was not vetted'}\n")


def _is_miner_id(text: str | None) -> bool:
    return text is not None and len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text)


async def _list_keys(args: argparse.Namespace, keys: KeyStore, ledger: PostgresLedger) -> str:
    return await keys_report(keys, ledger)


def _tls_config(args: argparse.Namespace) -> TlsConfig:
    pairs: list[CertificateFiles | None] = []
    for flags, cert, key in (
        ("--tls-cert and --tls-key", args.tls_cert, args.tls_key),
        ("--grpc-tls-cert and --grpc-tls-key", args.grpc_tls_cert, args.grpc_tls_key),
    ):
        if (cert is None) != (key is None):
            raise UsageError(f"{flags} must be given together")
        pairs.append(None if cert is None else CertificateFiles(cert=cert, key=key))
    return TlsConfig(
        http=pairs[0], grpc=pairs[1], client_ca=args.client_ca, allow_plaintext=args.allow_plaintext
    )


def _tls_init(args: argparse.Namespace) -> None:
    files = init_tls(args.directory, hosts=args.host, clients=args.client, days=args.days)
    lines = [
        f"{'created' if files.ca_created else 'reused'} CA   {files.ca_cert}"
        "  (miners: --coordinator-ca; buyers' clients: trust it)",
        f"server certificate {files.server_cert}  (serve --tls-cert)",
        f"server key         {files.server_key}  (serve --tls-key)",
    ]
    for cert, key in files.clients:
        lines.append(f"client certificate {cert} and key {key}  (run --tls-cert/--tls-key)")
    sys.stdout.write("\n".join(lines) + "\n")


def _config(args: argparse.Namespace) -> CoordinatorConfig:
    data_dir, database_url = _storage(args)
    if not 0 <= args.fee_bps <= 10_000:
        raise UsageError("--fee-bps must be between 0 and 10000")
    if args.rpm < 0 or args.tpm < 0:
        raise UsageError("--rpm and --tpm must be 0 (unlimited) or more")
    if not args.queue_wait >= 0 or args.max_queue < 0:
        raise UsageError("--queue-wait and --max-queue must be 0 or more")
    if not args.heartbeat_interval > 0:
        raise UsageError("--heartbeat-interval must be positive")
    if not 0 < args.spot_check_floor <= 1:
        raise UsageError("--spot-check-floor must be in (0, 1]")
    if not args.verification_window > 0:
        raise UsageError("--verification-window must be positive")
    if args.nats is not None and database_url is None:
        raise UsageError("--nats needs --database-url: replicas share one PostgreSQL")
    replica = {"replica_id": args.replica_id} if args.replica_id else {}
    return CoordinatorConfig(
        catalog=CatalogSource(
            model_specs=tuple(args.model or ()),
            catalog_file=args.catalog,
            input_price_per_mtok=args.input_price,
            output_price_per_mtok=args.output_price,
        ),
        data_dir=data_dir,
        database_url=database_url,
        http_host=args.http[0],
        http_port=args.http[1],
        grpc_host=args.grpc[0],
        grpc_port=args.grpc[1],
        gateway=GatewayConfig(heartbeat_interval_s=args.heartbeat_interval),
        dispatch=DispatchConfig(
            first_token_timeout_s=args.first_token_timeout,
            queue_wait_s=args.queue_wait,
            max_queue=args.max_queue,
        ),
        billing=BillingConfig(fee_bps=args.fee_bps),
        limits=LimitsConfig(requests_per_minute=args.rpm, tokens_per_minute=args.tpm),
        ledger_key_path=args.ledger_key,
        ledger_origin=args.ledger_origin,
        rotate_ledger_key=args.rotate_ledger_key,
        access_log=args.access_log,
        verification=VerificationConfig(
            enabled=not args.no_spot_checks,
            floor=args.spot_check_floor,
            window_s=args.verification_window * 3600,
        ),
        tls=_tls_config(args),
        nats_url=args.nats,
        **replica,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # grpc-core logs every failed TLS handshake (a misconfigured miner retrying, a port
    # scanner) at INFO, without the peer's address; the miner reports its own failure once a
    # minute. It reads this once, when grpc is first imported (in _serve, not above).
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # pgserver narrates every start-up step at INFO; its warnings and errors still show.
    logging.getLogger("pgserver").setLevel(max(logging.WARNING, logging.root.level))
    try:
        if args.command == "serve":
            asyncio.run(_serve(_config(args)))
        elif args.command == "tls-init":
            _tls_init(args)
        elif args.command == "checks":
            asyncio.run(_checks(args))
        elif args.command == "miners":
            asyncio.run(_miners(args))
        else:
            action = {
                ("keys", "create"): _create_key,
                ("keys", "list"): _list_keys,
                ("keys", "revoke"): _revoke_key,
                ("keys", "limit"): _limit_key,
                ("credits", "add"): _add_credits,
            }[(args.command, getattr(args, f"{args.command}_command"))]
            asyncio.run(_with_ledger(args, functools.partial(action, args)))
    except KeyboardInterrupt:
        return 130
    except (
        CoordinatorError,
        ValueError,
        OSError,
        LedgerError,
        SequencerFencedError,
        SigningKeyChangedError,
    ) as error:
        # ValueError covers catalog and tokenizer errors; OSError unreachable databases/ports.
        sys.stderr.write(f"meshmint-coordinator: {error}\n")
        return 2
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
