"""The scheduler's worker inventory records: a worker, its devices and what each holds.

A leaf module (state.py and capacity.py both build on it), so the capacity indexes can name
the worker type without importing the state that owns them.
"""

from __future__ import annotations

import msgspec

from cumulus_core.amounts import TENTHS_PER_GPU


class DeviceState(msgspec.Struct, kw_only=True):
    index: int
    name: str
    memory_bytes: int
    kind: str = "virtual"
    allocated: dict[str, int] = {}
    """job id -> tenths held on this device."""

    @property
    def used(self) -> int:
        return sum(self.allocated.values())

    @property
    def free(self) -> int:
        return TENTHS_PER_GPU - self.used


class WorkerState(msgspec.Struct, kw_only=True):
    worker_id: str
    hostname: str = ""
    backend: str = ""
    labels: dict[str, str] = {}
    devices: list[DeviceState] = []
    registered_at: float = 0.0
    last_seen: float = 0.0
    heartbeat_s: float = 5.0
    alive: bool = True
    lost_reason: str = ""
    declared_lost: bool = False
    """A scheduler declared it lost (`WorkerLost`), as opposed to its own deregistration:
    a scheduler taking over revokes what such a worker still holds (handlers.promotion)."""
    revived_at: float = 0.0
    node_id: str = ""
    node_state: str = ""
    """Swarm's view of the worker's node, when scheduler.swarm_nodes is on ("" otherwise)."""
    node_availability: str = ""
    node_labels: dict[str, str] = {}

    @property
    def schedulable(self) -> bool:
        """Alive, and not down, drained or paused as far as Swarm says."""
        return (
            self.alive
            and self.node_state not in ("down", "disconnected")
            and self.node_availability in ("", "active")
        )
