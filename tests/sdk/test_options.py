"""`JobOptions` checks a GPU amount before anything is uploaded, with the seed's message, and
exactly as cumulus_core (the gateway's and chronos_cli's rule) does."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cumulus import InvalidGpuAmount, JobOptions
from cumulus._options import gpu_tenths
from cumulus_core.amounts import parse_amount
from cumulus_core.errors import InvalidAmount
from shared.errors import shown


def _core(value: object) -> int | None:
    try:
        return parse_amount(value)  # type: ignore[arg-type]
    except InvalidAmount:
        return None


def _sdk(value: object) -> int | None:
    try:
        return gpu_tenths(value)
    except InvalidGpuAmount as exc:
        message = exc.message
    # A long amount is quoted cut, with its length (issue 11, finding 8), by both.
    assert message == f"Invalid GPU amount: {shown(value)}. Must be 0.1-0.9 or whole number 1-8"
    return None


EDGES = [0, 0.1, 0.3, 0.9, 1, 1.0, 1.5, 2, 8, 9, -1, 2.3, 0.15, 0.1482, 10, "0.5", " 2 ",
         "abc", "NaN", "inf", "-0.1", "1e0", "0.10", float("nan"), float("inf"), True, None,
         Decimal("0.7"), [1], "", "8.0"]  # fmt: skip


@pytest.mark.parametrize("value", EDGES, ids=repr)
def test_the_sdk_and_cumulus_core_agree_on_edges(value: object) -> None:
    assert _sdk(value) == _core(value)


@given(st.one_of(st.floats(), st.integers(), st.text(max_size=6), st.decimals()))
def test_the_sdk_and_cumulus_core_agree(value: object) -> None:
    assert _sdk(value) == _core(value)


def test_job_options_build_keeps_the_base_where_nothing_is_given() -> None:
    base = JobOptions(gpu=0.2, duration=600)
    assert JobOptions.build(base) is base
    assert JobOptions.build(base, gpu=None, priority=3) == JobOptions(
        gpu=0.2, duration=600, priority=3
    )
    assert JobOptions.build() == JobOptions()
