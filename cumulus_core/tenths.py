"""GPU amounts as integer tenths, and their shortest text: the leaf both the amount rules
(`amounts`) and the errors that quote amounts (`errors`) import."""

from __future__ import annotations

TENTHS_PER_GPU = 10
"""Tenths in one whole device: the most one partition (and one device) can hold."""


def format_amount(tenths: int) -> str:
    """Tenths as the shortest decimal text: 5 -> "0.5", 10 -> "1", 15 -> "1.5"."""
    sign = "-" if tenths < 0 else ""
    whole, tenth = divmod(abs(tenths), TENTHS_PER_GPU)
    return f"{sign}{whole}" if tenth == 0 else f"{sign}{whole}.{tenth}"
