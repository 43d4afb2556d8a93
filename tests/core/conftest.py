"""Shared pieces for the cumulus_core tests: declared virtual devices and a hand-moved clock."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from cumulus_core import Device, PartitionTable, parse_virtual_spec

REPO_ROOT = Path(__file__).resolve().parents[2]


class ManualClock:
    """Epoch seconds that move only when a test says so."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def devices() -> list[Device]:
    return parse_virtual_spec("2x16GiB")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def table(tmp_path: Path, devices: list[Device], clock: ManualClock) -> PartitionTable:
    return PartitionTable(tmp_path / "state", devices, clock=clock)


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for a real `python -m cumulus_core` process: virtual devices only."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        CHRONOS_DEVICES="virtual",
        CHRONOS_VIRTUAL_DEVICES="1x16GiB",
    )
    env.update(extra)
    return env


CLI = [sys.executable, "-m", "cumulus_core"]
