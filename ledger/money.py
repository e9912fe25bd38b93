"""Credits as people write them ("12.5") and as the ledger stores them (integer micro-units).

No floats anywhere: 0.1 + 0.2 credits must be exactly 300,000 micro-units.
"""

from __future__ import annotations

import re

from ledger.interface import MICRO_PER_CREDIT

DECIMALS = len(str(MICRO_PER_CREDIT)) - 1  # 6: MICRO_PER_CREDIT == 10**DECIMALS
MAX_MICRO = 2**63 - 1  # what a PostgreSQL bigint holds

_CREDITS = re.compile(r"([0-9]+)(?:\.([0-9]+))?")


def format_credits(micro: int) -> str:
    """``12345678`` -> ``"12.345678"``; always six decimals, the sign kept (``"-0.000001"``)."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO_PER_CREDIT)
    return f"{sign}{whole}.{frac:0{DECIMALS}d}"


def parse_credits(text: str) -> int:
    """``"10"``, ``"10.5"``, ``"0.000001"`` -> micro-units.

    Raises ValueError for negative amounts, more than six decimals, amounts too large for the
    ledger, and anything that is not a plain decimal number.
    """
    stripped = text.strip()
    if stripped.startswith("-"):
        raise ValueError(f"credit amount must not be negative: {text!r}")
    match = _CREDITS.fullmatch(stripped)
    if match is None:
        raise ValueError(f"not a credit amount: {text!r} (expected a number such as 10 or 0.5)")
    whole, frac = match.group(1), match.group(2) or ""
    if len(frac) > DECIMALS:
        raise ValueError(
            f"credit amount has more than {DECIMALS} decimals: {text!r} "
            f"(the smallest unit is 0.{'0' * (DECIMALS - 1)}1)"
        )
    too_large = ValueError(
        f"credit amount too large: {text!r} (at most {format_credits(MAX_MICRO)})"
    )
    if len(whole.lstrip("0")) > len(str(MAX_MICRO // MICRO_PER_CREDIT)):
        raise too_large  # before int(), which refuses very long strings with a confusing message
    micro = int(whole) * MICRO_PER_CREDIT + int(frac.ljust(DECIMALS, "0"))
    if micro > MAX_MICRO:
        raise too_large
    return micro
