"""How `cumulus` shows things: tables of jobs and workers, a job's status, one line per event.

Everything rendered here is typed (`JobInfo`, `WorkerList`, `shared.events` structs), so a
renamed field is a type error, not a silently empty column.
"""

from __future__ import annotations

import json
import sys
import time
from functools import singledispatch
from typing import TYPE_CHECKING, Any

import msgspec

from shared import events as ev
from shared.errors import MalformedEvent
from shared.views import JobInfo, JobStatus, WorkerList

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

STYLES = {
    "submitted": "cyan",
    "queued": "yellow",
    "scheduled": "blue",
    "partition_ready": "blue",
    "partition_failed": "red",
    "started": "green",
    "completed": "bold green",
    "failed": "bold red",
    "attempt_failed": "red",
    "timed_out": "bold red",
    "cancelled": "bold yellow",
    "cancel_requested": "yellow",
    "partition_released": "dim",
    "log": "dim",
}
"""The colour of each event name in `cumulus events`."""

STATUS_STYLES = {
    JobStatus.COMPLETED: "green",
    JobStatus.FAILED: "red",
    JobStatus.TIMED_OUT: "red",
    JobStatus.CANCELLED: "yellow",
    JobStatus.RUNNING: "bold",
    JobStatus.QUEUED: "yellow",
}


def console(stderr: bool = False) -> Console:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    # Piped output keeps whole rows (no wrapping at 80 columns) and no colour codes.
    return Console(file=stream, width=None if tty else 200, highlight=False, soft_wrap=not tty)


def dump(value: Any) -> None:
    """Print a struct (or plain data) as indented JSON, as the API sent it."""
    data = json.loads(msgspec.json.encode(value))
    print(json.dumps(data, indent=2, default=str), flush=True)


def show_value(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def age(ts: float | None) -> str:
    if not ts:
        return "-"
    seconds = max(0.0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def runtime(job: JobInfo) -> str:
    if not job.started_at:
        return "-"
    return f"{(job.finished_at or time.time()) - job.started_at:.1f}s"


def styled_status(status: JobStatus) -> str:
    return f"[{STATUS_STYLES.get(status, 'cyan')}]{status}[/]"


def table(*columns: str) -> Table:
    from rich import box
    from rich.table import Table

    grid = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in columns:
        grid.add_column(column, no_wrap=column != "NOTE", overflow="fold")
    return grid


def print_jobs(jobs: list[JobInfo]) -> None:
    rows = table("JOB", "NAME", "STATUS", "GPU", "TARGET", "WORKER", "AGE", "RUNTIME", "NOTE")
    for job in jobs:
        note = job.waiting_reason
        if job.error_code:
            note = f"{job.error_code}: {job.error_message}"
        if job.tags:
            note = " ".join([*(f"{k}={v}" for k, v in job.tags.items()), note]).strip()
        rows.add_row(
            job.job_id,
            job.name or "-",
            styled_status(job.status),
            job.gpu,
            job.target or job.entrypoint or "-",
            job.worker_id or "-",
            age(job.submitted_at),
            runtime(job),
            note,
        )
    console().print(rows)
    if not jobs:
        print("no jobs")


def print_workers(listing: WorkerList) -> None:
    rows = table("WORKER", "STATUS", "BACKEND", "GPU", "DEVICE", "ALLOCATED", "FREE", "JOBS")
    for worker in listing.workers:
        first = (worker.worker_id, worker.status, worker.backend)
        if not worker.devices:
            rows.add_row(*first, "-", "-", "-", "-", "-")
        for i, d in enumerate(worker.devices):
            jobs = ", ".join(f"{j}={a}" for j, a in d.jobs.items()) or "-"
            rows.add_row(
                *(first if i == 0 else ("", "", "")),
                str(d.index),
                f"{d.name} [{d.kind}]",
                d.allocated,
                d.free,
                jobs,
            )
    console().print(rows)
    print(f"{len(listing.workers)} worker(s); {listing.queued} job(s) queued")


def print_status(job: JobInfo) -> None:
    from rich.table import Table

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    fields: list[tuple[str, object]] = [
        ("job", job.job_id),
        *([("name", job.name)] if job.name else []),
        *([("tags", " ".join(f"{k}={v}" for k, v in job.tags.items()))] if job.tags else []),
        *([("target", job.target)] if job.target else []),
        *(
            [("attempts", f"{job.failed_attempts} failed of {job.retries + 1} allowed")]
            if job.retries
            else []
        ),
        ("status", styled_status(job.status)),
        ("gpu", job.gpu),
        ("duration", f"{job.duration_s} s"),
        ("worker", job.worker_id or "-"),
        ("devices", ", ".join(map(str, job.devices)) or "-"),
        ("partitions", ", ".join(job.partition_ids) or "-"),
        ("submitted", age(job.submitted_at)),
        ("runtime", runtime(job)),
    ]
    if job.queue_position is not None:
        fields.append(("queue position", job.queue_position))
    if job.waiting_reason:  # it says what it waits for ("waiting for 1 GPU; …")
        fields.append(("reason", job.waiting_reason))
    if job.error_code:
        fields.append(("error", f"{job.error_code}: {job.error_message}"))
    if job.cancel_requested and not job.status.is_terminal:
        fields.append(("cancel", "requested"))
    for key, value in fields:
        grid.add_row(key, str(value))
    console().print(grid)


# -- events -----------------------------------------------------------------------------------


def _first_line(text: str) -> str:
    return text.split("\n", 1)[0]


_SKIP = frozenset({"event_id", "ts", "trace", "job_id", "user", "worker_id"})


@singledispatch
def describe(event: ev.Event) -> str:
    """One readable line for an event (a log event's lines are shown after it)."""
    fields = msgspec.structs.asdict(event)
    return ", ".join(f"{k}={v}" for k, v in fields.items() if k not in _SKIP)


@describe.register
def _(event: ev.JobSubmitted) -> str:
    spec = event.spec
    text = f"gpu {spec.gpu_tenths / 10:g}, {spec.duration_s} s, {spec.entrypoint}"
    return text + (f", requirements {spec.requirements}" if spec.requirements else "")


@describe.register
def _(event: ev.JobQueued) -> str:
    return f"position {event.position}: {event.reason}"


@describe.register
def _(event: ev.WorkerSelected) -> str:
    return f"{event.tenths / 10:g} of gpu {event.devices} (attempt {event.attempt})"


@describe.register
def _(event: ev.PartitionReady | ev.PartitionReleased) -> str:
    return f"partitions {', '.join(event.partition_ids)}"


@describe.register
def _(event: ev.PartitionFailed | ev.JobFailed | ev.JobTimedOut) -> str:
    return f"{event.code}: {_first_line(event.message)}"


@describe.register
def _(event: ev.JobStarted) -> str:
    return f"{event.backend} {event.handle}"


@describe.register
def _(event: ev.JobAttemptFailed) -> str:
    return f"attempt {event.attempt}: {event.code}: {_first_line(event.message)}"


@describe.register
def _(event: ev.JobLog) -> str:
    return f"{len(event.lines)} line(s) from #{event.seq}"


@describe.register
def _(event: ev.JobCompleted) -> str:
    return f"in {event.runtime_s:.2f} s"


@describe.register
def _(event: ev.JobCancelled) -> str:
    return _first_line(event.message)


@describe.register
def _(event: ev.CancelRequested | ev.CancelOrdered) -> str:
    return event.reason


@describe.register
def _(event: ev.PlacementRevoked) -> str:
    return f"attempt {event.attempt}: {event.reason}"


@describe.register
def _(event: ev.WorkerRegistered) -> str:
    return f"{event.hostname} ({event.backend}), {len(event.devices)} device(s)"


@describe.register
def _(event: ev.WorkerHeartbeat) -> str:
    return f"every {event.interval_s} s"


def show_event(out: Console, subject: str, data: bytes) -> None:
    """One line for a message of the bus: its time, subject, event name and what it says."""
    from rich.markup import escape

    try:
        event = ev.decode(data)
    except MalformedEvent:
        stamp = time.strftime("%H:%M:%S")
        text = data.decode(errors="replace")
        out.print(f"[dim]{stamp}[/] {escape(subject)} {escape(text)}")
        return
    stamp = time.strftime("%H:%M:%S", time.localtime(event.ts))
    stamp += f".{int(event.ts * 1000) % 1000:03d}"
    style = STYLES.get(event.name, "") or "default"
    out.print(
        f"[dim]{stamp}[/] {escape(subject)} [{style}]{escape(event.name)}[/] "
        f"{escape(describe(event))}"
    )
    if isinstance(event, ev.JobLog):
        for line in event.lines:
            mark = "[red]│[/]" if line.stream == "stderr" else "[dim]│[/]"
            out.print(f"  {mark} {escape(line.text)}")
