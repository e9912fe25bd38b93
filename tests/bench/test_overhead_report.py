"""bench/overhead_report.py: the TLS column compares TLS with plaintext from the same run.

No figure of a real run is asserted (the machine is shared); made-up batches check the
arithmetic and that a mismatch on the TLS path is caught.
"""

from __future__ import annotations

import pytest

from bench.overhead import Batch, Sample
from bench.overhead_report import mismatches, summary, table


def batch(ttft_s: float, *, wall_s: float, text: str = "same") -> Batch:
    return Batch([Sample(ttft_s, ttft_s * 10, 10, text) for _ in range(3)], [], wall_s)


def test_the_tls_column_is_tls_against_plaintext() -> None:
    batches = {
        "direct": batch(0.002, wall_s=1.0),
        "coordinator": batch(0.008, wall_s=2.0),
        "tls": batch(0.0085, wall_s=2.5),
    }
    figures = summary(batches)
    assert figures["ttft_p50_added_ms"] == pytest.approx(6.0)
    assert figures["tls_ttft_p50_added_ms"] == pytest.approx(0.5)
    assert figures["tls_throughput_ratio"] == pytest.approx(0.8)
    rendered = table(1, figures, tls=True)
    assert "TLS added" in rendered and "+0.5" in rendered and "ratio 0.80" in rendered
    without = summary({path: batches[path] for path in ("direct", "coordinator")})
    assert "tls_throughput_ratio" not in without
    assert "TLS" not in table(1, without, tls=False)


def test_a_tls_answer_that_differs_from_the_engines_is_a_mismatch() -> None:
    problems = mismatches(
        batch(0.002, wall_s=1.0), batch(0.002, wall_s=1.0, text="other"), ["p"] * 3, name="tls"
    )
    assert len(problems) == 3 and "tls 10 tokens 'other'" in problems[0]
