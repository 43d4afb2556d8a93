"""Property: any sequence of creates, releases and clock moves keeps every device <= 1 GPU."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cumulus_core import InsufficientCapacity, NotFound, PartitionTable, parse_virtual_spec

from .conftest import ManualClock

DEVICES = parse_virtual_spec("2x16GiB")

create = st.tuples(st.just("create"), st.integers(0, 1), st.integers(1, 10), st.integers(1, 50))
release = st.tuples(st.just("release"), st.integers(1, 40))
advance = st.tuples(st.just("advance"), st.integers(0, 30))
reap = st.tuples(st.just("reap"))
operations = st.lists(st.one_of(create, create, release, advance, reap), max_size=30)


@settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(operations)
def test_devices_are_never_over_committed(ops: list[tuple[object, ...]]) -> None:
    clock = ManualClock()
    with tempfile.TemporaryDirectory() as state:
        table = PartitionTable(Path(state), DEVICES, clock=clock)
        model: dict[str, tuple[int, int, float]] = {}  # id -> (device, tenths, expires_at)
        for op in ops:
            if op[0] == "create":
                _, device, tenths, duration = op
                assert isinstance(device, int)
                assert isinstance(tenths, int)
                assert isinstance(duration, int)
                free = 10 - sum(
                    t for d, t, exp in model.values() if d == device and exp > clock.now
                )
                if tenths > free:
                    with pytest.raises(InsufficientCapacity) as refused:
                        table.create(device, tenths, duration)
                    assert refused.value.free_tenths == free
                else:
                    p = table.create(device, tenths, duration)
                    model[p.partition_id] = (device, tenths, p.expires_at)
            elif op[0] == "release":
                pid = f"partition_{op[1]:04d}"
                if pid in model:
                    assert table.release(pid).partition_id == pid
                    del model[pid]
                else:
                    with pytest.raises(NotFound):
                        table.release(pid)
            elif op[0] == "advance":
                assert isinstance(op[1], int)
                clock.advance(op[1])
            else:
                for p in table.reap():
                    assert p.expires_at <= clock.now
                    del model[p.partition_id]
            for stat in table.stats():
                assert 0 <= stat.allocated_tenths <= 10
                assert stat.allocated_tenths + stat.free_tenths == 10
                assert table.available(stat.index) == stat.free_tenths
            live = {p.partition_id for p in table.list()}
            assert live == {pid for pid, (_, _, exp) in model.items() if exp > clock.now}
