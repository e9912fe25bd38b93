"""Which finished jobs get re-scored, and what scoring work is paid.

Selection is a keyed HMAC over the job id and the output digest, compared with the miner's check
rate: the coordinator's key is secret, so a miner cannot tell which of its jobs will be checked
(before: the output is not known until it is produced; after: it never hears of the check
unless it failed). The check rate of an identity is 100% until it has
``probation_checks`` consecutive valid checks, then ``max(floor, 1 / consecutive valid checks)``;
a confirmed failure resets the count, so the next jobs are all checked again.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from dataclasses import dataclass, field


@dataclass(frozen=True)
class VerificationConfig:
    """How the coordinator spot-checks miners (docs/verification.md explains the numbers)."""

    enabled: bool = True  # re-score a sample of finished jobs on other miners
    floor: float = 0.02  # the lowest check rate, reached after 1/floor consecutive valid checks
    probation_checks: int = 10  # a new or reset identity has all jobs checked until this many pass
    window_s: float = 86_400.0  # credits mature after this; a confirmed cheat loses the unmatured
    score_timeout_s: float = 30.0  # a scorer silent this long is skipped (no penalty: may be slow)
    scorer_pay_bps: int = 10_000  # scoring pay: tokens scored x the model's input price x bps/10000
    bans_after: int = 2  # confirmed failures after which an identity's key is refused for good
    max_concurrent_checks: int = 4  # checks in flight at once
    max_backlog: int = 10_000  # selected checks waiting; beyond this new ones are dropped (counted)
    # The HMAC key of selection; random per run unless the operator pins one.
    selection_key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.floor <= 1:
            raise ValueError(f"floor must be in (0, 1], got {self.floor}")
        if self.probation_checks < 0:
            raise ValueError(f"probation_checks must be >= 0, got {self.probation_checks}")
        if not (math.isfinite(self.window_s) and self.window_s > 0):
            raise ValueError(f"window_s must be positive, got {self.window_s}")
        if self.bans_after < 1:
            raise ValueError(f"bans_after must be >= 1, got {self.bans_after}")
        if self.scorer_pay_bps < 0:
            raise ValueError(f"scorer_pay_bps must be >= 0, got {self.scorer_pay_bps}")


def check_rate(consecutive_valid: int, config: VerificationConfig) -> float:
    """The probability that the next job of an identity with this record is checked."""
    if consecutive_valid < max(1, config.probation_checks):
        return 1.0
    return max(config.floor, 1.0 / consecutive_valid)


def selected(key: bytes, *, job_id: str, output_sha256: bytes, rate: float) -> bool:
    """True when the job falls in the checked fraction ``rate`` (deterministic given the key)."""
    if rate >= 1.0:
        return True
    mac = hmac.new(key, b"meshmint/v1/spot-check\x00", hashlib.sha256)
    mac.update(job_id.encode("utf-8") + b"\x00" + output_sha256)
    draw = int.from_bytes(mac.digest()[:8], "big")
    return draw < rate * 2**64


def scoring_pay(tokens: int, *, input_price_per_mtok: int, pay_bps: int) -> int:
    """Micro-units paid for scoring ``tokens`` tokens: one prefill, priced like prompt tokens."""
    return -(-tokens * input_price_per_mtok * pay_bps // (1_000_000 * 10_000))
