"""GPU amounts and durations as the user types them: exact tenths, the seed's error messages."""

from __future__ import annotations

import math

import pytest

from shared.errors import InvalidArgument, InvalidGpuAmount
from shared.gpu import GpuRequest, parse_duration


@pytest.mark.parametrize(
    ("value", "tenths"),
    [
        *[(t / 10, t) for t in range(1, 10)],
        *[(f"0.{t}", t) for t in range(1, 10)],
        *[(n, n * 10) for n in range(1, 9)],
        *[(str(n), n * 10) for n in range(1, 9)],
        (1.0, 10),
        ("8.0", 80),
        (" 0.5 ", 5),
    ],
)
def test_parse_valid_amounts(value: object, tenths: int) -> None:
    assert GpuRequest.parse(value).tenths == tenths


def test_tenths_add_exactly() -> None:
    total = GpuRequest.parse(0.1).tenths + GpuRequest.parse(0.2).tenths
    assert total == GpuRequest.parse(0.3).tenths


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0, "0"),
        (2.3, "2.3"),
        (0.1482, "0.1482"),
        (1.5, "1.5"),
        ("1.5", "1.5"),
        (9, "9"),
        (-1, "-1"),
        (float("nan"), "nan"),
        (math.inf, "inf"),
        ("abc", "abc"),
        (True, "True"),
        (None, "None"),
        ("", ""),
        (0.05, "0.05"),
    ],
)
def test_parse_invalid_amounts_with_the_seed_message(value: object, shown: str) -> None:
    with pytest.raises(InvalidGpuAmount) as info:
        GpuRequest.parse(value)
    assert str(info.value) == f"Invalid GPU amount: {shown}. Must be 0.1-0.9 or whole number 1-8"
    assert info.value.code == "INVALID_ARGUMENT"
    assert isinstance(info.value, InvalidArgument)


def test_invalid_amount_carries_the_input() -> None:
    with pytest.raises(InvalidGpuAmount) as info:
        GpuRequest.parse("2.5")
    assert info.value.requested == "2.5"


@pytest.mark.parametrize(
    ("value", "devices", "per_device", "whole", "text"),
    [
        (0.1, 1, 1, False, "0.1"),
        (0.5, 1, 5, False, "0.5"),
        (0.9, 1, 9, False, "0.9"),
        (1, 1, 10, True, "1"),
        (3, 3, 10, True, "3"),
        (8, 8, 10, True, "8"),
    ],
)
def test_shape_of_a_request(
    value: object, devices: int, per_device: int, whole: bool, text: str
) -> None:
    req = GpuRequest.parse(value)
    assert (req.devices, req.per_device, req.whole, str(req)) == (devices, per_device, whole, text)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(60, 60), (86400, 86400), (3600, 3600), ("120", 120), (60.0, 60), (" 300 ", 300)],
)
def test_parse_valid_durations(value: object, seconds: int) -> None:
    result = parse_duration(value)
    assert result == seconds
    assert type(result) is int


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (59, "59"),
        (86401, "86401"),
        (60.5, "60.5"),
        ("abc", "abc"),
        (True, "True"),
        (None, "None"),
        (0, "0"),
        (-60, "-60"),
        (float("nan"), "nan"),
        ("", ""),
    ],
)
def test_parse_invalid_durations_with_the_seed_message(value: object, shown: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_duration(value)
    assert str(info.value) == f"Invalid duration: {shown}. Must be 60-86400 seconds"
    assert info.value.code == "INVALID_ARGUMENT"


def test_duration_bounds_come_from_configuration() -> None:
    assert parse_duration(30, minimum=10, maximum=100) == 30
    with pytest.raises(InvalidArgument, match=r"^Invalid duration: 101\. Must be 10-100 seconds$"):
        parse_duration(101, minimum=10, maximum=100)
