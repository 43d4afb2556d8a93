"""Exact GPU amounts: integer tenths inside, so 0.1 + 0.2 is exactly 0.3.

Valid amounts are 0.1-0.9 in steps of exactly 0.1 (a share of one device) or a whole
number 1-8 (whole devices). Text and numbers are read through `Decimal` so that binary
floating point never decides whether an amount is valid.
"""

from __future__ import annotations

from decimal import Decimal

from .errors import InvalidAmount
from .tenths import TENTHS_PER_GPU, format_amount

__all__ = ["MAX_WHOLE_GPUS", "TENTHS_PER_GPU", "format_amount", "parse_amount"]

MAX_WHOLE_GPUS = 8


def parse_amount(value: str | int | float | Decimal) -> int:
    """The amount in tenths; raises `InvalidAmount` naming the input as given."""
    if isinstance(value, bool) or not isinstance(value, str | int | float | Decimal):
        raise InvalidAmount(value)
    try:
        if isinstance(value, str):
            number = Decimal(value.strip())
        elif isinstance(value, float):
            # repr is the shortest text that round-trips, so 0.3 reads as 0.3, not 0.2999...
            number = Decimal(repr(value))
        else:
            number = Decimal(value)
        if not number.is_finite():
            raise InvalidAmount(value)
        tenths = number * TENTHS_PER_GPU
        if tenths != tenths.to_integral_value():
            raise InvalidAmount(value)
        whole = int(tenths)
    except ArithmeticError:  # InvalidOperation, Overflow ("1e999999") and the like
        raise InvalidAmount(value) from None
    if valid_tenths(whole):
        return whole
    raise InvalidAmount(value)


def valid_tenths(tenths: int) -> bool:
    """Whether `tenths` is a share of one device (1-9 tenths) or 1-8 whole devices."""
    if 1 <= tenths < TENTHS_PER_GPU:
        return True
    return tenths % TENTHS_PER_GPU == 0 and 1 <= tenths // TENTHS_PER_GPU <= MAX_WHOLE_GPUS
