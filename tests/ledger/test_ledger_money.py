"""Credits <-> micro-units: exact, strict, and round-tripping."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.interface import MICRO_PER_CREDIT
from ledger.money import MAX_MICRO, format_credits, parse_credits


@pytest.mark.parametrize(
    ("micro", "text"),
    [
        (0, "0.000000"),
        (1, "0.000001"),
        (12_345_678, "12.345678"),
        (10 * MICRO_PER_CREDIT, "10.000000"),
        (-1, "-0.000001"),
        (-12_345_678, "-12.345678"),
        (-(2**63), "-9223372036854.775808"),
    ],
)
def test_format(micro: int, text: str) -> None:
    assert format_credits(micro) == text


@pytest.mark.parametrize(
    ("text", "micro"),
    [
        ("10", 10_000_000),
        ("10.5", 10_500_000),
        ("0.000001", 1),
        (" 7.25 ", 7_250_000),
        ("0", 0),
        ("007.100000", 7_100_000),
        ("9223372036854.775807", MAX_MICRO),
    ],
)
def test_parse(text: str, micro: int) -> None:
    assert parse_credits(text) == micro


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("-1", "negative"),
        ("-0.5", "negative"),
        ("0.0000001", "more than 6 decimals"),
        ("1.1234567", "more than 6 decimals"),
        ("", "not a credit amount"),
        ("ten", "not a credit amount"),
        ("1e6", "not a credit amount"),
        ("1,5", "not a credit amount"),
        (".5", "not a credit amount"),
        ("5.", "not a credit amount"),
        ("+5", "not a credit amount"),
        ("nan", "not a credit amount"),
        ("١٢", "not a credit amount"),  # non-ASCII digits int() would accept
        ("9223372036854.775808", "too large"),
        ("9" * 5000, "too large"),
    ],
)
def test_parse_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_credits(text)


@given(st.integers(min_value=0, max_value=MAX_MICRO))
def test_round_trip(micro: int) -> None:
    assert parse_credits(format_credits(micro)) == micro


@given(st.integers(min_value=-MAX_MICRO, max_value=MAX_MICRO))
def test_format_keeps_sign_and_magnitude(micro: int) -> None:
    text = format_credits(micro)
    assert text.startswith("-") == (micro < 0)
    assert parse_credits(text.removeprefix("-")) == abs(micro)


@given(st.integers(min_value=0, max_value=10**12), st.integers(min_value=0, max_value=999_999))
def test_parse_agrees_with_exact_arithmetic(whole: int, frac: int) -> None:
    assert parse_credits(f"{whole}.{frac:06d}") == whole * MICRO_PER_CREDIT + frac
