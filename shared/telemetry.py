"""Telemetry: structured JSON logs and Prometheus metrics (the seed's names).

Tracing (OTel spans, the W3C trace context carried in events) is shared/tracing.py;
`new_trace` and `child_trace` are importable from here too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import sys
import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

# Moved to shared/tracing.py; imports from here keep working.
from shared.tracing import child_trace as child_trace
from shared.tracing import new_trace as new_trace

WORKER_ASSIGNMENTS = Counter(
    "cumulus_worker_assignments_total", "Total number of worker assignments", ["status"]
)
ACTIVE_WORKERS = Gauge("cumulus_active_workers", "Number of active workers")
ASSIGNMENT_DURATION = Histogram("cumulus_assignment_duration_seconds", "Time to assign worker")
WORKER_ACTIVE_JOBS = Gauge("cumulus_worker_active_jobs", "Number of active jobs on worker")
JOB_DURATION = Histogram(
    "cumulus_job_duration_seconds",
    "Job execution duration",
    ["status"],
    buckets=(1, 5, 10, 30, 60, 300, 600, 1800, 3600),
)
for _status in ("completed", "failed", "timed_out", "cancelled"):
    JOB_DURATION.labels(_status)  # exported from the start: a rate needs a first sample
GPU_MEMORY_USED = Gauge("cumulus_gpu_memory_used_bytes", "GPU memory used", ["device"])
MAP_INPUTS = Counter(
    "cumulus_map_inputs_total", "Warm map inputs answered on this worker", ["outcome"]
)
QUEUE_WAIT = Histogram(
    "cumulus_job_queue_wait_seconds", "Time from submission to placement on a worker"
)
COLD_START = Histogram(
    "cumulus_job_cold_start_seconds",
    "Time from submission to the job's process or container running",
)
EVENTS_APPLIED = Counter(
    "cumulus_events_applied_total", "Events applied to a service's state", ["service"]
)
DEAD_LETTERS = Counter(
    "cumulus_dead_letters_total",
    "Messages a service could not decode, believe or apply, and set aside",
    ["service"],
)
FENCED = Counter(
    "cumulus_fenced_events_total",
    "Decisions of a superseded scheduler (stamped with an older epoch) a service did not act on",
    ["service"],
)
CONSUMPTION_PAUSED = Gauge(
    "cumulus_consumption_paused",
    "1 while a service cannot write its event log (a full disk) and waits, else 0",
    ["service"],
)
EVENTLOG_TRANSACTIONS = Counter(
    "cumulus_eventlog_transactions_total",
    "SQLite write transactions of a service's event log (batches, outbox deletes, snapshots)",
    ["service"],
)
CONSUMER_GAPS = Counter(
    "cumulus_consumer_gaps_total",
    "Deliveries a service's consumer never received (a consumer sequence skipped, e.g. its "
    "leader died with one in flight); each made the consumer anew from the last applied event",
    ["service"],
)
SNAPSHOTS = Counter(
    "cumulus_snapshots_total", "State snapshots a service took (its log trimmed)", ["service"]
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(service: str, level: str = "info", fmt: str = "json") -> None:
    """Logs to stderr: `fmt` json (one object a line) or text; `level` a logging level name in
    any case (the config's `logging` section, validated at load). Where stderr (and stdout) is
    a file, its path is noted for `reopen_logs` (SIGHUP)."""
    _log_files.clear()
    for fd in (1, 2):
        if path := _file_of(fd):
            _log_files[fd] = path
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {service} %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


_log_files: dict[int, str] = {}
"""Standard output and error (1, 2) -> the path of the regular file each was opened on."""


def _file_of(fd: int) -> str:
    """The path of the regular file `fd` writes to ("" for a terminal, pipe or socket)."""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""
    return path if path.startswith("/") and not path.endswith(" (deleted)") else ""


def reopen_logs() -> None:
    """SIGHUP: open the log file again by its path, as logrotate expects after it renamed it.

    Cumulus logs to stderr; a supervisor that sends it to a file (`>> file`, systemd's
    `StandardError=append:`, `cumulus up`'s logs/) opened the file. Standard error (and
    standard output, where it is a file) is reopened at the path it had at the start, in
    append mode, and the rest of the log goes there. Logs to a terminal or a pipe (journald,
    docker logs) have nothing to reopen: a line says so."""
    log = logging.getLogger(__name__)
    if not _log_files:
        log.info("SIGHUP: the log is not a file; nothing to reopen")
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    reopened = []
    for fd, path in _log_files.items():
        try:
            new = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            log.warning(
                "SIGHUP: cannot reopen the log file",
                extra={"fields": {"path": path, "error": str(exc)}},
            )
            continue
        os.dup2(new, fd)
        os.close(new)
        reopened.append(path)
    if reopened:
        log.info("log file reopened", extra={"fields": {"paths": sorted(set(reopened))}})


def start_metrics(port: int, addr: str = "127.0.0.1") -> None:
    """Serve /metrics on `addr:port` (0: off), with every metric of shared/metrics.py, and
    the process's /healthz and /readyz beside it (shared/health.py)."""
    from shared import metrics

    metrics.start(port, addr)


def since(start: float) -> float:
    return max(0.0, time.time() - start)
