"""Issue 11, finding 9 (the per-service half): snapshots of state, and finished jobs leave memory.

Every service kept every job in memory and replayed its whole SQLite log on start, for ever.
Now each service can snapshot its state (`snapshot`/`restore`, services/<svc>/snapshot.py)
and forget the jobs that ended more than `retention.forget_after_s` ago (`compact`); the
runtime snapshots every `retention.snapshot_events` events and drops the log rows before.

Pure tests drive the four real services together through `step` (a small world: the gateway,
the scheduler, worker w1's partitioner and runner, and a worker w2 played by the test), with
every event delivered to the services whose consumers' filters match its subject:

- restore(snapshot(state)) is the same state, field for field (a state class that gains a
  field the snapshot does not carry fails here, and the inventory test names it);
- compact() forgets exactly the jobs over long enough, and changes no answer about the rest;
- a world that compacts and restarts from its snapshots all the time takes exactly the same
  decisions as one that never does, also when late duplicates of forgotten jobs' events arrive;
- a late copy of every event of every forgotten job (placements included: the worker's
  services keep a small fence of them for a day) brings none of them back.

Against a bare nats-server: a forgotten job's view folds back from the JOBS stream exactly.
End to end: a real stack with snapshots every 50 events and forget_after_s 0 keeps its logs
short, and after a restart of every service still answers for the jobs it forgot.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sqlite3
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.js import JetStreamContext

from cumulus import AsyncClient
from cumulus_core.devices import Device
from cumulus_core.env import partition_env
from services.gateway import history
from services.gateway import snapshot as gateway_snapshot
from services.gateway.app import Gateway
from services.gateway.state import JobTable
from services.partitioner import handlers as partitioner_handlers
from services.partitioner import snapshot as partitioner_snapshot
from services.partitioner.app import Partitioner
from services.partitioner.state import PartitionerState
from services.partitioner.types import Partition
from services.runner import handlers as runner_handlers
from services.runner import snapshot as runner_snapshot
from services.runner import state as runner_state
from services.runner.app import Runner
from services.scheduler import snapshot as scheduler_snapshot
from services.scheduler.app import Scheduler
from services.scheduler.queue import JobQueue
from services.scheduler.state import SchedulerState
from services.stack import Proc, free_port, nats_server_binary
from shared import api, bus, subjects
from shared import events as ev
from shared.config import Config, RetentionConfig, WorkerConfig
from shared.errors import EventLogError, InvalidArgument, NotFound
from shared.service import EventService
from shared.views import TERMINAL
from tests.conftest import StackFactory

W1, W2 = "w1", "w2"
"""w1 runs the world's partitioner and runner; w2 is a worker the test plays itself."""
START = 1_000_000.0


# -- a small world of the four services ------------------------------------------------------


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, `>` the rest."""
    want, got = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(got) > i
        if i >= len(got) or token not in ("*", got[i]):
            return False
    return len(want) == len(got)


def subscribed(service: EventService[Any], subject: str) -> bool:
    return not service.ignore(subject) and any(
        matches(f, subject) for spec in service.consumers() for f in spec.filters
    )


class World:
    """The four services fed as their consumers would be, by one seeded source of chance."""

    def __init__(self, tmp: Path, seed: int, forget_after_s: float = 0.0) -> None:
        self.config = Config(
            data_dir=str(tmp),
            worker=WorkerConfig(id=W1, sandbox="none"),  # no self-test of bwrap per runner
            retention=RetentionConfig(forget_after_s=forget_after_s),
        )
        self.rng = random.Random(seed)
        self.clock = START
        self.next_id = 0
        self.gateway = Gateway(self.config)
        self.scheduler = Scheduler(self.config)
        self.partitioner = Partitioner(self.config)
        self.runner = Runner(self.config)
        self.trail: list[tuple[str, str, str, int]] = []
        """(event type, job id, worker, attempt) of every event, in order: the decisions."""
        self.late: list[ev.Event] = []
        """Events already delivered once, for late duplicates."""
        self.history: list[ev.JobEvent] = []
        """Every job event delivered."""
        self.noted: list[ev.Event] = []
        """Every event delivered, the very objects."""

    @property
    def services(self) -> list[EventService[Any]]:
        return [self.gateway, self.scheduler, self.partitioner, self.runner]

    def tick(self) -> float:
        self.clock += 1.0
        return self.clock

    def now(self) -> float:
        """A time after every event's: the world's own clock, or the services' (their own
        events carry the wall clock's time)."""
        return max(self.clock, time.time()) + 1.0

    # -- delivery ------------------------------------------------------------------------

    def publish(self, first: ev.Event, by: EventService[Any] | None = None) -> None:
        """`by` emits `first` (applies it and what it decides on it), then every event goes
        to every service whose consumers take its subject, in stream order."""
        pending: deque[ev.Event] = deque([first])
        if by is not None:
            pending.extend(by.step(first))
        while pending:
            event = pending.popleft()
            self._note(event)
            subject = bus.subject_of(event)
            for service in self.services:
                if subscribed(service, subject):
                    pending.extend(service.step(event))

    def _note(self, event: ev.Event) -> None:
        self.noted.append(event)
        if isinstance(event, ev.JobEvent):
            self.history.append(event)
        self.trail.append(
            (
                type(event).__name__,
                getattr(event, "job_id", ""),
                getattr(event, "worker_id", ""),
                getattr(event, "attempt", 0),
            )
        )
        if isinstance(event, ev.JobEvent) and self.rng.random() < 0.05:
            self.late.append(event)

    # -- the world's moves ---------------------------------------------------------------

    def register(self, worker_id: str, devices: int = 2) -> None:
        self.publish(
            ev.WorkerRegistered(
                worker_id=worker_id,
                hostname=worker_id,
                ts=self.tick(),
                devices=[
                    ev.DeviceInfo(index=i, name=f"GPU {i}", memory_bytes=16 << 30)
                    for i in range(devices)
                ],
            )
        )

    def submit(self) -> None:
        self.next_id += 1
        tenths = self.rng.choice([1, 2, 3, 5, 5, 10, 10, 20])
        self.publish(
            ev.JobSubmitted(
                job_id=f"j{self.next_id:05d}",
                user=f"u{self.next_id % 3}",
                ts=self.tick(),
                spec=ev.JobSpec(
                    code_ref="c" * 64,
                    gpu_tenths=tenths,
                    duration_s=600,
                    priority=self.rng.choice([0, 0, 1]),
                ),
            )
        )

    def cancel(self) -> None:
        active = sorted(
            j.job_id for j in self.gateway.state.jobs.values() if j.status not in TERMINAL
        )
        if active:
            job = self.gateway.state.jobs[self.rng.choice(active)]
            self.publish(ev.CancelRequested(job_id=job.job_id, user=job.user, ts=self.tick()))

    def partition_w1(self) -> None:
        """w1's partitioner makes or fails one wanted partition, or releases one."""
        state = self.partitioner.state[W1]
        work = partitioner_handlers.work(state, ())
        if work.releases:
            job = self.rng.choice(work.releases)
            event: ev.Event = partitioner_handlers.released(job, W1, job.partition_ids)
        elif work.creates:
            job = self.rng.choice(work.creates)
            if self.rng.random() < 0.15:
                event = partitioner_handlers.failed(job, W1, InvalidArgument("no room"))
            else:
                made = [_partition(job.label, d, job.tenths) for d in job.devices]
                event = partitioner_handlers.ready(job, W1, made)
        else:
            return
        self.publish(event, by=self.partitioner)

    def run_w1(self) -> None:
        """w1's runner starts, cancels or ends one job."""
        work = runner_handlers.work(self.runner.state, ())
        if work.cancel:
            job = self.rng.choice(work.cancel)
            self.publish(runner_handlers.cancelled(job, W1), by=self.runner)
        elif work.start:
            job = self.rng.choice(work.start)
            self.runner.apply(
                runner_state.Launching(job_id=job.job_id, attempt=job.attempt, nonce="n" * 32)
            )
            self.publish(runner_handlers.started(job, W1, "process", "1"), by=self.runner)
        elif work.watch:
            job = self.rng.choice(work.watch)
            self.runner.apply(
                runner_state.LogCursor(
                    job_id=job.job_id, seq=job.seq + 3, offsets={"stdout": 99}, sent_bytes=99
                )
            )
            if self.rng.random() < 0.7:
                self.publish(self._end(job.job_id, job.user, W1, job.attempt), by=self.runner)

    def _end(self, job_id: str, user: str, worker_id: str, attempt: int) -> ev.Event:
        common: dict[str, Any] = {
            "job_id": job_id,
            "user": user,
            "worker_id": worker_id,
            "attempt": attempt,
            "ts": self.tick(),
        }
        roll = self.rng.random()
        if roll < 0.7:
            return ev.JobCompleted(result=msgspec.Raw(b'{"ok": true, "value": 1}'), **common)
        if roll < 0.9:
            return ev.JobFailed(code="INTERNAL", message="the job raised", **common)
        return ev.JobTimedOut(message="too long", duration_s=600, **common)

    def play_w2(self) -> None:
        """Worker w2 (played here) moves one of its placed jobs one step on."""
        placed = sorted(
            (j for j in self.scheduler.state.jobs.values() if j.status == "placed"),
            key=lambda j: j.job_id,
        )
        mine = [j for j in placed if j.worker_id == W2]
        if not mine:
            return
        job = self.rng.choice(mine)
        common: dict[str, Any] = {"job_id": job.job_id, "user": job.user, "worker_id": W2}
        if not job.started:
            if self.rng.random() < 0.15:
                self.publish(
                    ev.PartitionFailed(
                        attempt=job.attempt, code="INTERNAL", message="no", ts=self.tick(), **common
                    )
                )
                return
            self.publish(
                ev.JobStarted(
                    backend="process", handle="2", attempt=job.attempt, ts=self.tick(), **common
                )
            )
        else:
            self.publish(self._end(job.job_id, job.user, W2, job.attempt))

    def lose_w2(self) -> None:
        worker = self.scheduler.state.workers.get(W2)
        if worker is not None and worker.alive:
            self.publish(
                ev.WorkerLost(worker_id=W2, reason="silent", ts=self.tick()), by=self.scheduler
            )
        else:
            self.register(W2, devices=3)

    def duplicate(self) -> None:
        """A late copy of an event delivered long ago (an outbox re-published too late)."""
        if self.late:
            event = self.rng.choice(self.late)
            # Not a submission: the gateway publishes `submitted` only for a job id the job
            # stream does not hold (a scheduler would take a copy for a new job).
            if not isinstance(event, ev.JobSubmitted):
                self.publish(event)

    def move(self) -> None:
        roll = self.rng.random()
        if roll < 0.25:
            self.submit()
        elif roll < 0.45:
            self.partition_w1()
        elif roll < 0.7:
            self.run_w1()
        elif roll < 0.88:
            self.play_w2()
        elif roll < 0.93:
            self.cancel()
        elif roll < 0.95:
            self.lose_w2()
        else:
            self.duplicate()

    def build(self, moves: int) -> World:
        self.register(W1)
        self.register(W2, devices=3)
        for _ in range(moves):
            self.move()
        return self

    # -- retention -----------------------------------------------------------------------

    def restart_all(self, compact_at: float | None = None) -> None:
        """Each service (compacted first, if `compact_at`) snapshotted and a fresh one
        restored from that snapshot, as the runtime's replay does."""
        if compact_at is not None:
            for service in self.services:
                service.compact(compact_at)
        self.gateway = _restored(self.gateway, Gateway(self.config))
        self.scheduler = _restored(self.scheduler, Scheduler(self.config))
        self.partitioner = _restored(self.partitioner, Partitioner(self.config))
        self.runner = _restored(self.runner, Runner(self.config))


def _restored(old: Any, new: Any) -> Any:
    data = old.snapshot()
    assert isinstance(data, bytes)
    new.restore(data)
    return new


def _partition(label: str, device: int, tenths: int) -> Partition:
    gpu = Device(device, f"GPU {device}", 16 << 30, "virtual", f"virtual-{device}")
    made = Partition(f"p-{label}-{device}", device, tenths, 1 << 30, 0.0, START + 10_000, label)
    return msgspec.structs.replace(made, env=partition_env(made, gpu))


# -- comparing states ------------------------------------------------------------------------


def view(obj: Any) -> Any:
    """A plain, comparable picture of a state object, field by field (every attribute of
    every plain object, every field of every struct). Empty entries of a mapping are left
    out, and the queue's heaps without the entries it already removed (lazily): indexes
    may keep those, and a rebuilt index does not."""
    if isinstance(obj, msgspec.Struct | str | int | float | bytes | msgspec.Raw) or obj is None:
        return obj
    if isinstance(obj, dict):
        return {k: view(v) for k, v in obj.items() if not _empty(v)}
    if isinstance(obj, list | tuple):
        return [view(v) for v in obj]
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    fields = dict(vars(obj))
    if isinstance(obj, PartitionerState):  # its index of live placements is pruned lazily
        fields["open"] = {job.job_id: job for job in PartitionerState.live(_copy_index(obj))}
    if isinstance(obj, JobQueue):
        fields["_classes"] = {
            cls: sorted(entry for entry in heap if entry[1] in obj)
            for cls, heap in obj._classes.items()
        }
    return (type(obj).__name__, {k: view(v) for k, v in fields.items()})


def _copy_index(state: PartitionerState) -> PartitionerState:
    """`state` with a copy of its live index, so that viewing it prunes nothing of the real one."""
    copy = object.__new__(PartitionerState)
    copy.jobs, copy.open = state.jobs, dict(state.open)
    return copy


def _empty(value: Any) -> bool:
    return isinstance(value, dict | list | set | tuple) and not value


def states(world: World) -> dict[str, Any]:
    return {
        "gateway": view(world.gateway.state),
        "scheduler": view(world.scheduler.state),
        "partitioner": view(world.partitioner.state),
        "runner": view(world.runner.state),
    }


def answers(world: World) -> dict[str, Any]:
    """What the services answer and decide from, less the jobs over (which may be gone)."""
    table = world.gateway.state
    part = partitioner_handlers.work(world.partitioner.state[W1], ())
    run = runner_handlers.work(world.runner.state, ())
    return {
        "allocation": world.scheduler.state.allocation(),
        "positions": {
            j: world.scheduler.state.queue.position(j)
            for j in world.scheduler.state.queue.ordered()
        },
        "held": {u: world.scheduler.state.held_by(u) for u in ("u0", "u1", "u2")},
        "capacity": view(world.scheduler.state.capacity),
        "waiting": {u: table.waiting(u) for u in ("u0", "u1", "u2")},
        "active jobs": {
            job_id: _no_clocks(job)
            for job_id, job in table.jobs.items()
            if job.status not in TERMINAL
        },
        "partitioner": (
            [j.job_id for j in part.releases],
            [j.job_id for j in part.creates],
        ),
        "runner": ([j.job_id for j in run.cancel], [j.job_id for j in run.start]),
        "runner watches": [j.job_id for j in run.watch],
    }


def _no_clocks(job: Any) -> dict[str, Any]:
    """A job view without its times (the scheduler stamps its own events with the clock)."""
    out = msgspec.json.decode(msgspec.json.encode(job))
    return {k: v for k, v in out.items() if not k.endswith("_at") and k != "waiting_reason"}


# -- pure tests ------------------------------------------------------------------------------

CARRIED: dict[type, set[str]] = {
    JobTable: {"jobs", "_waiting", "epoch"},
    SchedulerState: {"workers", "jobs", "queue", "capacity", "submitted", "placed", "epoch", "led"},
    PartitionerState: {"worker_id", "jobs", "older", "epoch", "open"},  # open: rebuilt
    runner_state.RunnerState: {"worker_id", "jobs", "cancelled_early", "discarding", "epoch"},
}
"""Each state class's attributes, every one stored in its snapshot or rebuilt from what is."""


def test_every_state_field_is_carried_by_its_snapshot(tmp_path: Path) -> None:
    world = World(tmp_path, seed=0)
    found = {
        JobTable: world.gateway.state,
        SchedulerState: world.scheduler.state,
        PartitionerState: world.partitioner.state[W1],
        runner_state.RunnerState: world.runner.state,
    }
    for cls, state in found.items():
        new = set(vars(state)) - CARRIED[cls]
        assert not new, (
            f"{cls.__name__} has fields {sorted(new)} that its services/<svc>/snapshot.py "
            "does not store or rebuild: add them there (and here)"
        )
        assert set(vars(state)) == CARRIED[cls]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_restored_snapshot_is_the_same_state(tmp_path: Path, seed: int) -> None:
    world = World(tmp_path, seed, forget_after_s=1e9).build(900)
    assert len(world.trail) > 800
    for service in world.services:
        service.compact(world.clock)  # notes when each job over was first found so
    before, said = states(world), answers(world)
    notes = (world.scheduler.ended, world.partitioner.ended, world.runner.ended)
    assert all(notes)
    assert world.scheduler.state.queue.ordered(), "a queue to restore"
    world.restart_all()
    assert states(world) == before
    assert answers(world) == said
    assert (world.scheduler.ended, world.partitioner.ended, world.runner.ended) == notes


def _over(world: World) -> dict[str, set[str]]:
    """The ids of the jobs over, per service (as each service's state says)."""
    return {
        "scheduler": {j.job_id for j in world.scheduler.state.jobs.values() if j.status == "done"},
        "partitioner": {
            j.job_id
            for j in world.partitioner.state[W1].jobs.values()
            if j.status in partitioner_snapshot.DONE
        },
        "runner": {j.job_id for j in world.runner.state.jobs.values() if j.status == "done"},
    }


def _held(world: World) -> dict[str, set[str]]:
    """The ids of the jobs each service holds whole (not as a fence: the worker's services
    keep a forgotten job's ids for FENCE_KEEP_S, see _fences)."""
    return {
        "scheduler": set(world.scheduler.state.jobs),
        "partitioner": {
            j.job_id
            for j in world.partitioner.state[W1].jobs.values()
            if j.spec is not partitioner_snapshot.NO_SPEC
        },
        "runner": {
            j.job_id
            for j in world.runner.state.jobs.values()
            if j.spec is not runner_snapshot.NO_SPEC
        },
    }


def _fences(world: World) -> dict[str, set[str]]:
    return {
        "partitioner": set(world.partitioner.state[W1].jobs) - _held(world)["partitioner"],
        "runner": set(world.runner.state.jobs) - _held(world)["runner"],
    }


def _compact(world: World, now: float) -> None:
    said = answers(world)
    for service in world.services:
        service.compact(now)
    assert answers(world) == said, "a compaction changed an answer about jobs not over"


def _compact_gateway(world: World, now: float, after: float) -> None:
    """The gateway forgets exactly the jobs that ended `after` before `now` (by their end)."""
    table = world.gateway.state
    old = {
        j.job_id
        for j in table.jobs.values()
        if j.status in TERMINAL and (j.finished_at or 0) < now - after
    }
    held = set(table.jobs)
    _compact(world, now)
    assert set(table.jobs) == held - old


def test_compact_forgets_exactly_the_jobs_over_long_enough(tmp_path: Path) -> None:
    after = 100.0
    world = World(tmp_path, seed=4, forget_after_s=after).build(500)
    table = world.gateway.state
    first = world.clock
    ended = [j.finished_at or 0 for j in table.jobs.values() if j.status in TERMINAL]
    assert min(ended) < first - after < max(ended), "jobs ended long ago and lately"
    over_then, held = _over(world), _held(world)
    assert all(over_then.values())

    _compact_gateway(world, first, after)
    assert len(table.jobs) < len(held["scheduler"])
    assert _held(world) == held  # the others: first found over now, kept for `after`

    world.build(300)
    over_now, held = _over(world), _held(world)
    _compact_gateway(world, first + after - 1, after)
    assert _held(world) == held, "nothing over for `after` yet"

    _compact_gateway(world, first + after, after)
    for name, ids in _held(world).items():
        assert ids == held[name] - over_then[name], name
        assert over_now[name] - over_then[name] <= ids, name
    # The worker's forgotten jobs stay as fences (ids and attempt) for FENCE_KEEP_S more.
    fences = _fences(world)
    assert fences["partitioner"] >= over_then["partitioner"]
    assert fences["runner"] >= over_then["runner"]
    _compact(world, first + after + partitioner_snapshot.FENCE_KEEP_S - 1)
    assert _fences(world)["partitioner"] >= over_then["partitioner"]
    _compact(world, first + after + partitioner_snapshot.FENCE_KEEP_S)
    assert not _fences(world)["partitioner"] & over_then["partitioner"]
    assert not _fences(world)["runner"] & over_then["runner"]


@pytest.mark.parametrize("seed", [5, 6])
def test_compacting_and_restarting_from_snapshots_changes_no_decision(
    tmp_path: Path, seed: int
) -> None:
    """One world snapshots (forgetting every job over) and restarts every 40 moves; its twin
    never does. They take the same decisions, event for event, late duplicates included."""
    lean = World(tmp_path / "lean", seed, forget_after_s=0.0).build(0)
    full = World(tmp_path / "full", seed, forget_after_s=0.0).build(0)
    for round_ in range(40):
        for world in (lean, full):
            for _ in range(40):
                world.move()
        lean.restart_all(compact_at=lean.now())
        assert lean.trail == full.trail, f"round {round_}"
        assert answers(lean) == answers(full), f"round {round_}"
    assert len(lean.trail) > 1200
    # Right after its restart the lean world holds no job over, the full one scores.
    for name, ids in _held(lean).items():
        assert not ids & _over(lean)[name], name
        assert len(_over(full)[name]) > 50, name
    assert not [j for j in lean.gateway.state.jobs.values() if j.status in TERMINAL]
    assert len(lean.scheduler.snapshot() or b"") < len(full.scheduler.snapshot() or b"") * 0.6


def test_late_copies_of_a_forgotten_jobs_events_bring_nothing_back(tmp_path: Path) -> None:
    """Every event of every forgotten job delivered again (an outbox re-published after the
    duplicate window, say): no service decides anything about those jobs nor holds them
    again, and every decision is the one a twin world that forgot nothing takes."""
    lean = World(tmp_path / "lean", seed=7).build(600)
    full = World(tmp_path / "full", seed=7).build(600)
    over = set().union(*_over(lean).values())
    lean.restart_all(compact_at=lean.now())
    gone = over - set().union(*_held(lean).values())
    assert len(gone) > 20
    again = [
        i
        for i, e in enumerate(lean.history)
        if e.job_id in gone and not isinstance(e, ev.JobSubmitted)  # see World.duplicate
    ]
    kinds = {type(lean.history[i]) for i in again}
    assert kinds >= {ev.WorkerSelected, ev.PartitionReady, ev.JobStarted, ev.JobCompleted}
    before = len(lean.noted)
    for world in (lean, full):
        for i in again:
            world.publish(world.history[i])
    assert lean.trail == full.trail
    assert answers(lean) == answers(full)
    copies = [lean.history[i] for i in again]
    decided = [e for e in lean.noted[before:] if all(e is not c for c in copies)]
    assert not [e for e in decided if getattr(e, "job_id", "") in gone]
    assert not gone & set().union(*_held(lean).values()), "a forgotten job came back"
    assert not gone & set(lean.gateway.state.jobs)


def test_a_snapshot_reader_takes_added_fields_and_refuses_a_foreign_one(tmp_path: Path) -> None:
    world = World(tmp_path, seed=8).build(200)
    for service, fresh in (
        (world.gateway, Gateway(world.config)),
        (world.scheduler, Scheduler(world.config)),
        (world.partitioner, Partitioner(world.config)),
        (world.runner, Runner(world.config)),
    ):
        data = service.snapshot()
        assert data is not None
        assert data.endswith(b"}")
        fresh.restore(data[:-1] + b',"added_later":{"x":1}}')  # a later v1 may add fields
        assert view(fresh.state) == view(service.state)
        with pytest.raises(EventLogError, match="snapshot cannot be read"):
            fresh.restore(b'{"type": "cumulus.gateway.snapshot.v9"}')
    other = Runner(
        Config(data_dir=world.config.data_dir, worker=WorkerConfig(id="w9", sandbox="none"))
    )
    with pytest.raises(EventLogError, match="give each worker its own data directory"):
        other.restore(world.runner.snapshot() or b"")
    assert gateway_snapshot.decode(gateway_snapshot.encode(JobTable())).jobs == {}
    state, ended = scheduler_snapshot.decode(scheduler_snapshot.encode(SchedulerState(), {}))
    assert (state.jobs, ended) == ({}, {})
    assert (
        runner_snapshot.decode(runner_snapshot.encode(runner_state.RunnerState(W1), {}), W1)[0].jobs
        == {}
    )


# -- a forgotten job, answered from the job stream -------------------------------------------


@pytest.fixture(scope="module")
async def js(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[JetStreamContext]:
    """A bare nats-server with the streams: the history fold needs nothing else."""
    folder = tmp_path_factory.mktemp("nats")
    port = free_port()
    store = str(folder / "store")
    proc = Proc(
        "nats",
        [nats_server_binary(), "-js", "-sd", store, "-a", "127.0.0.1", "-p", str(port)],
        dict(os.environ),
        folder / "nats.log",
    )
    proc.start()
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                await writer.wait_closed()
                break
            except OSError:
                if time.monotonic() > deadline or not proc.alive():
                    raise
                await asyncio.sleep(0.05)
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        try:
            stream = nc.jetstream()
            await stream.add_stream(name=subjects.JOBS_STREAM, subjects=["jobs.>"])
            yield stream
        finally:
            await nc.close()
    finally:
        proc.stop()


def _life(user: str, job_id: str) -> list[ev.Event]:
    """A job placed twice (its first partition failed), run on w2 and completed."""
    spec = ev.JobSpec(code_ref="c" * 64, gpu_tenths=5, duration_s=600)
    common: dict[str, Any] = {"job_id": job_id, "user": user}
    ready: dict[str, Any] = {
        "spec": spec,
        "partition_ids": ["p1"],
        "devices": [0],
        "env": {},
        "expires_at": 1.0,
    }
    return [
        ev.JobSubmitted(spec=spec, **common),
        ev.JobQueued(position=1, reason="waiting", **common),
        ev.WorkerSelected(worker_id=W1, spec=spec, devices=[0], tenths=5, attempt=1, **common),
        ev.PartitionFailed(worker_id=W1, attempt=1, code="INTERNAL", message="no", **common),
        ev.WorkerSelected(worker_id=W2, spec=spec, devices=[1], tenths=5, attempt=2, **common),
        ev.PartitionReady(worker_id=W2, attempt=2, **ready, **common),
        ev.JobStarted(worker_id=W2, backend="process", handle="7", attempt=2, **common),
        ev.JobCompleted(worker_id=W2, result=msgspec.Raw(b'{"ok": true, "value": 3}'), **common),
        ev.PartitionReleased(worker_id=W2, attempt=2, partition_ids=["p1"], **common),
        ev.CancelRequested(**common),  # late: changes a flag, not the end
    ]


async def test_a_forgotten_job_is_folded_back_from_the_job_stream(js: JetStreamContext) -> None:
    life = _life("alice", "jfold1")
    for event in life:
        await bus.publish(js, event)
    # What the gateway held before it forgot the job is what the stream gives back.
    table = JobTable()
    for event in life:
        table.apply(event)
    held = table.get("jfold1")
    assert held is not None
    assert held.status == "COMPLETED"
    began = time.monotonic()
    found = await history.job_from_stream(js, "jfold1", "alice")
    assert time.monotonic() - began < 1.0
    assert found == held
    assert (found.worker_id, found.attempt, found.devices) == (W2, 2, [1])
    assert await history.job_from_stream(js, "jfold1") == held  # any user: a resubmission
    assert await history.job_from_stream(js, "jfold1", "bob") is None  # not bob's
    assert await history.job_from_stream(js, "jnever", "alice") is None
    assert await history.job_from_stream(js, "bad id!", "alice") is None
    # An event whose body disagrees with its subject is not believed, here either.
    forged = ev.JobFailed(job_id="jother", user="alice", worker_id=W2, code="X", message="x")
    for event in _life("alice", "jfold2")[:7]:
        await bus.publish(js, event)
    await js.publish("jobs.alice.jfold2.w2.failed", ev.encode(forged))
    running = await history.job_from_stream(js, "jfold2", "alice")
    assert running is not None
    assert running.status == "RUNNING"


# -- end to end ------------------------------------------------------------------------------

SNAPSHOT_EVENTS = 50
JOBS = 100


def add(a: int, b: int) -> int:
    return a + b


SERVICES = ("gateway", "scheduler", f"partitioner-{W1}", f"runner-{W1}")
"""The stack's processes, named as their SQLite files are."""


def _log_rows(data_dir: Path) -> dict[str, tuple[int, int]]:
    """Each service's SQLite file: (rows in its log, snapshots it holds)."""
    out = {}
    for name in SERVICES:
        with contextlib.closing(sqlite3.connect(data_dir / f"{name}.sqlite")) as db:
            rows = db.execute("SELECT count(*) FROM log").fetchone()[0]
            snaps = db.execute("SELECT count(*) FROM snapshot").fetchone()[0]
        out[name] = (rows, snaps)
    return out


async def _run_all(client: AsyncClient, count: int) -> list[str]:
    gate = asyncio.Semaphore(16)

    async def one(i: int) -> str:
        async with gate:
            job = await client.submit(add, i, 1, gpu=0.1, duration=60)
            assert await job.result(timeout=120) == i + 1
            return job.job_id

    return list(await asyncio.gather(*(one(i) for i in range(count))))


@pytest.mark.slow
async def test_a_stack_keeps_its_logs_short_and_answers_for_forgotten_jobs(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(
        workers=[W1],
        env={
            "CUMULUS_RETENTION_SNAPSHOT_EVENTS": str(SNAPSHOT_EVENTS),
            "CUMULUS_RETENTION_FORGET_AFTER_S": "0",
        },
    )
    async with AsyncClient(profile=stack.profile()) as client:
        done = await _run_all(client, JOBS)
        for name, (count, snaps) in _log_rows(stack.data_dir).items():
            assert count < 2 * SNAPSHOT_EVENTS, f"{name}'s log holds {count} rows"
            assert snaps == 1, name
        # The gateway forgot most of them already (each at its next snapshot).
        assert (await client.health()).jobs < JOBS / 2
        listed = {j.job_id for j in await client.jobs(limit=1000)}
        assert len(listed) < JOBS / 2  # ListJobs: the jobs in memory

    for name in SERVICES:
        stack.restart(name)
    await stack.wait_ready(60)

    async with AsyncClient(profile=stack.profile()) as client:
        for job_id in done[:3] + done[-3:]:
            info = await client.get_job(job_id).status()
            assert (info.status, info.worker_id) == ("COMPLETED", W1), job_id
            assert (await client.get_job(job_id).cancel()).status == "COMPLETED"
            assert await client.get_job(job_id).result(timeout=30) in range(1, JOBS + 1)
        with pytest.raises(NotFound):
            await client.get_job("jnever-was").status()
        # A repeated submit of a forgotten job's id answers for that job; it runs no more.
        again = await client.submit_call(add, (0, 0), job_id=done[0], gpu=0.1, duration=60)
        assert (await again.status()).status == "COMPLETED"
        assert await client.run(add, 20, 22, gpu=0.1, duration=60, timeout=120) == 42

    nc = await stack.connect()
    try:
        state = await api.request(nc, "cumulus.scheduler.state", {}, dict, timeout=5)
        allocation = state["allocation"]
        assert allocation["placements"] == {}
        assert allocation["queue"] == []
        assert all(
            not held for d in allocation["workers"][W1]["devices"].values() for held in d.values()
        )
        stream = await nc.jetstream().stream_info(
            subjects.JOBS_STREAM, subjects_filter=f"jobs.*.{done[0]}.*.submitted"
        )
        assert stream.state.subjects is not None
        assert sum(stream.state.subjects.values()) == 1, "submitted twice"
    finally:
        await nc.close()
