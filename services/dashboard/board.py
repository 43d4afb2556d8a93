"""What the dashboard shows, read through the gateway's API as the user (the SDK's client).

The board keeps the user's jobs and the workers as JSON snapshots and hands each new one to
every open page. It learns that something changed from a watch of the user's job history
(`jobs.<user>.>`, from the newest event on: `after_last`), the same subjects `cumulus events`
shows; each event asks for fresh snapshots. A refresh every REFRESH_S catches what an event does
not say (queue positions, the workers' shares) and a watch that had to start again.

A selected job's history and output come from the job's own replay (`AsyncJob.events`): from
its first event, then live until its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import Any

import msgspec

from cumulus import AsyncClient
from cumulus._jobs import Cursor, deliver_to, replay
from shared import events as ev
from shared import subjects
from shared.errors import CumulusError

log = logging.getLogger("cumulus.dashboard")

REFRESH_S = 2.0
"""Seconds between two refreshes when no event asks for one."""
MIN_GAP_S = 0.2
"""The least time between two refreshes: a burst of events makes one refresh, not many."""
JOBS_SHOWN = 200
"""The newest jobs the page lists."""
DETAIL_FIELDS = (
    "position",
    "reason",
    "devices",
    "tenths",
    "attempt",
    "partition_ids",
    "backend",
    "code",
    "message",
    "runtime_s",
    "duration_s",
)
"""Fields of a job event shown in its history line (never its result, environment or trace)."""


class Page:
    """One open page's stream: the newest snapshot of each kind not yet sent. A slow page
    skips snapshots it had no time for; it never makes the board wait or keep a backlog."""

    def __init__(self) -> None:
        self.pending: dict[str, bytes] = {}
        self.ready = asyncio.Event()

    def put(self, kind: str, data: bytes) -> None:
        self.pending[kind] = data
        self.ready.set()

    async def take(self, timeout: float) -> dict[str, bytes]:
        """What arrived since the last take ({} after `timeout` seconds of nothing)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.ready.wait(), timeout)
        self.ready.clear()
        out, self.pending = self.pending, {}
        return out


class Board:
    """The snapshots (`jobs`, `workers`, `status`) and the pages that receive them."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.snapshots: dict[str, bytes] = {}
        self.pages: set[Page] = set()
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.refresh()
        self._tasks = [
            asyncio.create_task(self._refreshing(), name="dashboard-refresh"),
            asyncio.create_task(self._watching(), name="dashboard-watch"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def open_page(self) -> Page:
        page = Page()
        for kind, data in self.snapshots.items():
            page.put(kind, data)
        self.pages.add(page)
        return page

    def close_page(self, page: Page) -> None:
        self.pages.discard(page)

    def _publish(self, kind: str, value: Any) -> None:
        data = msgspec.json.encode(value)
        if self.snapshots.get(kind) == data:
            return
        self.snapshots[kind] = data
        for page in self.pages:
            page.put(kind, data)

    async def refresh(self) -> None:
        """Ask the gateway for the user's jobs and the workers; publish what changed."""
        try:
            jobs = await self.client.jobs(limit=JOBS_SHOWN)
            listing = await self.client.worker_list()
        except CumulusError as exc:
            self._publish("status", {"ok": False, "message": f"{exc.code}: {exc.message}"})
            return
        self._publish("jobs", [_job(job) for job in jobs])
        self._publish("workers", listing)
        self._publish("status", {"ok": True, "message": "", "user": self.client.user})

    async def _refreshing(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), REFRESH_S)
            self._dirty.clear()
            try:
                await self.refresh()
            except Exception:  # the next round tries again; the page says what went wrong
                log.exception("dashboard refresh failed")
            await asyncio.sleep(MIN_GAP_S)

    async def _watching(self) -> None:
        """Every new event of the user's jobs asks for a refresh; a watch that fails starts
        again (the periodic refresh covers the time in between)."""
        while True:
            try:
                async with contextlib.aclosing(self._events()) as items:
                    async for _ in items:
                        self._dirty.set()
            except Exception as exc:
                log.info("dashboard watch starts again: %r", exc)
            await asyncio.sleep(1.0)

    async def _events(self) -> AsyncGenerator[object, None]:
        creds = self.client.credentials
        role = creds.role if creds is not None else "user"
        if role == "user":
            op, subject = "watch", f"jobs.{self.client.user}.>"
        else:
            op, subject = f"{subjects.OBSERVE_PREFIX}.watch", "jobs.>"
        began: dict[str, int] = {}

        async def start(inbox: str, last: Cursor) -> Cursor:
            body: dict[str, Any] = {
                "filter": subject,
                "deliver": deliver_to(inbox, subjects.JOBS_STREAM),
            }
            if began:
                body["from_seq"] = max(last.get(subjects.JOBS_STREAM, 0), began["seq"]) + 1
            else:
                body["after_last"] = True
            reply = await self.client.request(op, body)
            began.setdefault("seq", int(reply.get("last_seq", 0)))
            return {subjects.JOBS_STREAM: int(reply.get("last_seq", 0))}

        events = replay(self.client.nc, start, [subjects.JOBS_STREAM])
        async with contextlib.aclosing(events) as items:
            async for item in items:
                if item is not None:
                    yield item


def _job(job: Any) -> dict[str, Any]:
    out = msgspec.structs.asdict(job)
    out.pop("result", None)  # may be large; the page shows state, not values
    return out


def _share(tenths: int) -> str:
    """Tenths of a GPU as the decimal users write: 3 -> "0.3", 20 -> "2"."""
    whole, rest = divmod(tenths, 10)
    return f"{whole}.{rest}" if rest else str(whole)


def event_json(event: ev.AnyJobEvent) -> dict[str, Any]:
    """A job event as the page shows it: its name, time, worker and a few details."""
    if isinstance(event, ev.JobLog):
        # a partial line (a progress bar as it stands) is left out: its complete line follows
        lines = [] if event.partial else [[x.stream, x.text] for x in event.lines]
        return {"kind": "log", "seq": event.seq, "lines": lines}
    details = {f: getattr(event, f) for f in DETAIL_FIELDS if hasattr(event, f)}
    if isinstance(event, ev.JobSubmitted):
        details.update(gpu=_share(event.spec.gpu_tenths), duration_s=event.spec.duration_s)
    if "tenths" in details:
        details["share"] = _share(details.pop("tenths"))
    if "runtime_s" in details:
        details["runtime_s"] = round(details["runtime_s"], 2)
    return {
        "kind": "event",
        "name": event.name,
        "ts": event.ts,
        "worker_id": event.worker_id,
        "details": details,
    }


async def job_stream(client: AsyncClient, job_id: str) -> AsyncGenerator[dict[str, Any], None]:
    """A job's events and output lines from its first, live until its end."""
    async with contextlib.aclosing(client.get_job(job_id).events(follow=True)) as events:
        async for event in events:
            yield event_json(event)
