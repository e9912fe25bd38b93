"""``meshmint-coordinator`` under cProfile, switched on and off by signals: bench-only.

Usage: ``python -m bench.load_profile STATS_FILE [meshmint-coordinator arguments...]``.
SIGUSR1 starts (or resumes) profiling the coordinator's main thread, which runs its whole event
loop; SIGUSR2 pauses it and writes the statistics so far to STATS_FILE (``pstats`` format), so a
profile covers the measured windows only, never start-up or shutdown. ``bench/load.py
--profile`` uses it; :func:`summary` prints what it found.

Time is that thread's CPU time (``time.thread_time``), not wall time: on a shared machine a
wall-clock profile blames whatever runs when the process is descheduled (mostly
``socket.send``).

cProfile roughly doubles the cost of every Python call, so a profiled run's throughput is not
the coordinator's: read its shares of time, not its figures.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import signal
import sys
import time
from pathlib import Path
from types import FrameType


def summary(stats_file: Path, *, top: int = 25, requests: int = 0) -> str:
    """The functions with the most own time, then the most cumulative time, as text; with
    ``requests`` (completed in the profiled windows), the profiled CPU time and the function
    calls per request first."""
    out = io.StringIO()
    stats = pstats.Stats(str(stats_file), stream=out)
    if requests > 0:
        calls = sum(entry[1] for entry in stats.stats.values())  # type: ignore[attr-defined]
        out.write(
            f"{requests} requests: {1000 * stats.total_tt / requests:.2f} ms of profiled CPU "  # type: ignore[attr-defined]
            f"and {calls / requests:,.0f} function calls per request\n"
        )
    stats.strip_dirs()
    out.write(f"== own time (tottime), top {top}\n")
    stats.sort_stats(pstats.SortKey.TIME).print_stats(top)
    out.write(f"== cumulative time, top {top}\n")
    stats.sort_stats(pstats.SortKey.CUMULATIVE).print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        sys.stderr.write("usage: python -m bench.load_profile STATS_FILE [coordinator args...]\n")
        return 2
    stats_file, coordinator_args = Path(args[0]), args[1:]
    profiler = cProfile.Profile(time.thread_time)
    running = False

    def start(signum: int, frame: FrameType | None) -> None:
        nonlocal running
        if not running:
            profiler.enable()
            running = True

    def pause(signum: int, frame: FrameType | None) -> None:
        nonlocal running
        if running:
            profiler.disable()
            running = False
        profiler.dump_stats(str(stats_file))

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, pause)
    from coordinator.cli import main as coordinator_main

    return coordinator_main(coordinator_args)


if __name__ == "__main__":
    raise SystemExit(main())
