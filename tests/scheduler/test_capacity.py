"""The capacity index never stops the scheduler: a device whose allocations make no sense
(seen once in the chaos run: more than a whole GPU free) is indexed as whole and said loudly,
where it raised IndexError and restarted the leader in a loop, placing nothing."""

from __future__ import annotations

import logging

import pytest

from services.scheduler.capacity import Capacity
from services.scheduler.inventory import DeviceState, WorkerState


def test_a_device_with_a_negative_share_is_indexed_and_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker = WorkerState(
        worker_id="w1",
        devices=[
            DeviceState(index=0, name="v0", memory_bytes=1, allocated={"j1": -3}),
            DeviceState(index=1, name="v1", memory_bytes=1, allocated={"j2": 4, "j3": 9}),
        ],
    )
    capacity = Capacity()
    with caplog.at_level(logging.ERROR, logger="services.scheduler.capacity"):
        capacity.index(worker)
    assert list(capacity.slots_with_free(10)) == [("w1", 0)]
    assert list(capacity.slots_with_free(0)) == [("w1", 1)]
    assert list(capacity.workers_with_run(1)) == ["w1"]
    assert "device 0 of w1 holds a negative share: {'j1': -3}" in caplog.text
    capacity.drop("w1")
    assert list(capacity.slots_with_free(10)) == []
