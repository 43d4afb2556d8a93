"""The partition table: capacity, expiry, ids and recovery, against real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cumulus_core import (
    AmountExceedsDevice,
    InsufficientCapacity,
    InvalidAmount,
    InvalidDevice,
    InvalidDuration,
    InvalidLabel,
    NotFound,
    PartitionTable,
    StateError,
    StateRecovered,
)

from .conftest import ManualClock

GIB = 1024**3


def test_create_list_available_release(table: PartitionTable, clock: ManualClock) -> None:
    first = table.create(0, 5, 60, label="job-1")
    assert first.partition_id == "partition_0001"
    assert (first.device, first.tenths, first.amount) == (0, 5, "0.5")
    assert first.memory_bytes == 8 * GIB
    assert (first.created_at, first.expires_at) == (clock.now, clock.now + 60)
    assert first.env["CHRONOS_PARTITION_ID"] == "partition_0001"
    assert first.env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=8192M"
    second = table.create(1, 10, 30)
    assert table.list() == [first, second]
    assert table.available(0) == 5
    assert table.available(1) == 0
    assert table.find("job-1") == [first]
    assert table.get("partition_0002") == second
    assert table.release("partition_0001") == first
    assert table.list() == [second]
    assert table.available(0) == 10


def test_a_new_table_object_sees_the_same_file(table: PartitionTable, clock: ManualClock) -> None:
    created = table.create(1, 3, 60)
    other = PartitionTable(table.state_dir, table.devices, clock=clock)
    assert other.list() == [created]


def test_over_commit_is_refused_with_requested_and_free(table: PartitionTable) -> None:
    table.create(0, 7, 60)
    with pytest.raises(InsufficientCapacity) as caught:
        table.create(0, 4, 60)
    err = caught.value
    assert (err.device, err.requested_tenths, err.free_tenths) == (0, 4, 3)
    assert str(err).startswith(
        "Not enough available capacity on device 0: requested 0.4 GPU, free 0.3 GPU."
    )
    assert err.code == "RESOURCE_EXHAUSTED"
    assert table.create(0, 3, 60).tenths == 3
    assert table.available(0) == 0


def test_expired_partitions_are_never_held(table: PartitionTable, clock: ManualClock) -> None:
    short = table.create(0, 6, 10)
    long = table.create(0, 4, 100)
    clock.advance(9.999)
    assert table.available(0) == 0
    clock.advance(0.001)  # the expiry instant itself: no longer held
    assert table.list() == [long]
    assert table.available(0) == 6
    assert table.stats()[0].partitions == [long.partition_id]
    assert table.list(include_expired=True) == [short, long]
    reused = table.create(0, 6, 10)  # its share is free again before any reap
    assert table.reap() == [short]
    assert table.list(include_expired=True) == [long, reused]
    assert table.reap() == []


def test_reap_at_a_given_instant(table: PartitionTable, clock: ManualClock) -> None:
    a = table.create(0, 2, 10)
    b = table.create(1, 2, 20)
    assert table.reap(now=clock.now + 15) == [a]
    assert table.list(include_expired=True) == [b]


def test_an_expired_partition_can_still_be_released(
    table: PartitionTable, clock: ManualClock
) -> None:
    p = table.create(0, 2, 5)
    clock.advance(60)
    assert table.release(p.partition_id) == p
    with pytest.raises(NotFound, match="Partition not found or already released: partition_0001"):
        table.release(p.partition_id)


def test_ids_are_never_reused(table: PartitionTable, clock: ManualClock) -> None:
    ids = []
    for _ in range(3):
        p = table.create(0, 10, 5)
        ids.append(p.partition_id)
        table.release(p.partition_id)
    clock.advance(1)
    expiring = table.create(1, 1, 1)
    clock.advance(1)
    table.reap()
    ids.append(expiring.partition_id)
    ids.append(table.create(0, 1, 5).partition_id)
    assert ids == [f"partition_{n:04d}" for n in range(1, 6)]


def test_stats_per_device(table: PartitionTable) -> None:
    a = table.create(0, 3, 60)
    b = table.create(0, 2, 60)
    stats = table.stats()
    assert [(s.index, s.kind, s.allocated_tenths, s.free_tenths) for s in stats] == [
        (0, "virtual", 5, 5),
        (1, "virtual", 0, 10),
    ]
    assert stats[0].partitions == [a.partition_id, b.partition_id]
    assert stats[1].memory_bytes == 16 * GIB


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((2, 5, 60), InvalidDevice, "Invalid device index: 2. This machine has devices 0-1"),
        ((-1, 5, 60), InvalidDevice, "Invalid device index: -1"),
        ((0, 0, 60), InvalidAmount, "Invalid GPU amount: 0. Must be"),
        ((0, 15, 60), AmountExceedsDevice, "amount 1.5 exceeds 1 GPU"),
        ((0, 20, 60), AmountExceedsDevice, "one partition of amount 1 per device"),
        ((0, 5, 0), InvalidDuration, "Invalid duration: 0"),
        ((0, 5, -3), InvalidDuration, "Invalid duration: -3"),
    ],
)
def test_bad_requests_are_refused(
    table: PartitionTable, args: tuple[int, int, int], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        table.create(*args)
    assert table.list(include_expired=True) == []


@pytest.mark.parametrize("label", ["", "two\nlines", "x" * 129])
def test_bad_labels_are_refused(table: PartitionTable, label: str) -> None:
    with pytest.raises(InvalidLabel):
        table.create(0, 1, 5, label=label)


def test_available_on_a_missing_device(table: PartitionTable) -> None:
    with pytest.raises(InvalidDevice):
        table.available(7)


def test_state_file_is_plain_json(table: PartitionTable) -> None:
    table.create(0, 5, 60, label="job")
    document = json.loads(table.state_file.read_text())
    assert document["version"] == 1
    assert document["next_id"] == 2
    assert document["partitions"][0]["label"] == "job"
    assert not list(table.state_dir.glob("*.tmp")), "no temp file is left behind"


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"",
        b'{"version": 1, "next_id": 1, "partitions": [{"partition_id": "partition_0007"}]}',
        b'{"version": 1, "next_id": 2, "partitions": "nope"}',
        b"\x00\xff\xfe",
    ],
)
def test_corrupt_state_is_moved_aside_once(table: PartitionTable, content: bytes) -> None:
    table.state_dir.mkdir(parents=True)
    table.state_file.write_bytes(content)
    with pytest.raises(StateRecovered) as caught:
        table.list()
    moved = caught.value.moved_to
    assert isinstance(moved, Path)
    assert moved.name.startswith("partitions.json.corrupt-")
    assert moved.read_bytes() == content
    assert str(moved) in str(caught.value)
    assert table.list() == []  # the next operation proceeds on the empty table
    assert table.create(0, 5, 60).tenths == 5


def test_ids_stay_unique_across_a_recovery(table: PartitionTable) -> None:
    for _ in range(3):
        table.create(0, 1, 60)
    table.state_file.write_bytes(table.state_file.read_bytes()[:-5])  # torn write
    with pytest.raises(StateRecovered):
        table.create(0, 1, 60)
    assert table.create(0, 1, 60).partition_id == "partition_0004"


def test_counter_behind_the_ids_counts_as_corrupt(table: PartitionTable) -> None:
    table.create(0, 1, 60)
    document = json.loads(table.state_file.read_text())
    document["next_id"] = 1
    table.state_file.write_text(json.dumps(document))
    with pytest.raises(StateRecovered, match="do not match the id counter"):
        table.list()
    assert table.create(0, 1, 60).partition_id == "partition_0002"


def test_a_newer_state_version_is_not_destroyed(table: PartitionTable) -> None:
    table.state_dir.mkdir(parents=True)
    table.state_file.write_text('{"version": 2, "next_id": 1, "partitions": []}')
    with pytest.raises(StateError, match="newer Chronos") as caught:
        table.list()
    assert not isinstance(caught.value, StateRecovered)
    assert table.state_file.exists()
