"""What chronos_cli hands the partitioner, typed: partitions and device statistics.

The structs are cumulus_core's own (`cumulus_core.partition`), so the CLI's `--json` and the
partitioner read one definition. The `Chronos` driver turns chronos_cli's JSON into them here,
at the boundary, and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import msgspec

from cumulus_core.partition import DeviceStats, Partition
from shared.errors import Internal

__all__ = ["DeviceStats", "Partition", "as_devices", "as_partition", "as_partitions"]

T = TypeVar("T", Partition, DeviceStats)


def _typed(kind: type[T], raw: Mapping[str, Any]) -> T:
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError as exc:
        raise Internal(f"chronos_cli answered with a malformed {kind.__name__}: {exc}") from None


def as_partition(raw: Mapping[str, Any]) -> Partition:
    """One partition as chronos_cli's `create` or `list` describes it."""
    return _typed(Partition, raw)


def as_partitions(raw: Iterable[Mapping[str, Any]]) -> list[Partition]:
    return [_typed(Partition, item) for item in raw]


def as_devices(raw: Iterable[Mapping[str, Any]]) -> list[DeviceStats]:
    """chronos_cli's `stats`: one entry per device."""
    return [_typed(DeviceStats, item) for item in raw]
