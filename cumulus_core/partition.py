"""The value objects the partition table hands out: a partition and one device's usage."""

from __future__ import annotations

import msgspec

from .amounts import format_amount
from .devices import DeviceKind


class Partition(msgspec.Struct, frozen=True):
    """A time-bounded share of one device.

    `tenths` is the share in tenths of the device (1-10); `memory_bytes` is that share of the
    device's memory; `created_at`/`expires_at` are epoch seconds; `env` is what a container
    needs to stay inside the share (see `cumulus_core.env.partition_env`).
    """

    partition_id: str
    device: int
    tenths: int
    memory_bytes: int
    created_at: float
    expires_at: float
    label: str | None = None
    env: dict[str, str] = {}

    @property
    def amount(self) -> str:
        """The share as the user writes it: "0.5", "1"."""
        return format_amount(self.tenths)

    def expired(self, now: float) -> bool:
        """True from the expiry instant on: an expired partition holds nothing."""
        return self.expires_at <= now


class DeviceStats(msgspec.Struct, frozen=True):
    """One device and what its live (unexpired) partitions hold of it."""

    index: int
    name: str
    kind: DeviceKind
    uuid: str
    memory_bytes: int
    allocated_tenths: int
    free_tenths: int
    partitions: list[str]
