"""The processes ``bench/load.py`` measures: a coordinator, instant miners, or the echo floor.

Everything runs with the commands users run (``meshmint-coordinator serve``,
``meshmint-coordinator keys create``, the ``meshmint-miner`` CLI, here with the instant engine of
``bench/instant_miner.py``), as subprocesses started and stopped by ``bench.overhead.Processes``.
The coordinator serves with spot checks off and rate limits off, so what is measured is the
request path: authentication, tokenizing, the hold, dispatch over gRPC, detokenizing, SSE, the
receipt check, settlement and the job log. ``--profile`` runs it under ``bench/load_profile.py``.

:func:`process_cpu` reads the CPU time of the stack's processes (PostgreSQL found by its data
directory), so a report can say where the machine's cores went.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # installed with pgserver; no stubs here

from bench.overhead import (
    BIN,
    MODEL_NAME,
    STARTUP_TIMEOUT_S,
    Processes,
    wait_for_line,
    wait_for_miners,
)

PRICES = {"cheap": ("0.1", "0.3"), "free": ("0", "0")}  # credits per million input, output tokens
PROFILE_ENV = "MESHMINT_BENCH_PROFILE"  # the stats file, for a --coordinator-launcher that profiles
CREDITS = "1000000"  # a key's grant: never the limit at these prices


class LoadProcesses(Processes):
    """``bench.overhead.Processes`` that can also set a process's environment."""

    def start(
        self, args: list[str], name: str, *, env: dict[str, str] | None = None
    ) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.work / f"{name}.log"
        with log.open("wb") as handle:
            popen = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=env)
        self._running.append((popen, log))
        return popen, log


@dataclass(frozen=True)
class StackConfig:
    """What ``bench/load.py`` starts for the coordinator path."""

    model_dir: Path  # served by the coordinator's catalog and the instant miners
    work: Path  # logs, keys and the coordinator's data directory (embedded PostgreSQL)
    miners: int = 2  # instant miner processes
    miner_slots: int = 256  # --max-concurrency of each (the coordinator admits at most 256)
    tokens: int = 16  # text tokens per job (then a stop token)
    token_delay_s: float = 0.0  # per token, in each miner
    price: str = "cheap"  # a key in PRICES: "free" skips the ledger hold and settlement
    log_level: str = "INFO"  # the coordinator's; miners log WARNING (one INFO line per job)
    profile: Path | None = None  # run the coordinator under cProfile, stats written here
    # Command prefixes that replace ``meshmint-coordinator`` and ``python -m bench.instant_miner``
    # (their arguments follow): wrappers that patch a process to try a change out (A/B).
    coordinator_launcher: tuple[str, ...] = ()
    miner_launcher: tuple[str, ...] = ()


@dataclass
class Stack:
    """A running coordinator path: where to send requests and which processes to watch."""

    base_url: str  # http://host:port/v1
    api_key: str  # a key with plenty of credits
    coordinator: subprocess.Popen[bytes]
    miners: list[subprocess.Popen[bytes]] = field(default_factory=list)
    postgres_dir: Path | None = None  # the embedded PostgreSQL's data directory

    def profile(self, enabled: bool) -> None:
        """Starts or stops (and writes) the coordinator's profile; only with ``--profile``."""
        self.coordinator.send_signal(signal.SIGUSR1 if enabled else signal.SIGUSR2)


def serve_args(config: StackConfig, storage: Sequence[str]) -> list[str]:
    """``meshmint-coordinator``'s arguments for the measured coordinator (``storage``: its
    ``--data-dir`` / ``--database-url``); serve options may follow."""
    input_price, output_price = PRICES[config.price]
    return [
        *("--log-level", config.log_level, "serve", *storage),
        *("--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"),
        *("--model", f"{MODEL_NAME}={config.model_dir}"),
        *("--input-price", input_price, "--output-price", output_price),
        *("--rpm", "0", "--tpm", "0", "--no-spot-checks"),
    ]


def miner_command(config: StackConfig, grpc_address: str, index: int) -> list[str]:
    """The command of instant miner ``index`` (its key in ``config.work``), dialling
    ``grpc_address``."""
    launcher = config.miner_launcher or (sys.executable, "-m", "bench.instant_miner")
    return [
        *launcher,
        *("--tokens", str(config.tokens), "--token-delay", str(config.token_delay_s)),
        *("run", "--coordinator", grpc_address),
        *("--model", f"{MODEL_NAME}={config.model_dir}"),
        *("--key", str(config.work / f"miner-{index}.key"), "--device", "cpu"),
        *("--max-concurrency", str(config.miner_slots), "--log-level", "WARNING"),
    ]


@contextmanager
def coordinator_stack(config: StackConfig, processes: LoadProcesses) -> Iterator[Stack]:
    """Starts the coordinator, a key and the miners; stops them all on exit."""
    coordinator_cli = str(BIN / "meshmint-coordinator")
    storage = ["--data-dir", str(config.work / "coordinator")]
    serve = serve_args(config, storage)
    env = None
    if config.profile is not None:
        # A custom launcher profiles by calling bench.load_profile.main([$PROFILE_ENV, *args]).
        env = {**os.environ, PROFILE_ENV: str(config.profile)}
        profiled = (sys.executable, "-m", "bench.load_profile", str(config.profile))
        launcher = config.coordinator_launcher or profiled
    else:
        launcher = config.coordinator_launcher or (coordinator_cli,)
    try:
        coordinator, log = processes.start([*launcher, *serve], "coordinator", env=env)
        ready = wait_for_line(
            log, r"buyers (http://\S+/v1), miners (\S+)\n", coordinator, STARTUP_TIMEOUT_S
        )
        base_url, grpc_address = ready.group(1), ready.group(2).rstrip(",")
        created = subprocess.run(
            [coordinator_cli, "keys", "create", "--name", "load", "--credits", CREDITS, *storage],
            check=True,
            capture_output=True,
            text=True,
            timeout=STARTUP_TIMEOUT_S,
        )
        stack = Stack(
            base_url,
            created.stdout.strip().splitlines()[-1],
            coordinator,
            postgres_dir=config.work / "coordinator" / "postgres",
        )
        for index in range(config.miners):
            miner, _ = processes.start(miner_command(config, grpc_address, index), f"miner-{index}")
            stack.miners.append(miner)
        wait_for_miners(base_url, stack.api_key, config.miners, STARTUP_TIMEOUT_S)
        yield stack
    except BaseException:
        processes.dump_logs()
        raise
    finally:
        processes.stop_all()


@contextmanager
def echo_server(
    tokens: int, token_delay_s: float, processes: LoadProcesses
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The trivial streaming server of ``bench/load_echo.py``: (base URL, process)."""
    try:
        echo, log = processes.start(
            [
                *(sys.executable, "-m", "bench.load_echo", "--tokens", str(tokens)),
                *("--token-delay", str(token_delay_s)),
            ],
            "echo",
        )
        ready = wait_for_line(log, r"echo ready (http://\S+/v1)\n", echo, STARTUP_TIMEOUT_S)
        yield ready.group(1), echo
    finally:
        processes.stop(echo)


def postgres_processes(data_dir: Path) -> list[psutil.Process]:
    """The PostgreSQL server on ``data_dir`` and its backends (children of the postmaster)."""
    marker = str(data_dir)
    found: list[psutil.Process] = []
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "postgres" in (process.info["name"] or "") and any(marker in arg for arg in cmdline):
            found.append(process)
            try:
                found.extend(process.children(recursive=True))
            except psutil.Error:
                continue
    return found


def process_cpu(processes: dict[str, list[psutil.Process]]) -> dict[str, float]:
    """User + system CPU seconds so far, per group; processes that exited count as 0."""
    totals: dict[str, float] = {}
    for group, members in processes.items():
        total = 0.0
        for process in members:
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
        totals[group] = total
    return totals


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy so far (not idle, not waiting for I/O)."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))
