"""Re-judges a ``bench.verification --raw`` dump with other thresholds, in seconds.

Generation and scoring are the slow part of the benchmark; the judge is not. The dump holds, per
job, the scorer's margins and stop margins (none in older dumps), the claimed-minus-scored
log-probabilities and the structure problems, which is all the judge looks at, so thresholds
can be tried here and only the final choice re-run end to end.

Run: ``.venv/bin/python -m bench.verification_rejudge RAW.json [--threshold FIELD=VALUE ...]
[--miner-jobs 10]``
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.verification import GROSS, MINERS, SUBTLE, flagged_miners, parse_thresholds
from coordinator.verification.judge import Claim, Scores, Thresholds, Verdict, judge_job

_STOP = 1
_OFFSET = -100.0  # claimed = offset + dlogprob, scored = offset: both finite and <= 0


def _floats(values: Sequence[float | str]) -> list[float]:
    return [float(v) for v in values]


def rejudge(record: dict[str, Any], thresholds: Thresholds) -> Verdict:
    """The verdict the benchmark's judge would give this job under ``thresholds``."""
    margins = _floats(record["margins"])
    dlogprobs = _floats(record["dlogprobs"])
    n = len(margins)
    stop_last = bool(record["stop_last"])
    tokens = (0,) * (n - 1) + ((_STOP,) if stop_last else (0,)) if n else ()
    claim = Claim(
        prompt_token_ids=(0,),
        token_ids=tokens,
        logprobs=tuple(_OFFSET + min(abs(d), 50.0) for d in dlogprobs),
        finish_reason="stop" if stop_last else "length",
        max_tokens=max(n, 1),
        stop_token_ids=frozenset({_STOP}),
        vocab_size=2,
        context_length=n + 1,
    )
    stop_margins = tuple(_floats(record.get("stop_margins", [])))
    scores = Scores(logprobs=(_OFFSET,) * n, margins=tuple(margins), stop_margins=stop_margins)
    verdict = judge_job(claim, scores, thresholds)
    problems = tuple(record["structure"])
    if problems:
        return Verdict(False, problems + verdict.reasons, *_stats(verdict))
    return verdict


def _stats(verdict: Verdict) -> tuple[int, int, float]:
    return verdict.tokens, verdict.disagreeing, verdict.sum_abs_dlogprob


def summary(
    records: Sequence[dict[str, Any]],
    thresholds: Thresholds,
    *,
    per_miner: int,
    seed: int,
) -> list[str]:
    """One line per variant: jobs failed and miners flagged."""
    by_variant: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_variant[record["variant"]].append(record)
    lines = []
    for name, group in by_variant.items():
        verdicts = [rejudge(r, thresholds) for r in group]
        honest = bool(group[0]["honest"])
        counted = [v for v, r in zip(verdicts, group, strict=True) if honest or r["tampered"]]
        failed = sum(not v.passed for v in counted)
        miners = MINERS
        flagged = flagged_miners(verdicts, thresholds, per_miner=per_miner, seed=seed)
        kind = (
            "honest" if honest else "gross" if name in GROSS else "subtle" if name in SUBTLE else ""
        )
        rate = failed / len(counted) if counted else math.nan
        lines.append(
            f"{kind:6s} {name:18s} failed {failed:4d}/{len(counted)} ({rate:6.1%})"
            f"  miners {flagged}/{miners}"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("raw", type=Path)
    parser.add_argument("--threshold", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--miner-jobs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    thresholds = parse_thresholds(args.threshold)
    records = json.loads(args.raw.read_text())
    print(thresholds)
    for line in summary(records, thresholds, per_miner=args.miner_jobs, seed=args.seed):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
