"""Placement: where a request of n tenths fits, as a pure function of the scheduler's state.

Fractions go best-fit onto one device (the fullest device that still fits, so whole devices
stay free for whole jobs); whole requests take contiguous, entirely free devices on one worker,
preferring the worker left with the fewest free devices.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import NamedTuple

from cumulus_core.amounts import TENTHS_PER_GPU
from services.scheduler.state import SchedulerState, WorkerState


class Placement(NamedTuple):
    worker_id: str
    devices: list[int]
    tenths: int
    """Tenths held on each device."""


def _contiguous_free(worker: WorkerState, count: int) -> list[int] | None:
    run: list[int] = []
    for device in sorted(worker.devices, key=lambda d: d.index):
        if device.free == TENTHS_PER_GPU and (not run or device.index == run[-1] + 1):
            run.append(device.index)
        elif device.free == TENTHS_PER_GPU:
            run = [device.index]
        else:
            run = []
        if len(run) == count:
            return run
    return None


def place(state: SchedulerState, tenths: int, exclude: Collection[str] = ()) -> Placement | None:
    """The best placement for `tenths` (1-9: a share, 10·n: n whole devices), or None."""
    workers = [w for w in state.live_workers() if w.worker_id not in exclude]
    if tenths < TENTHS_PER_GPU:
        best: tuple[int, int, str, int] | None = None
        for worker in workers:
            for device in worker.devices:
                free = device.free
                if free >= tenths:
                    # Fullest device first; a partly used device beats an empty one.
                    key = (free, device.index, worker.worker_id, device.index)
                    if best is None or key[:3] < best[:3]:
                        best = key
        if best is None:
            return None
        return Placement(best[2], [best[3]], tenths)
    count = tenths // TENTHS_PER_GPU
    choice: tuple[int, str, list[int]] | None = None
    for worker in workers:
        run = _contiguous_free(worker, count)
        if run is not None:
            spare = sum(1 for d in worker.devices if d.free == TENTHS_PER_GPU) - count
            if choice is None or (spare, worker.worker_id) < (choice[0], choice[1]):
                choice = (spare, worker.worker_id, run)
    if choice is None:
        return None
    return Placement(choice[1], choice[2], TENTHS_PER_GPU)


def fits_ever(state: SchedulerState, tenths: int) -> bool:
    """Whether the pool as it stands could hold the request if it were empty."""
    if tenths < TENTHS_PER_GPU:
        return any(w.devices for w in state.live_workers())
    count = tenths // TENTHS_PER_GPU
    return any(_longest_run(w) >= count for w in state.live_workers())


def _longest_run(worker: WorkerState) -> int:
    best = run = 0
    previous = None
    for device in sorted(worker.devices, key=lambda d: d.index):
        run = run + 1 if previous is not None and device.index == previous + 1 else 1
        previous = device.index
        best = max(best, run)
    return best


def largest_pool_request(state: SchedulerState) -> str:
    """The largest amount one job could ever get here, as text (for error messages)."""
    longest = max((_longest_run(w) for w in state.live_workers()), default=0)
    return str(longest)


def largest_free_now(state: SchedulerState) -> int:
    """Tenths of the largest request that would fit right now."""
    best = 0
    for worker in state.live_workers():
        run = 0
        for device in sorted(worker.devices, key=lambda d: d.index):
            run = run + 1 if device.free == TENTHS_PER_GPU else 0
            best = max(best, run * TENTHS_PER_GPU, device.free)
    return best
