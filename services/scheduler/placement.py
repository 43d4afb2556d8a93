"""Placement: where a request fits, as pure functions of the scheduler's state.

Shares (1-9 tenths) go on one device. The default policy is best-fit: the fullest device that
still fits, so shares pack together and whole devices stay free for whole jobs (bench/placement.py
measures it against first-fit and worst-fit). Whole requests (n x 10 tenths) take n contiguous,
entirely free devices on one worker, preferring the worker whose longest free run is shortest
and, within it, the shortest run that fits, so long runs stay intact for larger jobs.

A reservation holds back devices for the head of the queue when it does not fit: nothing else
is placed there, so backfilled jobs never delay it (no starvation).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import NamedTuple

from cumulus_core.amounts import TENTHS_PER_GPU
from services.scheduler.capacity import Slot, free_runs
from services.scheduler.inventory import WorkerState
from services.scheduler.state import SchedulerState

POLICIES = ("best", "first", "worst")


class Placement(NamedTuple):
    worker_id: str
    devices: list[int]
    tenths: int
    """Tenths held on each device."""


class Reservation(NamedTuple):
    """Devices (and whole workers) held back for the queue's head."""

    slots: frozenset[Slot]
    workers: frozenset[str]

    def blocks(self, slot: Slot) -> bool:
        return slot in self.slots or slot[0] in self.workers


NO_RESERVATION = Reservation(frozenset(), frozenset())


def place(
    state: SchedulerState,
    tenths: int,
    exclude: Collection[str] = (),
    reserved: Reservation = NO_RESERVATION,
    policy: str = "best",
) -> Placement | None:
    """The placement for `tenths` (1-9: a share, 10·n: n whole devices), or None."""
    if tenths < TENTHS_PER_GPU:
        return _place_share(state, tenths, exclude, reserved, policy)
    return _place_whole(state, tenths // TENTHS_PER_GPU, exclude, reserved)


def _place_share(
    state: SchedulerState,
    tenths: int,
    exclude: Collection[str],
    reserved: Reservation,
    policy: str,
) -> Placement | None:
    if policy == "first":
        for worker in state.workers.values():
            if worker.schedulable and worker.worker_id not in exclude:
                for device in worker.devices:
                    slot = (worker.worker_id, device.index)
                    if device.free >= tenths and not reserved.blocks(slot):
                        return Placement(worker.worker_id, [device.index], tenths)
        return None
    order = range(tenths, TENTHS_PER_GPU + 1)
    for free in reversed(order) if policy == "worst" else order:
        for slot in state.capacity.slots_with_free(free):
            if slot[0] not in exclude and not reserved.blocks(slot):
                return Placement(slot[0], [slot[1]], tenths)
    return None


def _place_whole(
    state: SchedulerState, count: int, exclude: Collection[str], reserved: Reservation
) -> Placement | None:
    for length in range(count, state.capacity.longest_run() + 1):
        for worker_id in state.capacity.workers_with_run(length):
            if worker_id in exclude or worker_id in reserved.workers:
                continue
            runs = _split(free_runs(state.workers[worker_id]), worker_id, reserved)
            fitting = sorted((len(r), r) for r in runs if len(r) >= count)
            if fitting:
                return Placement(worker_id, fitting[0][1][:count], TENTHS_PER_GPU)
    return None


def _split(runs: list[list[int]], worker_id: str, reserved: Reservation) -> list[list[int]]:
    """Free runs cut at reserved devices."""
    if not reserved.slots:
        return runs
    out: list[list[int]] = []
    for run in runs:
        piece: list[int] = []
        for index in run:
            if (worker_id, index) in reserved.slots:
                if piece:
                    out.append(piece)
                piece = []
            else:
                piece.append(index)
        if piece:
            out.append(piece)
    return out


def reservation(state: SchedulerState, tenths: int) -> Reservation:
    """What to hold back so a request that does not fit now fits as soon as possible.

    A share reserves the device with the most free (the closest to fitting); n whole devices
    reserve, on the worker with the most free capacity that is wide enough, the n contiguous
    devices with the most free between them. The rest of that worker stays open to backfill.
    """
    if tenths < TENTHS_PER_GPU:
        for free in range(min(tenths, TENTHS_PER_GPU) - 1, -1, -1):
            for slot in state.capacity.slots_with_free(free):
                return Reservation(frozenset([slot]), frozenset())
        return NO_RESERVATION
    count = tenths // TENTHS_PER_GPU
    for worker_id in state.capacity.workers_by_free_sum():
        if state.capacity.span_of[worker_id] >= count:
            window = _best_window(state.workers[worker_id], count)
            return Reservation(frozenset((worker_id, i) for i in window), frozenset())
    return NO_RESERVATION


def _best_window(worker: WorkerState, count: int) -> list[int]:
    """The `count` contiguous device indexes with the most free tenths between them."""
    devices = sorted(worker.devices, key=lambda d: d.index)
    best: tuple[int, list[int]] | None = None
    for start in range(len(devices) - count + 1):
        window = devices[start : start + count]
        if all(b.index == a.index + 1 for a, b in zip(window, window[1:], strict=False)):
            free = sum(d.free for d in window)
            if best is None or free > best[0]:
                best = (free, [d.index for d in window])
    assert best is not None  # span_of >= count guarantees a window
    return best[1]


def fits_ever(state: SchedulerState, tenths: int) -> bool:
    """Whether the pool as it stands could hold the request if it were empty."""
    if tenths < TENTHS_PER_GPU:
        return state.has_live_workers()
    return state.capacity.widest_span() >= tenths // TENTHS_PER_GPU


def largest_pool_request(state: SchedulerState) -> str:
    """The largest amount one job could ever get here, as text (for error messages)."""
    return str(state.capacity.widest_span())


def largest_free_now(state: SchedulerState) -> int:
    """Tenths of the largest request that would fit right now."""
    run = state.capacity.longest_run()
    return run * TENTHS_PER_GPU if run else state.capacity.largest_free()
