"""The coordinator's own cost under load: requests/s and added time to first token.

The miners run the instant engine of ``bench/instant_miner.py`` (``--tokens`` text tokens and a
stop token per job, no model at all), so everything measured is the coordinator's work. At each
concurrency level C, separate load-generator processes (``bench/load_generator.py``) keep C
streaming chat requests in flight for ``--duration`` seconds after ``--warmup``, against up to
three targets, one after the other:

* **direct**: the instant engine's ``generate`` inside the generator process: the floor;
* **echo**: ``bench/load_echo.py``, an aiohttp server that streams the same chunks with no logic:
  the cost of HTTP, SSE and the client, which any Python proxy pays;
* **coordinator**: ``meshmint-coordinator serve`` (embedded PostgreSQL, spot checks and rate
  limits off, ``--price cheap`` or ``free``) with ``--miners`` instant miners, each with
  ``--miner-slots`` slots: the real request path.

Requests/s counts requests that ended inside the window; TTFT (send to first non-empty
``delta.content``) and end-to-end percentiles use the requests that started and ended inside it.
Added TTFT is coordinator minus direct at the same level. The generators' CPU, the coordinator's,
PostgreSQL's, the miners' and the whole machine's are measured over each window, so a reader can
see whether the generator, not the coordinator, was the bottleneck.

The coordinator's CPU milliseconds per request (its CPU cores over its requests/s) is the
figure that a shared machine disturbs least: requests/s and latencies also depend on what else
runs. Several generator processes (``--generators``) split each level's workers between them.

Any failed request or ERROR line in a server log makes the exit status 1. ``--profile FILE``
runs the coordinator under cProfile (``bench/load_profile.py``) during the windows and prints
its top functions (the figures of a profiled run are not the coordinator's: cProfile slows every
call). ``--coordinator-launcher`` and ``--miner-launcher`` replace the commands that start the
coordinator and the instant miners, e.g. with a wrapper that patches a proposed change in, to
measure it against the unchanged code in the same conditions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]  # installed with pgserver; no stubs here

from bench.common import load_average, positive_ints, unwind_on_signals
from bench.load_report import (
    PATHS,
    Level,
    combine,
    cores_text,
    per_request_text,
    table,
    verdict,
)
from bench.load_stack import (
    PRICES,
    LoadProcesses,
    StackConfig,
    coordinator_stack,
    echo_server,
    machine_busy_s,
    postgres_processes,
    process_cpu,
)
from bench.overhead import BIN, MODEL_NAME, logged_errors

GENERATOR_SLACK_S = 2.0  # a generator process starts (imports aiohttp) well within this


def run_generators(
    args: argparse.Namespace,
    *,
    target: str | Sequence[str],
    concurrency: int,
    api_key: str = "none",
    watch: dict[str, list[psutil.Process]] | None = None,
    on_window: Callable[[bool], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Runs the generator processes for one level; their outcomes (in process order) and the
    window's CPU cores. Several targets: process i sends to ``target[i % len(target)]``."""
    targets = [target] if isinstance(target, str) else list(target)
    processes = min(args.generators, concurrency)
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    start_at = time.time() + GENERATOR_SLACK_S + args.warmup
    common = [
        *("--start-at", repr(start_at)),
        *("--warmup", str(args.warmup), "--duration", str(args.duration)),
        *("--client", args.client, "--api-key", api_key, "--model", MODEL_NAME),
        *("--max-tokens", str(args.max_tokens), "--model-dir", str(args.model_dir)),
        *("--tokens", str(args.tokens), "--token-delay", str(args.token_delay)),
    ]
    generators = [
        subprocess.Popen(
            [
                *(sys.executable, "-m", "bench.load_generator", "--workers", str(share)),
                *("--target", targets[i % len(targets)], *common),
            ],
            stdout=subprocess.PIPE,
        )
        for i, share in enumerate(shares)
    ]
    watched = {"generators": [psutil.Process(g.pid) for g in generators], **(watch or {})}
    try:
        time.sleep(max(0.0, start_at - time.time()))
        cpu_before, busy_before, started = process_cpu(watched), machine_busy_s(), time.time()
        if on_window is not None:
            on_window(True)
        time.sleep(max(0.0, start_at + args.duration - time.time()))
        if on_window is not None:
            on_window(False)
        cpu_after, busy_after, window = (
            process_cpu(watched),
            machine_busy_s(),
            time.time() - started,
        )
        outputs = [g.communicate(timeout=args.duration + 120)[0] for g in generators]
    finally:
        for generator in generators:
            if generator.poll() is None:
                generator.kill()
                generator.wait()
    failed = [g.returncode for g in generators if g.returncode != 0]
    if failed:
        raise RuntimeError(f"a load generator exited with {failed}")
    cores = {group: (cpu_after[group] - cpu_before[group]) / window for group in watched}
    cores["machine"] = (busy_after - busy_before) / window
    return [json.loads(output) for output in outputs], cores


def measure_path(
    args: argparse.Namespace,
    path: str,
    *,
    target: str,
    api_key: str = "none",
    watch: dict[str, list[psutil.Process]] | None = None,
    on_window: Callable[[bool], None] | None = None,
) -> list[Level]:
    levels = []
    for concurrency in args.concurrency:
        outcomes, cores = run_generators(
            args,
            target=target,
            concurrency=concurrency,
            api_key=api_key,
            watch=watch,
            on_window=on_window,
        )
        level = combine(path, concurrency, outcomes, cores)
        print(
            f"   {path:12} c={concurrency:<4} {level.requests_per_s:8.0f} req/s  "
            f"TTFT p50 {level.ttft_ms[0]:7.2f} ms  p99 {level.ttft_ms[1]:7.2f} ms  "
            f"errors {level.errors}\n{'':17}CPU cores {cores_text(level.cpu_cores)}; "
            f"CPU ms/request {per_request_text(level)}",
            flush=True,
        )
        levels.append(level)
    return levels


def measure(args: argparse.Namespace, work: Path) -> tuple[list[Level], list[str]]:
    """Every requested path at every level; and the ERROR lines of the servers' logs."""
    levels: list[Level] = []
    processes = LoadProcesses(work)
    if "direct" in args.paths:
        print("== direct: the instant engine in the generator process", flush=True)
        levels += measure_path(args, "direct", target="direct")
    if "echo" in args.paths:
        print("== echo: bench/load_echo.py, the same stream from a bare aiohttp server")
        with echo_server(args.tokens, args.token_delay, processes) as (url, echo):
            watch = {"echo": [psutil.Process(echo.pid)]}
            levels += measure_path(args, "echo", target=url, watch=watch)
    if "coordinator" in args.paths:
        print(
            f"== coordinator: meshmint-coordinator ({args.price} model) + {args.miners} instant "
            f"miners x {args.miner_slots} slots",
            flush=True,
        )
        config = StackConfig(
            model_dir=args.model_dir,
            work=work,
            miners=args.miners,
            miner_slots=args.miner_slots,
            tokens=args.tokens,
            token_delay_s=args.token_delay,
            price=args.price,
            log_level=args.coordinator_log_level,
            profile=args.profile.resolve() if args.profile else None,
            coordinator_launcher=tuple(args.coordinator_launcher),
            miner_launcher=tuple(args.miner_launcher),
        )
        with coordinator_stack(config, processes) as stack:
            coordinator = psutil.Process(stack.coordinator.pid)
            watch = {
                "coordinator": [coordinator],
                "postgres": postgres_processes(stack.postgres_dir or work),
                "miners": [psutil.Process(miner.pid) for miner in stack.miners],
            }
            levels += measure_path(
                args,
                "coordinator",
                target=stack.base_url,
                api_key=stack.api_key,
                watch=watch,
                on_window=stack.profile if args.profile else None,
            )
    return levels, logged_errors(work)


# --- report ------------------------------------------------------------------------------------


# --- report ------------------------------------------------------------------------------------


def report(args: argparse.Namespace, levels: list[Level], server_errors: list[str]) -> bool:
    print()
    print(table(levels, args.concurrency))
    print()
    for line in verdict(levels):
        print(line)
    ok = not server_errors
    for level in levels:
        if level.errors:
            ok = False
            print(
                f"FAILED {level.path} c={level.concurrency}: {level.errors} errors", file=sys.stderr
            )
            for message in level.error_messages:
                print(f"  {message}", file=sys.stderr)
    for error in server_errors:
        print(f"SERVER ERROR {error}", file=sys.stderr)
    if args.profile is not None and args.profile.exists():
        from bench.load_profile import summary

        print(f"\n== profile of the coordinator during the windows ({args.profile})")
        profiled = sum(
            round(level.requests_per_s * args.duration)
            for level in levels
            if level.path == "coordinator"
        )
        print(summary(args.profile, top=args.profile_top, requests=profiled))
    if args.json:
        document = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "python": platform.python_version(),
            "arguments": {k: str(v) for k, v in vars(args).items()},
            "levels": [level.__dict__ for level in levels],
            "server_errors": server_errors,
            "verdict": verdict(levels),
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return ok


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=positive_ints, default=[1, 4, 16, 64, 128])
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per level")
    parser.add_argument("--paths", default=",".join(PATHS), help="any of direct,echo,coordinator")
    parser.add_argument("--tokens", type=int, default=16, help="text tokens per job")
    parser.add_argument(
        "--token-delay", type=float, default=0.0, help="seconds before each token, every path"
    )
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request")
    parser.add_argument("--miners", type=int, default=2, help="instant miner processes")
    parser.add_argument("--miner-slots", type=int, default=256, help="--max-concurrency of each")
    parser.add_argument("--generators", type=int, default=1, help="load-generator processes")
    parser.add_argument("--client", choices=("aiohttp", "openai"), default="aiohttp")
    parser.add_argument("--price", choices=sorted(PRICES), default="cheap")
    parser.add_argument("--coordinator-log-level", default="INFO")
    parser.add_argument("--model-dir", type=Path, help="default: the tiny test model")
    parser.add_argument("--profile", type=Path, help="cProfile the coordinator into this file")
    parser.add_argument(
        "--coordinator-launcher",
        type=shlex.split,
        default=(),
        help="command that replaces meshmint-coordinator, e.g. a wrapper that patches it (A/B)",
    )
    parser.add_argument(
        "--miner-launcher",
        type=shlex.split,
        default=(),
        help="command that replaces 'python -m bench.instant_miner' (A/B)",
    )
    parser.add_argument("--profile-top", type=int, default=25)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    args.paths = [path.strip() for path in args.paths.split(",") if path.strip()]
    if not args.paths or set(args.paths) - set(PATHS):
        parser.error(f"--paths: choose among {','.join(PATHS)}")
    if args.duration <= 0 or args.tokens < 1 or args.max_tokens < 1:
        parser.error("--duration, --tokens and --max-tokens must be positive")
    if args.warmup < 0 or args.token_delay < 0:
        parser.error("--warmup and --token-delay must be >= 0")
    if args.miners < 1 or not 1 <= args.miner_slots <= 256 or args.generators < 1:
        parser.error("--miners and --generators must be >= 1, --miner-slots in 1..256")
    if args.miners * args.miner_slots < max(args.concurrency):
        parser.error("--miners x --miner-slots must cover the highest --concurrency")
    return args


def served_model_dir(model_dir: Path | None, work: Path) -> Path:
    """``model_dir`` (absolute), or a fresh random test model under ``work`` when None."""
    if model_dir is None:
        model_dir = work / "model"
        subprocess.run(
            [str(BIN / "meshmint-miner"), "create-test-model", str(model_dir)],
            check=True,
            capture_output=True,
        )
    return model_dir.resolve()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    unwind_on_signals()
    load_before = load_average(warn=True)
    with tempfile.TemporaryDirectory(prefix="meshmint-load-") as temp:
        work = Path(temp)
        args.model_dir = served_model_dir(args.model_dir, work)
        print(
            f"model {args.model_dir}, {args.tokens} tokens per job, {args.duration:g} s per level "
            f"after {args.warmup:g} s warm-up, {args.generators} generator process(es), "
            f"client {args.client}",
            flush=True,
        )
        levels, server_errors = measure(args, work)
    ok = report(args, levels, server_errors)
    print(f"load average (1 min) before {load_before:.2f}, after {load_average():.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
