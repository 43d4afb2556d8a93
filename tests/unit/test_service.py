"""The EventService runtime's public surface, without a bus: step, emit, reading, spawn, stop."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from shared import config as config_mod
from shared import events as ev
from shared.eventlog import EventLog, read_log
from shared.service import EventService


class Toy(EventService[list[str]]):
    """Registered w -> heartbeat w, lost w; heartbeat w -> lost w-hb. Records what it applied."""

    name = "toy"

    def new_state(self) -> list[str]:
        return []

    def apply(self, event: Any) -> None:
        self.state.append(f"{event.name}:{event.worker_id}")

    def decide(self, event: Any) -> list[ev.Event]:
        if isinstance(event, ev.WorkerRegistered):
            return [
                ev.WorkerHeartbeat(worker_id=event.worker_id),
                ev.WorkerLost(worker_id=event.worker_id, reason="r"),
            ]
        if isinstance(event, ev.WorkerHeartbeat):
            return [ev.WorkerLost(worker_id=f"{event.worker_id}-hb", reason="r")]
        return []


def toy(tmp_path: Path) -> Toy:
    return Toy(config_mod.load(environ={"CUMULUS_DATA_DIR": str(tmp_path)}))


def registered(worker_id: str) -> ev.WorkerRegistered:
    return ev.WorkerRegistered(worker_id=worker_id, hostname=worker_id, devices=[])


def test_the_state_comes_from_new_state(tmp_path: Path) -> None:
    assert toy(tmp_path).state == []


def test_step_applies_and_returns_the_decisions_depth_first(tmp_path: Path) -> None:
    service = toy(tmp_path)
    out = service.step(registered("w"))
    assert [f"{e.name}:{e.worker_id}" for e in out] == ["heartbeat:w", "lost:w-hb", "lost:w"]
    # Each decision was applied before the next was taken, and nothing was written.
    assert service.state == ["registered:w", "heartbeat:w", "lost:w-hb", "lost:w"]
    assert service.position == 0
    assert not service.db_path.exists()


async def test_emit_logs_what_step_would_and_waits_for_readers(tmp_path: Path) -> None:
    service = toy(tmp_path)
    service.eventlog = await EventLog.open(service.db_path)
    try:
        async with service.reading() as state:
            emitting = asyncio.create_task(service.emit([ev.WorkerHeartbeat(worker_id="w")]))
            await asyncio.sleep(0.05)
            assert state == []  # the emit waits for the reader
        await asyncio.wait_for(emitting, 5)
        assert service.state == ["heartbeat:w", "lost:w-hb"]
        assert service.position == 2
    finally:
        await service.eventlog.close()
    assert [ev.decode(data).name for _, data in read_log(service.db_path)] == ["heartbeat", "lost"]


async def test_spawned_tasks_are_named_logged_when_they_fail_and_cancelled_at_stop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    service = toy(tmp_path)

    async def fail() -> None:
        raise RuntimeError("boom")

    forever = service.spawn(asyncio.sleep(3600), name="timer")
    failing = service.spawn(fail(), name="effect")
    assert forever.get_name() == "toy-timer"
    with caplog.at_level(logging.ERROR, logger="shared.service"):
        await asyncio.gather(failing, return_exceptions=True)
        await asyncio.sleep(0)
    assert any(
        r.message == "background task failed" and r.fields["task"] == "toy-effect"  # type: ignore[attr-defined]
        for r in caplog.records
    )
    await asyncio.wait_for(service.stop(), 15)
    assert forever.cancelled()
