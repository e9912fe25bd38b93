"""``meshmint-miner``: run a miner, show its identity and earnings, write the test model.

Exit codes: 0 done, 1 failure (unusable key, model that will not load, a stored receipt that
no longer verifies), 2 bad arguments, 3 refused by the coordinator, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from miner.config import (
    DEFAULT_KEY_PATH,
    DEVICES,
    DTYPES,
    ENGINES,
    MinerConfig,
    default_cache_dir,
    default_witness_dir,
    parse_coordinator,
    parse_coordinators,
    parse_model_spec,
)
from miner.engine.base import Engine, EngineLoader, ModelLoadError
from miner.errors import IdentityError, MinerError, MinerRefusedError
from miner.identity import Identity, load_or_create_identity
from miner.tls import CoordinatorTls, channel_credentials
from miner.witness_store import WitnessError

if TYPE_CHECKING:
    from miner.daemon import MinerDaemon

logger = logging.getLogger(__name__)

KEY_ENV = "MESHMINT_MINER_KEY"
"""Environment variable naming the key file when ``--key`` is not given."""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_INTERRUPTED = 130


class _UsageError(MinerError):
    """A bad argument, reported in one line with exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="meshmint-miner", description="Serve models to a meshmint coordinator."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="connect to a coordinator and serve jobs")
    run.add_argument(
        "--coordinator",
        required=True,
        metavar="HOST:PORT[,HOST:PORT...]",
        help="the coordinator's miner gateway; more, comma-separated, are tried in turn when one "
        "cannot be reached or is lost (replicas, or a standby)",
    )
    run.add_argument(
        "--coordinator-ca",
        type=Path,
        metavar="FILE",
        help="trust this CA (or self-signed certificate) for the coordinator; implies TLS "
        "(default: TLS with the system's trust store, plaintext to a loopback address)",
    )
    run.add_argument(
        "--tls-cert",
        type=Path,
        metavar="FILE",
        help="client certificate for a coordinator that requires one (mutual TLS)",
    )
    run.add_argument("--tls-key", type=Path, metavar="FILE", help="the --tls-cert's private key")
    run.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext even to a coordinator that is not on this machine",
    )
    run.add_argument(
        "--retains-data",
        action="store_true",
        help="declare that prompts or completions may be kept here (logged, stored); buyers "
        'who send provider.data_collection "deny" are then never routed to this miner',
    )
    run.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=DIR|FILE.gguf",
        help="a model to serve: catalog name and Hugging Face directory or GGUF file (repeatable)",
    )
    _add_key_argument(run)
    run.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="where GGUF models are converted once (default: model-cache/ beside the key)",
    )
    run.add_argument(
        "--max-concurrency",
        type=int,
        default=MinerConfig.max_concurrency,
        metavar="N",
        help="jobs at once: the largest batch the engine decodes together (default: %(default)s)",
    )
    run.add_argument(
        "--max-batch-tokens",
        type=int,
        default=MinerConfig.max_batch_tokens,
        metavar="N",
        help="tokens one engine step feeds, decode rows plus prompt chunks (default: %(default)s)",
    )
    run.add_argument(
        "--kv-cache-tokens",
        type=int,
        default=MinerConfig.kv_cache_tokens,
        metavar="N",
        help="token positions in the KV cache, allocated at start (default: room for "
        "max-concurrency jobs of up to 2048 tokens, at least one full context)",
    )
    run.add_argument(
        "--engine",
        choices=ENGINES,
        default=MinerConfig.engine,
        help="what runs the model: torch (any device) or vllm (CUDA; needs "
        "pip install 'meshmint[vllm]') (default: %(default)s)",
    )
    run.add_argument("--device", choices=("auto", *DEVICES), default="auto")
    run.add_argument("--dtype", choices=("auto", *DTYPES), default="auto")
    run.add_argument(
        "--drain-timeout",
        type=float,
        default=MinerConfig.drain_timeout_s,
        metavar="SECONDS",
        help="on shutdown, how long jobs in flight may finish (default %(default)s)",
    )
    _add_log_level_argument(run)

    test_model = commands.add_parser(
        "create-test-model", help="write the tiny random test model into DIR"
    )
    test_model.add_argument("directory", type=Path, metavar="DIR")
    test_model.add_argument("--seed", type=int, default=0)
    test_model.add_argument(
        "--gguf",
        type=Path,
        metavar="FILE",
        help="also write the same model as a GGUF file (outside DIR: it is not part of its hash)",
    )
    _add_log_level_argument(test_model)

    identity = commands.add_parser("id", help="print this miner's id (creates the key if needed)")
    _add_key_argument(identity)
    _add_log_level_argument(identity)

    earnings = commands.add_parser(
        "earnings", help="show what this miner was credited, each proof verified again offline"
    )
    _add_key_argument(earnings)
    earnings.add_argument("--json", action="store_true", help="print one JSON document")
    _add_log_level_argument(earnings)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``meshmint-miner`` console script."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        # argparse has printed the usage and the error (or --help); keep main() returning.
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # grpc-core prints its own INFO lines (e.g. a GOAWAY when the coordinator restarts) that
    # repeat what the daemon logs; it reads this once, when grpc is imported (lazily, below).
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    key_path = _key_path(args)
    commands: dict[str, Callable[[argparse.Namespace, Path | None], int]] = {
        "run": _command_run,
        "create-test-model": _command_create_test_model,
        "id": _command_id,
        "earnings": _command_earnings,
    }
    try:
        return commands[args.command](args, key_path)
    except _UsageError as err:
        _error(str(err))
        return EXIT_USAGE
    except IdentityError as err:
        _error(str(err))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _key_path(args: argparse.Namespace) -> Path | None:
    if getattr(args, "key", None) is not None:
        return Path(args.key)
    if "key" not in args:
        return None
    return Path(os.environ.get(KEY_ENV) or DEFAULT_KEY_PATH).expanduser()


def _command_id(args: argparse.Namespace, key_path: Path | None) -> int:
    assert key_path is not None
    identity = load_or_create_identity(key_path)
    sys.stdout.write(f"{identity.miner_id}\n")
    return EXIT_OK


def _command_earnings(args: argparse.Namespace, key_path: Path | None) -> int:
    from miner.earnings import as_json, as_text, read_earnings

    assert key_path is not None
    if not key_path.expanduser().exists():
        # Creating a key here would show the earnings of a miner that never ran.
        _error(f"no miner key at {key_path}; give the key the miner runs with (--key)")
        return EXIT_FAILURE
    identity = load_or_create_identity(key_path)
    earnings = read_earnings(default_witness_dir(key_path), miner_id=identity.miner_id)
    sys.stdout.write(as_json(earnings) if args.json else as_text(earnings))
    return EXIT_OK if earnings.all_verified else EXIT_FAILURE


def _command_create_test_model(args: argparse.Namespace, key_path: Path | None) -> int:
    from miner.test_model import create_test_gguf, create_test_model
    from proto.weights_digest import weights_sha256

    directory = create_test_model(args.directory, seed=args.seed)
    sys.stdout.write(f"{directory}\n{weights_sha256(directory).hex()}\n")
    if args.gguf is not None:
        gguf_file = create_test_gguf(args.gguf, seed=args.seed)
        sys.stdout.write(f"{gguf_file}\n{weights_sha256(gguf_file).hex()}\n")
    return EXIT_OK


def _command_run(args: argparse.Namespace, key_path: Path | None) -> int:
    assert key_path is not None
    config = _run_config(args, key_path)
    try:
        # Fails now, naming the file and the reason, rather than after the models load.
        for address in config.coordinators:
            channel_credentials(config.tls, parse_coordinator(address)[0])
    except ValueError as err:
        raise _UsageError(str(err)) from err
    identity = load_or_create_identity(config.key_path)
    try:
        asyncio.run(_serve(config, identity=identity))
    except MinerRefusedError as err:
        _error(f"refused by the coordinator ({err.reason_name}): {err.detail}")
        return EXIT_REFUSED
    except ModelLoadError as err:
        _error(f"cannot load a model: {err}")
        return EXIT_FAILURE
    except WitnessError as err:
        _error(str(err))
        return EXIT_FAILURE
    except asyncio.CancelledError:
        # A second signal cancelled the daemon instead of waiting for the drain.
        return EXIT_INTERRUPTED
    return EXIT_OK


def _run_config(args: argparse.Namespace, key_path: Path) -> MinerConfig:
    try:
        coordinator, fallbacks = parse_coordinators(args.coordinator)
        models = tuple(parse_model_spec(text) for text in args.model)
        for flag in ("max_concurrency", "max_batch_tokens", "kv_cache_tokens"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                option = "--" + flag.replace("_", "-")
                raise ValueError(f"{option} must be at least 1, got {value}")
        if args.drain_timeout < 0:
            raise ValueError(f"--drain-timeout must be >= 0, got {args.drain_timeout}")
        return MinerConfig(
            coordinator=coordinator,
            fallback_coordinators=fallbacks,
            models=models,
            key_path=key_path,
            max_concurrency=args.max_concurrency,
            max_batch_tokens=args.max_batch_tokens,
            kv_cache_tokens=args.kv_cache_tokens,
            engine=args.engine,
            device=None if args.device == "auto" else args.device,
            dtype=None if args.dtype == "auto" else args.dtype,
            drain_timeout_s=args.drain_timeout,
            witness_dir=default_witness_dir(key_path),
            cache_dir=args.cache_dir or default_cache_dir(key_path),
            retains_data=args.retains_data,
            tls=CoordinatorTls(
                ca_file=args.coordinator_ca,
                cert_file=args.tls_cert,
                key_file=args.tls_key,
                insecure=args.insecure,
            ),
        )
    except ValueError as err:
        raise _UsageError(str(err)) from err


async def _serve(config: MinerConfig, *, identity: Identity) -> None:
    # torch takes seconds to import: only `run` pays for it.
    from miner.daemon import MinerDaemon

    load = _engine_loader(config.engine)
    async with AsyncExitStack() as stack:
        engines: list[Engine] = []
        for spec in config.models:
            logger.info(
                "loading %s from %s with the %s engine", spec.name, spec.path, config.engine
            )
            engine = await stack.enter_async_context(
                load(
                    spec.name,
                    spec.path,
                    device=config.device,
                    dtype=config.dtype,
                    max_concurrency=config.max_concurrency,
                    max_batch_tokens=config.max_batch_tokens,
                    kv_cache_tokens=config.kv_cache_tokens,
                    cache_dir=config.cache_dir,
                )
            )
            engines.append(engine)
        logger.info("miner id %s", identity.miner_id)
        for served in engines:
            info = served.info
            logger.info(
                "serving %s: %s on %s, %s, weights %s",
                info.name,
                info.dtype,
                info.device,
                info.engine,
                info.weights_sha256.hex(),
            )
        daemon = MinerDaemon(config, identity=identity, engines=engines)
        with _SignalsHandled(daemon, asyncio.current_task()):
            await daemon.run()


def _engine_loader(kind: str) -> EngineLoader:
    """The ``load`` of the engine named ``kind`` (imported here: torch and vLLM are slow to
    import, and vLLM is optional)."""
    if kind == "vllm":
        from miner.engine.vllm_engine import VllmEngine

        return VllmEngine.load
    from miner.engine.torch_engine import TorchEngine

    return TorchEngine.load


class _SignalsHandled:
    """SIGINT/SIGTERM: the first drains the daemon, the second cancels it at once."""

    def __init__(self, daemon: MinerDaemon, task: asyncio.Task[None] | None) -> None:
        self._daemon = daemon
        self._task = task
        self._loop = asyncio.get_running_loop()
        self._installed: list[signal.Signals] = []

    def __enter__(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._loop.add_signal_handler(signum, self._handle, signum)
            except (NotImplementedError, RuntimeError):
                continue  # Windows: Ctrl-C stays a KeyboardInterrupt
            self._installed.append(signum)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for signum in self._installed:
            self._loop.remove_signal_handler(signum)

    def _handle(self, signum: signal.Signals) -> None:
        if not self._daemon.stopping:
            logger.info("%s received: draining (send it again to quit now)", signum.name)
            self._daemon.shutdown()
        elif self._task is not None:
            logger.warning("%s received again: quitting without draining", signum.name)
            self._task.cancel()


def _add_key_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--key",
        metavar="FILE",
        help=f"identity key file (default ${KEY_ENV} or {DEFAULT_KEY_PATH})",
    )


def _add_log_level_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )


def _error(message: str) -> None:
    sys.stderr.write(f"meshmint-miner: error: {message}\n")
