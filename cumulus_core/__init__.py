"""Chronos, the GPU partition manager of Cumulus: time-bounded shares of a device.

Devices come from NVML, OpenCL or declared virtual devices (`discover_devices`); amounts are
exact integer tenths (`parse_amount`); `PartitionTable` keeps partitions in a file that many
processes share safely; `partition_env` is what a container needs to stay inside its share.
The `chronos_cli` command (`cumulus_core.cli:main`) drives it all from the shell.
"""

from typing import TYPE_CHECKING, Any

from .amounts import TENTHS_PER_GPU, format_amount, parse_amount
from .devices import Device, DeviceKind, discover_devices, parse_virtual_spec
from .env import merge_envs, partition_env
from .errors import (
    AmountExceedsDevice,
    ChronosError,
    DeviceUnavailable,
    InsufficientCapacity,
    InvalidAmount,
    InvalidDevice,
    InvalidDeviceSpec,
    InvalidDuration,
    InvalidLabel,
    InvalidRequest,
    NotFound,
    StateError,
    StateRecovered,
)
from .partition import DeviceStats, Partition

if TYPE_CHECKING:
    from .table import PartitionTable


def __getattr__(name: str) -> Any:
    # The partition table needs fcntl (POSIX only): it is loaded on first use, so that the
    # amount rules (`cumulus_core.amounts`) import anywhere, the SDK on Windows included.
    if name == "PartitionTable":
        from .table import PartitionTable

        return PartitionTable
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "TENTHS_PER_GPU",
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
    "discover_devices",
    "format_amount",
    "merge_envs",
    "parse_amount",
    "parse_virtual_spec",
    "partition_env",
]
