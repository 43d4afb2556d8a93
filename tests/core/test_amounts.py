"""GPU amounts are exact tenths; anything else is refused with the seed's message."""

from __future__ import annotations

from decimal import Decimal

import pytest

from cumulus_core import InvalidAmount, InvalidRequest, format_amount, parse_amount

FRACTIONS = [(f"0.{n}", n) for n in range(1, 10)]
WHOLES = [(str(n), n * 10) for n in range(1, 9)]


@pytest.mark.parametrize(("text", "tenths"), FRACTIONS + WHOLES)
def test_every_valid_amount_as_text(text: str, tenths: int) -> None:
    assert parse_amount(text) == tenths


@pytest.mark.parametrize(("text", "tenths"), FRACTIONS + WHOLES)
def test_every_valid_amount_as_a_number(text: str, tenths: int) -> None:
    assert parse_amount(float(text)) == tenths
    assert parse_amount(Decimal(text)) == tenths


@pytest.mark.parametrize(
    ("value", "tenths"),
    [(1, 10), (8, 80), ("0.50", 5), ("1.0", 10), (" 0.3 ", 3), (2.0, 20), ("1e-1", 1)],
)
def test_equivalent_spellings(value: object, tenths: int) -> None:
    assert parse_amount(value) == tenths  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0, "0"),
        ("0", "0"),
        (2.3, "2.3"),
        ("2.3", "2.3"),
        (0.1482, "0.1482"),
        (0.15, "0.15"),
        (1.5, "1.5"),
        (9, "9"),
        ("9", "9"),
        (-1, "-1"),
        (-0.5, "-0.5"),
        (float("nan"), "nan"),
        ("NaN", "NaN"),
        (float("inf"), "inf"),
        ("inf", "inf"),
        ("abc", "abc"),
        ("", ""),
        (True, "True"),
        (None, "None"),
        (0.1 + 0.2, "0.30000000000000004"),
    ],
)
def test_invalid_amounts_carry_the_exact_message(value: object, shown: str) -> None:
    with pytest.raises(InvalidAmount) as caught:
        parse_amount(value)  # type: ignore[arg-type]
    assert str(caught.value) == f"Invalid GPU amount: {shown}. Must be 0.1-0.9 or whole number 1-8"
    assert caught.value.amount is value or caught.value.amount == value
    assert isinstance(caught.value, InvalidRequest)
    assert isinstance(caught.value, ValueError)
    assert caught.value.code == "INVALID_ARGUMENT"


def test_tenths_add_exactly() -> None:
    assert parse_amount("0.1") + parse_amount("0.2") == parse_amount("0.3")
    assert parse_amount(0.1) + parse_amount(0.2) == parse_amount(0.3) == 3


@pytest.mark.parametrize(
    ("tenths", "text"), [(1, "0.1"), (5, "0.5"), (10, "1"), (15, "1.5"), (80, "8"), (0, "0")]
)
def test_format_amount(tenths: int, text: str) -> None:
    assert format_amount(tenths) == text
