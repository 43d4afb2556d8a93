"""The read-only views the API answers with: a job's status, the workers and their devices.

The gateway keeps `JobInfo` per job (its job table, rebuilt from events), the scheduler builds
`WorkerInfo` for the `workers` operation, and the SDK decodes the same structs, so a field
added here reaches every reader at once. Decoding ignores unknown fields, as for events.
"""

from __future__ import annotations

from enum import StrEnum

import msgspec


class JobStatus(StrEnum):
    """Where a job stands; the last four are terminal (the job will not change again)."""

    SUBMITTED = "SUBMITTED"
    """Accepted by the gateway, waiting for the scheduler (or placed again after a failure)."""
    QUEUED = "QUEUED"
    """No worker can take it now; it waits in the queue."""
    SCHEDULED = "SCHEDULED"
    """Placed on a worker, whose partitioner is creating the GPU partition."""
    PARTITIONED = "PARTITIONED"
    """The partition exists; the runner is starting the job."""
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    CANCELLED = "CANCELLED"

    @property
    def is_terminal(self) -> bool:
        """The job has ended (COMPLETED, FAILED, TIMED_OUT or CANCELLED)."""
        return self in TERMINAL


ACTIVE = frozenset(
    {
        JobStatus.SUBMITTED,
        JobStatus.QUEUED,
        JobStatus.SCHEDULED,
        JobStatus.PARTITIONED,
        JobStatus.RUNNING,
    }
)
TERMINAL = frozenset(
    {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.TIMED_OUT, JobStatus.CANCELLED}
)


class JobInfo(msgspec.Struct, kw_only=True):
    """What GetJobStatus (and ListJobs, CancelJob) answers; every field derives from the
    job's events."""

    job_id: str
    user: str
    status: JobStatus = JobStatus.SUBMITTED
    gpu: str = ""
    """The GPU amount as the shortest decimal: "0.5", "2"."""
    duration_s: int = 0
    priority: int = 0
    entrypoint: str = ""
    """`function`, or the script's path inside its package."""
    worker_id: str = ""
    devices: list[int] = []
    partition_ids: list[str] = []
    attempt: int = 0
    """The placement attempt (a job is placed again when its partition or worker fails)."""
    queue_position: int | None = None
    waiting_reason: str = ""
    """What the job waits for, in words, while it is not running."""
    submitted_at: float = 0.0
    scheduled_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    cancel_requested: bool = False
    partition_released: bool = False
    error_code: str = ""
    error_message: str = ""
    result: msgspec.Raw = msgspec.Raw(b"null")
    """The result envelope of a completed job as JSON (`null` until then); `cumulus.Job.result()`
    gives the value."""
    name: str = ""
    """The job's name (`--name`, `name=`); "" for none."""
    tags: dict[str, str] = {}
    """The job's tags (`--tag k=v`, `tags=`)."""
    target: str = ""
    """What the job runs, as the client named it (`train.py`, `pkg.mod:fit`)."""
    retries: int = 0
    """Times the job may run again when its code fails (`retries=`)."""
    failed_attempts: int = 0
    """Attempts whose code failed so far (each retried, or the last one the job's end)."""


class DeviceUsage(msgspec.Struct, kw_only=True):
    """One device of a worker with the share allocated on it."""

    index: int
    name: str
    kind: str = "virtual"
    """nvidia | opencl | virtual."""
    memory_bytes: int = 0
    allocated: str = "0"
    """The share in use, as a decimal amount ("0.3")."""
    free: str = "1"
    jobs: dict[str, str] = {}
    """Job id -> the share it holds on this device."""


class SwarmNode(msgspec.Struct, kw_only=True):
    """What the Swarm API says of a worker's node."""

    id: str
    state: str = ""
    availability: str = ""
    labels: dict[str, str] = {}


class WorkerInfo(msgspec.Struct, kw_only=True):
    """A worker as the scheduler sees it: liveness, backend, devices and their shares."""

    worker_id: str
    hostname: str = ""
    backend: str = ""
    status: str = "ready"
    """ready, down, or the Swarm node's availability or state when that keeps jobs off it."""
    down_reason: str = ""
    node: SwarmNode | None = None
    last_seen: float = 0.0
    labels: dict[str, str] = {}
    devices: list[DeviceUsage] = []


class WorkerList(msgspec.Struct, kw_only=True):
    """The `workers` operation's reply: every worker and how many jobs wait in the queue."""

    workers: list[WorkerInfo] = []
    queued: int = 0
    next: str = ""
    """More workers follow: ask again with `after` set to this (a worker id); "" when none."""


class HealthInfo(msgspec.Struct, kw_only=True):
    """The `health` operation's reply (the seed's HealthCheck)."""

    status: str
    version: str = ""
    uptime_s: float = 0.0
    jobs: int = 0
    scheduler: str = ""
