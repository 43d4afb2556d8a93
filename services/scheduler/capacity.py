"""Free-capacity indexes over the live workers' devices, kept in step with every allocation.

Placement must stay fast with 1,000 workers x 8 devices and 10,000 queued jobs, so nothing
scans the pool: devices are bucketed by their free tenths (0-10), and workers by the longest
run of contiguous, entirely free devices they have. Buckets are insertion-ordered dicts, so a
choice among equals is deterministic.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from cumulus_core.amounts import TENTHS_PER_GPU
from services.scheduler.inventory import WorkerState

log = logging.getLogger(__name__)

Slot = tuple[str, int]
"""(worker id, device index)."""


def free_runs(worker: WorkerState) -> list[list[int]]:
    """Maximal runs of contiguous device indexes that are entirely free, in index order."""
    runs: list[list[int]] = []
    previous = None
    for device in sorted(worker.devices, key=lambda d: d.index):
        if device.free == TENTHS_PER_GPU:
            if runs and previous is not None and runs[-1][-1] == previous == device.index - 1:
                runs[-1].append(device.index)
            else:
                runs.append([device.index])
        previous = device.index
    return runs


class Capacity:
    def __init__(self) -> None:
        self.by_free: list[dict[Slot, None]] = [{} for _ in range(TENTHS_PER_GPU + 1)]
        self.run_of: dict[str, int] = {}
        self.by_run: dict[int, dict[str, None]] = {}
        self.free_sum: dict[str, int] = {}
        self.by_free_sum: dict[int, dict[str, None]] = {}
        self.span_of: dict[str, int] = {}
        """Longest run of contiguous device indexes a live worker has at all (free or not)."""
        self._spans: dict[int, int] = {}
        """span -> how many live workers have it, so the widest is found without a scan."""
        self._slots: dict[str, list[tuple[Slot, int]]] = {}

    def index(self, worker: WorkerState) -> None:
        """(Re)index one worker after any change to it; a worker that cannot take new jobs
        (lost, or down, drained or paused in Swarm) leaves the indexes.

        Runs on every placement and release, so each device's free share is computed once
        and the runs come from one pass over the devices in index order."""
        worker_id = worker.worker_id
        self.drop(worker_id)
        if not worker.schedulable:
            return
        by_free = self.by_free
        slots = []
        frees: list[tuple[int, int]] = []
        free_sum = 0
        for device in worker.devices:
            slot = (worker_id, device.index)
            free = TENTHS_PER_GPU - sum(device.allocated.values())
            if free < 0:
                free = 0
            elif free > TENTHS_PER_GPU:
                # A bug's trace, never a reason to stop placing: the leader indexes on every
                # event, and an exception here restarted it in a loop (a share of -5 tenths
                # forged on the bus, before the scheduler checked shares). Said loudly.
                log.error(
                    "device %s of %s holds a negative share: %s",
                    device.index,
                    worker_id,
                    device.allocated,
                )
                free = TENTHS_PER_GPU
            by_free[free][slot] = None
            slots.append((slot, free))
            frees.append((device.index, free))
            free_sum += free
        self._slots[worker_id] = slots
        frees.sort()
        run = span = best_run = best_span = 0
        previous = None
        for index, free in frees:
            adjacent = previous is not None and index == previous + 1
            span = span + 1 if adjacent else 1
            run = (run + 1 if adjacent else 1) if free == TENTHS_PER_GPU else 0
            previous = index
            best_span = max(best_span, span)
            best_run = max(best_run, run)
        self.run_of[worker_id] = best_run
        self.by_run.setdefault(best_run, {})[worker_id] = None
        self.free_sum[worker_id] = free_sum
        self.by_free_sum.setdefault(free_sum, {})[worker_id] = None
        self.span_of[worker_id] = best_span
        self._spans[best_span] = self._spans.get(best_span, 0) + 1

    def drop(self, worker_id: str) -> None:
        for slot, free in self._slots.pop(worker_id, []):
            self.by_free[free].pop(slot, None)
        run = self.run_of.pop(worker_id, None)
        if run is not None:
            self.by_run[run].pop(worker_id, None)
        free_sum = self.free_sum.pop(worker_id, None)
        if free_sum is not None:
            self.by_free_sum[free_sum].pop(worker_id, None)
        span = self.span_of.pop(worker_id, None)
        if span is not None:
            left = self._spans[span] - 1
            if left:
                self._spans[span] = left
            else:
                del self._spans[span]

    def slots_with_free(self, tenths: int) -> Iterator[Slot]:
        yield from self.by_free[tenths]

    def workers_with_run(self, length: int) -> Iterator[str]:
        yield from self.by_run.get(length, {})

    def largest_free(self) -> int:
        """Tenths of the largest share one device has free now (10 if a device is empty)."""
        for free in range(TENTHS_PER_GPU, 0, -1):
            if self.by_free[free]:
                return free
        return 0

    def workers_by_free_sum(self) -> Iterator[str]:
        """Live workers, the most free capacity first."""
        for free_sum in sorted(self.by_free_sum, reverse=True):
            yield from self.by_free_sum[free_sum]

    def longest_run(self) -> int:
        return max((r for r, ws in self.by_run.items() if ws), default=0)

    def widest_span(self) -> int:
        """The most contiguous devices any live worker has: the largest job that could fit."""
        return max(self._spans, default=0)
