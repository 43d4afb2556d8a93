"""The public names of cumulus_core are pinned: changing them is a deliberate act."""

from __future__ import annotations

import cumulus_core


def test_public_api() -> None:
    assert sorted(cumulus_core.__all__) == [
        "AmountExceedsDevice",
        "ChronosError",
        "Device",
        "DeviceKind",
        "DeviceStats",
        "DeviceUnavailable",
        "InsufficientCapacity",
        "InvalidAmount",
        "InvalidDevice",
        "InvalidDeviceSpec",
        "InvalidDuration",
        "InvalidLabel",
        "InvalidRequest",
        "NotFound",
        "Partition",
        "PartitionTable",
        "StateError",
        "StateRecovered",
        "TENTHS_PER_GPU",
        "discover_devices",
        "format_amount",
        "merge_envs",
        "parse_amount",
        "parse_virtual_spec",
        "partition_env",
    ]
    for name in cumulus_core.__all__:
        assert hasattr(cumulus_core, name), name
