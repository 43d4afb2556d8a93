"""Value objects for what a job asks for: an exact GPU amount and a duration.

Amounts are integer tenths (0.1 + 0.2 == 0.3 exactly); parsing is cumulus_core's, so the
gateway and chronos_cli can never disagree on what is valid.
"""

from __future__ import annotations

import math

import msgspec

from cumulus_core.amounts import TENTHS_PER_GPU, format_amount, parse_amount
from cumulus_core.errors import InvalidAmount
from shared.errors import InvalidGpuAmount, invalid_duration


class GpuRequest(msgspec.Struct, frozen=True):
    """A share of one device (1-9 tenths) or whole devices (10, 20 … 80 tenths)."""

    tenths: int

    @classmethod
    def parse(cls, value: object) -> GpuRequest:
        try:
            return cls(parse_amount(value))  # type: ignore[arg-type]
        except InvalidAmount:
            raise InvalidGpuAmount(value) from None

    @property
    def whole(self) -> bool:
        return self.tenths >= TENTHS_PER_GPU

    @property
    def devices(self) -> int:
        """Devices the request spans: 1 for a fraction, n for n whole GPUs."""
        return self.tenths // TENTHS_PER_GPU if self.whole else 1

    @property
    def per_device(self) -> int:
        """Tenths taken on each of its devices."""
        return TENTHS_PER_GPU if self.whole else self.tenths

    def __str__(self) -> str:
        return format_amount(self.tenths)


def parse_duration(value: object, minimum: int = 60, maximum: int = 86400) -> int:
    """Whole seconds in [minimum, maximum]; anything else is INVALID_ARGUMENT."""
    if isinstance(value, bool):
        raise invalid_duration(value, minimum, maximum)
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise invalid_duration(value, minimum, maximum)
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise invalid_duration(value, minimum, maximum) from None
    if not isinstance(value, int) or not minimum <= value <= maximum:
        raise invalid_duration(value, minimum, maximum)
    return value
