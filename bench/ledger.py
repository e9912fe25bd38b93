"""Durable ledger appends per second through ``PostgresLedger``'s group-commit queue.

For each batch size B (``PostgresLedger(pool, max_batch=B)``) and each mix, a fresh database on
one PostgreSQL server gets the schema, ``factor x B`` buyer accounts and 8 miners; then as many
concurrent callers as buyers each issue one operation at a time, awaiting it (so answered only
after its batch committed) before the next, for a warm-up and then a measured duration:

* **mint**: ``mint(buyer, 1)``, one entry per operation;
* **hold+settle**: ``hold(buyer, 1000)`` then ``settle(hold, miner_credit=700, fee=100)``, two
  operations and four entries (hold, settle, fee, release) per pair, as the coordinator does.

Entries per second come from ``ledger_head.size`` before and after the measured window (no
operation in flight at either end); batches from the distinct transaction start times
(``created_at``) of the window's entries. Afterwards every run is checked: the head size equals
the entries written (counted by the callers) and the rows stored; each stored ``leaf_hash`` is
the hash of its ``leaf``; the Merkle root of all leaf hashes equals the stored frontier's root;
``ledger_tree`` holds every complete subtree; every balance equals its entries and all sum to
zero; no hold is left open.

The server is an embedded PostgreSQL in a temporary directory (what a coordinator without a
database runs), or the one named by ``--database-url`` (whose role must be allowed to create
databases: each run gets a scratch database, dropped afterwards). It must have ``fsync`` on and
``synchronous_commit`` not off; the benchmark refuses to measure otherwise. A failed operation,
a failed check or a non-durable server makes the exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from bench.common import load_average, percentile, positive_ints, unwind_on_signals
from ledger.embedded import EmbeddedPostgres
from ledger.interface import AccountKind, AccountRef
from ledger.merkle import CompactRange, leaf_hash, root
from ledger.postgres import PostgresLedger

MIXES = ("mint", "hold+settle")
MINERS = 8  # miner accounts the settlements spread over
FUNDING = 10**12  # micro-units minted to each buyer before a hold+settle run (not measured)
HOLD, MINER_CREDIT, FEE = 1000, 700, 100  # micro-units: four entries per hold+settle pair
PHASE_GRACE_S = 120.0  # how long past its duration a phase may take before it is abandoned


@dataclass
class Phase:
    """What the callers saw in one window."""

    ops: int = 0  # operations answered successfully
    entries: int = 0  # entries those operations wrote, as their outcomes say
    latencies_s: list[float] = field(default_factory=list)  # per operation, call to answer
    errors: list[str] = field(default_factory=list)  # one line per failed operation


@dataclass
class Run:
    """One batch size and mix: the measured window and the checks after it."""

    batch_size: int  # PostgresLedger max_batch
    mix: str  # "mint" or "hold+settle"
    callers: int  # concurrent callers, one operation in flight each
    wall_s: float  # measured window, first call to last answer
    ops: int  # operations answered in the window
    entries: int  # ledger_head.size after minus before
    batches: int  # transactions that appended in the window
    p50_ms: float  # operation latency, median
    p99_ms: float  # operation latency, 99th percentile
    errors: list[str]  # failed operations, any phase
    problems: list[str]  # failed checks

    @property
    def entries_per_s(self) -> float:
        return self.entries / self.wall_s

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.wall_s

    @property
    def mean_batch(self) -> float:
        return self.ops / self.batches if self.batches else float("nan")


def with_database(url: str, database: str) -> str:
    """``url`` pointing at ``database`` instead; keeps host, port and query (``?host=/socket``)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "dbname"]
    return urlunsplit(parts._replace(path=f"/{database}", query=urlencode(query, safe="/")))


@asynccontextmanager
async def scratch_database(server_url: str) -> AsyncIterator[str]:
    """A new empty database on the server for one run; dropped on the way out."""
    name = f"meshmint_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield with_database(server_url, name)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def server_settings(url: str) -> dict[str, str]:
    conn = await asyncpg.connect(url)
    try:
        names = (
            *("server_version", "fsync", "synchronous_commit", "wal_sync_method"),
            *("full_page_writes", "commit_delay", "shared_buffers"),
        )
        return {name: str(await conn.fetchval(f"SHOW {name}")) for name in names}
    finally:
        await conn.close()


async def fan_out(
    callers: Sequence[tuple[AccountRef, AccountRef]],
    *,
    seconds: float,
    phase: Phase,
    pair: bool,
    ledger: PostgresLedger,
) -> float:
    """Every caller issues operations, one at a time, until ``seconds`` have passed.

    Returns the wall time from the first call to the last answer.
    """
    started = time.perf_counter()
    deadline = started + seconds

    async def one(buyer: AccountRef, miner: AccountRef, index: int) -> None:
        serial = 0
        while time.perf_counter() < deadline:
            serial += 1
            try:
                if not pair:
                    began = time.perf_counter()
                    await ledger.mint(buyer, 1)
                    phase.latencies_s.append(time.perf_counter() - began)
                    phase.ops += 1
                    phase.entries += 1
                    continue
                reference = hashlib.sha256(b"%d/%d" % (index, serial)).digest()
                began = time.perf_counter()
                hold = await ledger.hold(buyer, HOLD, reference=reference)
                between = time.perf_counter()
                phase.latencies_s.append(between - began)
                phase.ops += 1
                phase.entries += 1
                settled = await ledger.settle(
                    hold, miner=miner, miner_credit=MINER_CREDIT, fee=FEE, reference=reference
                )
                phase.latencies_s.append(time.perf_counter() - between)
                phase.ops += 1
                legs = (settled.miner_credit, settled.fee, settled.released)
                phase.entries += sum(amount > 0 for amount in legs)
            except Exception as error:
                phase.errors.append(f"caller {index}: {type(error).__name__}: {error}")
                return

    async with asyncio.timeout(seconds + PHASE_GRACE_S):
        await asyncio.gather(*(one(buyer, miner, i) for i, (buyer, miner) in enumerate(callers)))
    return time.perf_counter() - started


async def check(db: asyncpg.Pool[asyncpg.Record], expected: int) -> list[str]:
    """The ledger's invariants after a run; one line per violation."""
    problems: list[str] = []
    head = await db.fetchrow("SELECT size, frontier FROM ledger_head")
    assert head is not None
    rows = await db.fetch("SELECT seq, leaf, leaf_hash FROM ledger_entries ORDER BY seq")
    size = head["size"]
    if not size == expected == len(rows):
        problems.append(f"head size {size}, {len(rows)} rows, {expected} entries written")
    if any(row["seq"] != index for index, row in enumerate(rows)):
        problems.append("sequence numbers are not 0..n-1")
    if any(leaf_hash(row["leaf"]) != row["leaf_hash"] for row in rows):
        problems.append("a stored leaf_hash is not the hash of its leaf")
    recomputed = root([row["leaf_hash"] for row in rows])
    stored = CompactRange.from_bytes(head["frontier"])
    if stored.size != size or stored.root() != recomputed:
        problems.append(f"root of the leaves {recomputed.hex()} != frontier {stored.root().hex()}")
    nodes = await db.fetchval("SELECT count(*) FROM ledger_tree")
    complete = sum(len(rows) >> level for level in range(1, len(rows).bit_length()))
    if nodes != complete:
        problems.append(f"ledger_tree holds {nodes} nodes, the tree has {complete}")
    total = await db.fetchval("SELECT coalesce(sum(balance), 0) FROM ledger_accounts")
    if total != 0:
        problems.append(f"balances sum to {total}")
    drifted = await db.fetchval(
        "SELECT count(*) FROM ledger_accounts AS a LEFT JOIN ("
        " SELECT account, sum(delta) AS net FROM ("
        "  SELECT credit AS account, amount AS delta FROM ledger_entries"
        "  UNION ALL SELECT debit, -amount FROM ledger_entries) AS legs GROUP BY account"
        ") AS m ON m.account = a.id WHERE a.balance <> coalesce(m.net, 0)"
    )
    if drifted:
        problems.append(f"{drifted} balances differ from their entries")
    still_open = await db.fetchval("SELECT count(*) FROM ledger_holds WHERE status = 'open'")
    if still_open:
        problems.append(f"{still_open} holds left open")
    return problems


async def one_run(
    server_url: str, *, batch_size: int, mix: str, factor: int, duration: float, warmup: float
) -> Run:
    """A fresh database, its accounts, a warm-up, the measured window and the checks."""
    callers = factor * batch_size
    buyers = [AccountRef(AccountKind.BUYER, f"bench-buyer-{i:06d}") for i in range(callers)]
    miners = [
        AccountRef(AccountKind.MINER, hashlib.sha256(b"miner %d" % i).hexdigest())
        for i in range(MINERS)
    ]
    pairing = [(buyer, miners[i % MINERS]) for i, buyer in enumerate(buyers)]
    pair = mix == "hold+settle"
    async with (
        scratch_database(server_url) as url,
        asyncpg.create_pool(url, min_size=2, max_size=4) as pool,
    ):
        ledger = await PostgresLedger.create(pool, max_batch=batch_size)
        try:
            await asyncio.gather(*(ledger.open_account(a) for a in [*buyers, *miners]))
            written = 0
            if pair:
                await asyncio.gather(*(ledger.mint(buyer, FUNDING) for buyer in buyers))
                written += len(buyers)
            warm, measured = Phase(), Phase()
            await fan_out(pairing, seconds=warmup, phase=warm, pair=pair, ledger=ledger)
            before = await pool.fetchval("SELECT size FROM ledger_head")
            wall = await fan_out(
                pairing, seconds=duration, phase=measured, pair=pair, ledger=ledger
            )
            after = await pool.fetchval("SELECT size FROM ledger_head")
            batches = await pool.fetchval(
                "SELECT count(DISTINCT created_at) FROM ledger_entries"
                " WHERE seq >= $1 AND seq < $2",
                before,
                after,
            )
        finally:
            await ledger.aclose()
        written += warm.entries + measured.entries
        problems = await check(pool, written)
    if after - before != measured.entries:
        problems.append(
            f"window appended {after - before} entries, callers wrote {measured.entries}"
        )
    latencies = measured.latencies_s
    return Run(
        batch_size=batch_size,
        mix=mix,
        callers=callers,
        wall_s=wall,
        ops=measured.ops,
        entries=after - before,
        batches=batches,
        p50_ms=1000 * percentile(latencies, 50),
        p99_ms=1000 * percentile(latencies, 99),
        errors=warm.errors + measured.errors,
        problems=problems,
    )


async def measure(args: argparse.Namespace, server_url: str) -> tuple[dict[str, str], list[Run]]:
    settings = await server_settings(server_url)
    print(
        f"PostgreSQL {settings['server_version']}: fsync={settings['fsync']},"
        f" synchronous_commit={settings['synchronous_commit']},"
        f" wal_sync_method={settings['wal_sync_method']},"
        f" full_page_writes={settings['full_page_writes']},"
        f" commit_delay={settings['commit_delay']}"
    )
    if settings["fsync"] != "on" or settings["synchronous_commit"] == "off":
        raise SystemExit("refusing to measure: commits on this server are not durable")
    runs = []
    for mix in args.mixes:
        for size in args.sizes:
            run = await one_run(
                server_url,
                batch_size=size,
                mix=mix,
                factor=args.callers_per_batch,
                duration=args.duration,
                warmup=args.warmup,
            )
            print(
                f"  {mix:11} max_batch {size:>4}: {run.entries_per_s:9.0f} entries/s"
                f" {run.ops_per_s:9.0f} ops/s, {len(run.problems)} failed checks,"
                f" {len(run.errors)} failed operations"
            )
            runs.append(run)
    return settings, runs


async def measure_embedded(args: argparse.Namespace) -> tuple[dict[str, str], list[Run]]:
    with tempfile.TemporaryDirectory(prefix="meshmint-bench-") as temp:
        async with EmbeddedPostgres(Path(temp) / "postgres") as server:
            return await measure(args, server.url)


def table(runs: Sequence[Run], mix: str) -> str:
    lines = [
        f"{mix}:",
        f"  {'max_batch':>9} {'callers':>7} {'entries/s':>10} {'ops/s':>9}"
        f" {'ops/batch':>9} {'p50 ms':>8} {'p99 ms':>8}",
    ]
    for run in runs:
        if run.mix == mix:
            lines.append(
                f"  {run.batch_size:9d} {run.callers:7d} {run.entries_per_s:10.0f}"
                f" {run.ops_per_s:9.0f} {run.mean_batch:9.1f} {run.p50_ms:8.2f} {run.p99_ms:8.2f}"
            )
    return "\n".join(lines)


def _mixes(text: str) -> list[str]:
    mixes = [part.strip() for part in text.split(",") if part.strip()]
    if not mixes or any(mix not in MIXES for mix in mixes):
        raise argparse.ArgumentTypeError(f"mixes are {', '.join(MIXES)}, got {text!r}")
    return mixes


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=positive_ints, default=[1, 10, 100, 1000], help="max_batch")
    parser.add_argument("--mixes", type=_mixes, default=list(MIXES), help="mint,hold+settle")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per run")
    parser.add_argument(
        "--callers-per-batch", type=int, default=2, help="concurrent callers = this x max_batch"
    )
    parser.add_argument("--database-url", help="a server to use instead of an embedded one")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if args.duration <= 0 or args.warmup < 0 or args.callers_per_batch < 1:
        parser.error("--duration must be > 0, --warmup >= 0, --callers-per-batch >= 1")
    unwind_on_signals()
    load_before = load_average(warn=True)
    if args.database_url:
        settings, runs = asyncio.run(measure(args, args.database_url))
    else:
        settings, runs = asyncio.run(measure_embedded(args))
    load = (load_before, load_average())
    print()
    for mix in args.mixes:
        print(table(runs, mix))
    print(f"load average (1 min) before {load[0]:.2f}, after {load[1]:.2f}")
    ok = True
    for run in runs:
        for line in run.errors[:5] + run.problems:
            print(f"FAILED {run.mix} max_batch {run.batch_size}: {line}", file=sys.stderr)
        ok = ok and not run.errors and not run.problems
    if args.json:
        document = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "python": platform.python_version(),
            "server": "external" if args.database_url else "embedded (pgserver)",
            "settings": settings,
            "load_average_before_after": list(load),
            "duration_s": args.duration,
            "runs": [
                {
                    **asdict(run),
                    "entries_per_s": run.entries_per_s,
                    "ops_per_s": run.ops_per_s,
                    "mean_batch": run.mean_batch,
                }
                for run in runs
            ],
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    if not ok:
        print("FAILED: an operation or a check failed", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
