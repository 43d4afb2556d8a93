"""The event catalog: immutable, versioned facts about jobs and workers.

Every event is a frozen msgspec Struct encoded as JSON with a type tag such as
`cumulus.job.v1.submitted`, so `nats sub 'jobs.>'` shows it readably. Each carries an event id
(also the JetStream `Nats-Msg-Id`, so a re-published event is dropped as a duplicate), the job
or worker id, a timestamp and the W3C trace context. Decoding ignores unknown fields, so an old
reader survives a new field.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, ClassVar

import msgspec

from shared.errors import CumulusError, MalformedEvent


def new_id() -> str:
    return uuid.uuid4().hex


def new_job_id() -> str:
    """A job id: unique, short, and a valid subject token (the client or the gateway picks it)."""
    return "j" + uuid.uuid4().hex[:20]


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Common envelope of every event."""

    name: ClassVar[str]
    event_id: str = msgspec.field(default_factory=new_id)
    ts: float = msgspec.field(default_factory=time.time)
    trace: str = ""


class JobEvent(Event, frozen=True, kw_only=True):
    """An event in one job's history, published under `jobs.<user>.<job>.<worker>.<name>`."""

    job_id: str
    user: str = "default"
    worker_id: str = ""


class MapSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A warm map (docs/map.md): the job holds its partition and `warm` processes that each
    load the function once, then call it on input after input from the job's work queue
    (`mapin.<user>.<job>`, stream MAPIN); each input's answer is published on its own."""

    warm: int = 1
    """How many job processes call the function side by side (1 … MAX_WARM)."""
    inputs: int = 0
    """How many inputs the map has (the SDK's count; the queue's end marker confirms it)."""
    retries: int = 0
    """How many more times an input whose call raised is tried before its error is its
    answer (an input whose process died is tried up to MAP_CRASH_TRIES times)."""


class MapChunk(msgspec.Struct, kw_only=True):
    """Inputs `first`, `first + 1`, … of a warm map, each the cloudpickle of `(args, kwargs)`:
    what the SDK publishes to `mapin.<user>.<job>` (msgpack: they carry pickles)."""

    first: int
    inputs: list[bytes]


class MapAnswers(msgspec.Struct, kw_only=True):
    """The answers of one chunk, (index, ok, cloudpickled value or JSON error), and the attempt
    that answered: what the runner publishes to `results.<user>.<job>.<worker>.map`."""

    first: int
    answers: list[tuple[int, bool, bytes]]
    attempt: int = 0


MAP_END_HEADER = "Cumulus-End"
"""The header of a map's end marker (after its last chunk): the number of inputs."""
MAX_WARM = 64
"""The most warm processes one map job may ask for."""
MAP_CRASH_TRIES = 3
"""Tries of an input whose process died (a crash, the OOM killer) before that is its answer."""


class JobSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What the user asked to run; travels with the job to the worker."""

    code_ref: str
    """Name of the code package in the object store (its sha256)."""
    entrypoint: str = "function"
    """`function` for a pickled function call, else a script path inside the package."""
    requirements: list[str] = []
    gpu_tenths: int = 5
    duration_s: int = 3600
    priority: int = 0
    env: dict[str, str] = {}
    network: bool = False
    """The job gets network access (the gateway allowed it by the user's policy)."""
    secrets: list[str] = []
    """Names of the user's secrets the job gets in its environment; their values never
    travel in events (the runner asks the gateway for them: `cumulus.secrets.<worker>.get`)."""
    map: MapSpec | None = None
    """A warm map job (`client.map(..., warm=N)`): None for an ordinary job."""
    name: str = ""
    """The user's name for the job (shared/labels.py); "" for none. Names need not be unique."""
    tags: dict[str, str] = {}
    """The user's key=value tags (shared/labels.py): `cumulus jobs --tag k=v` finds the job."""
    target: str = ""
    """What the job runs, as the client named it (`train.py`, `pkg.mod:fit`); shown only."""
    volumes: dict[str, str] = {}
    """Folders the operator offers (container.volumes) mounted in the job's container:
    {name: where} (shared/volumes.py); the container backends only."""
    retries: int = 0
    """How many more times the job is run when its code fails (it raised or exited non-zero),
    0-MAX_RETRIES, after `retry_backoff` seconds each (docs/lifecycle.md, retries)."""
    image: str = ""
    """The job's own image (shared/images.py), allowed by the operator's policy.images; ""
    for the worker's job image (container.image). The docker and swarm backends only."""


class JobSubmitted(JobEvent, frozen=True, kw_only=True, tag="cumulus.job.v1.submitted"):
    name = "submitted"
    spec: JobSpec


class JobQueued(JobEvent, frozen=True, kw_only=True, tag="cumulus.job.v1.queued"):
    name = "queued"
    position: int
    reason: str
    epoch: int = 0
    """The scheduler's epoch that decided it (`SchedulerElected`); 0: not stamped."""


class WorkerSelected(JobEvent, frozen=True, kw_only=True, tag="cumulus.job.v1.scheduled"):
    """The scheduler placed the job: `tenths` of each of `devices` on `worker_id`."""

    name = "scheduled"
    spec: JobSpec
    devices: list[int]
    tenths: int
    attempt: int = 1
    epoch: int = 0
    """The scheduler's epoch that decided it: a consumer that has seen a later epoch's
    `SchedulerElected` takes it as stale (fenced); 0: not stamped (written before epochs)."""


class PartitionReady(JobEvent, frozen=True, kw_only=True, tag="cumulus.job.v1.partition_ready"):
    name = "partition_ready"
    spec: JobSpec
    attempt: int = 1
    partition_ids: list[str]
    devices: list[int]
    env: dict[str, str]
    expires_at: float


class PartitionFailed(JobEvent, frozen=True, kw_only=True, tag="cumulus.job.v1.partition_failed"):
    name = "partition_failed"
    attempt: int = 1
    code: str
    message: str


class PartitionReleased(
    JobEvent, frozen=True, kw_only=True, tag="cumulus.job.v1.partition_released"
):
    name = "partition_released"
    attempt: int = 1
    partition_ids: list[str]


class CancelRequested(JobEvent, frozen=True, kw_only=True, tag="cumulus.job.v1.cancel_requested"):
    """A user asked to cancel; the scheduler decides what that means where the job stands."""

    name = "cancel_requested"
    reason: str = "cancelled by user"


class CancelOrdered(JobEvent, frozen=True, kw_only=True, tag="cumulus.job.v1.cancel"):
    """Worker-directed: stop this job's container or process now."""

    name = "cancel"
    reason: str = "cancelled by user"
    epoch: int = 0
    """The scheduler's epoch that decided it; 0: not stamped."""


class PlacementRevoked(JobEvent, frozen=True, kw_only=True, tag="cumulus.job.v1.revoked"):
    """Worker-directed: the scheduler gave up on this placement (e.g. the worker was lost).

    The worker's partitioner releases the attempt's partitions and its runner kills the
    attempt's process or container if it runs; neither reports a job outcome for it.
    """

    name = "revoked"
    attempt: int
    reason: str
    epoch: int = 0
    """The scheduler's epoch that decided it; 0: not stamped."""
    retry_at: float = 0.0
    """A retry of a job whose code failed (`attempt_failed`): the job is placed again, as a
    new attempt, from this time on (epoch seconds); 0: not a retry."""


class JobAttemptFailed(JobEvent, frozen=True, kw_only=True, tag="cumulus.job.v1.attempt_failed"):
    """The job's code failed in this attempt (it raised, exited non-zero, or ended without a
    result), and the job may be retried (its spec has `retries`): published by the runner
    in place of `failed`, it ends the attempt, not the job. The scheduler decides: a retry
    (`revoked` with `retry_at`, then a new placement) or the job's `failed`, which carries
    this attempt's error."""

    name = "attempt_failed"
    attempt: int
    code: str
    message: str
    traceback: str = ""
    error_type: str = ""
    exit_status: int = 0
    log_lines: int = 0
    """Output lines the attempt published (as on a Terminal)."""
    outputs: OutputsKept | None = None
    """The attempt's kept `outputs/` folder (as on a Terminal); the job's `failed` carries
    the last attempt's."""


MAX_RETRIES = 10
"""The most retries a job may ask for."""
RETRY_BASE_S = 1.0
"""The wait before a job's first retry; each further retry waits twice the one before."""
RETRY_CAP_S = 60.0
"""No wait before a retry is longer than this."""


def retry_backoff(retried: int) -> float:
    """Seconds to wait before the retry that follows `retried` earlier retries."""
    return float(min(RETRY_CAP_S, RETRY_BASE_S * 2.0 ** min(retried, 32)))


class JobStarted(JobEvent, frozen=True, kw_only=True, tag="cumulus.job.v1.started"):
    name = "started"
    backend: str
    handle: str
    attempt: int = 1


class LogLine(msgspec.Struct, frozen=True, array_like=True):
    stream: str
    text: str


class JobLog(JobEvent, frozen=True, kw_only=True, tag="cumulus.job.v1.log"):
    """A batch of consecutive output lines; `seq` numbers the first line from 0. Published
    by the job's worker under `logs.<user>.<job>.<worker>` (stream LOGS, kept by its own
    limits), not in the job's history."""

    name = "log"
    seq: int
    lines: list[LogLine]
    attempt: int = 0
    """The placement attempt whose output it is (`seq` counts from 0 in each attempt: a
    retried job's attempts may run on one worker); 0: not stamped (an older runner)."""
    partial: bool = False
    """Its one line is the job's unterminated last line as it stands now (a progress bar):
    shown in place until the next line of its stream replaces it, which carries the
    complete text. It counts in `seq` like any line."""


class JobResultPart(JobEvent, frozen=True, kw_only=True, tag="cumulus.job.v1.result"):
    """One piece of a result too large for its JobCompleted, published by the job's worker
    before it, under `results.<user>.<job>.<worker>.<attempt>` (stream RESULTS, which only
    that worker may publish under): the completed event then carries
    `{"ok": true, "parts": count, "size", "sha256"}`."""

    name = "result"
    attempt: int
    index: int
    count: int
    data: bytes


class JobOutputsPart(JobEvent, frozen=True, kw_only=True, tag="cumulus.job.v1.outputs"):
    """One piece of the job's kept `outputs/` folder (a gzipped tar), published by its worker
    before the job's end under `results.<user>.<job>.<worker>.<attempt>-outputs` (stream
    RESULTS); the end's `outputs` gives their count, size and sha256."""

    name = "outputs"
    attempt: int
    index: int
    count: int
    data: bytes


class OutputsKept(msgspec.Struct, frozen=True, kw_only=True):
    """A job's `outputs/` folder, kept as a gzipped tar in JobOutputsPart events."""

    parts: int
    size: int
    sha256: str
    files: int = 0


class Terminal(JobEvent, frozen=True, kw_only=True):
    """Marker base for the events that end a job."""

    status: ClassVar[str]
    attempt: int = 0
    """The placement attempt this outcome is of (DESIGN.md rule 9: the scheduler and the
    partitioner believe only an outcome of the job's current attempt). 0: of no placement
    (a job refused or cancelled before it was placed, or an event written before this field)."""
    log_lines: int = 0
    """Output lines the job's worker published for this attempt (its `log` events, numbered
    from 0), set by the runner: they travel in another stream, so a reader waits for them
    before it hands out the end. 0: none, or an end not from the runner."""
    epoch: int = 0
    """The scheduler's epoch, on an end the scheduler decided (a refusal, a cancel before
    placement, a failure after the last attempt or a lost worker); 0 on a worker's own."""
    outputs: OutputsKept | None = None
    """The job's `outputs/` folder, kept (JobOutputsPart events, published before this end)
    for `cumulus download`; None: nothing kept."""


class JobCompleted(Terminal, frozen=True, kw_only=True, tag="cumulus.job.v1.completed"):
    name = "completed"
    status = "COMPLETED"
    result: msgspec.Raw
    """The result envelope, `{"encoding": "json"|"pickle", "data": ...}`, or for a large one
    `{"ok": true, "parts": n, "size": bytes, "sha256": hex}` (its JobResultPart events)."""
    runtime_s: float = 0.0


class JobFailed(Terminal, frozen=True, kw_only=True, tag="cumulus.job.v1.failed"):
    name = "failed"
    status = "FAILED"
    code: str
    message: str
    traceback: str = ""
    error_type: str = ""
    """The class of the exception the job's code raised, `module:QualName` (e.g.
    `builtins:ValueError`); empty for an end the job's code did not raise."""
    exit_status: int = 0
    """The job's code ended with `sys.exit(n)`, n not 0: n (no traceback then); else 0."""
    permanent: bool = False
    """Running the job again cannot change this end (RESOURCE_EXHAUSTED for a job larger than
    any worker or than its user's share, or a result over the most a job may return)."""


class JobTimedOut(Terminal, frozen=True, kw_only=True, tag="cumulus.job.v1.timed_out"):
    name = "timed_out"
    status = "TIMED_OUT"
    code: str = "DEADLINE_EXCEEDED"
    message: str
    duration_s: int = 0
    """The duration the job had (0 in events written before this field existed)."""


class JobCancelled(Terminal, frozen=True, kw_only=True, tag="cumulus.job.v1.cancelled"):
    name = "cancelled"
    status = "CANCELLED"
    code: str = "CANCELLED"
    message: str = "cancelled by user"


class WorkerEvent(Event, frozen=True, kw_only=True):
    """An event about one worker, published under `workers.<worker>.<name>`."""

    worker_id: str


class DeviceInfo(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    name: str
    memory_bytes: int
    kind: str = "virtual"


class WorkerRegistered(WorkerEvent, frozen=True, kw_only=True, tag="cumulus.worker.v1.registered"):
    name = "registered"
    hostname: str
    devices: list[DeviceInfo]
    backend: str = "process"
    labels: dict[str, str] = {}


class WorkerHeartbeat(WorkerEvent, frozen=True, kw_only=True, tag="cumulus.worker.v1.heartbeat"):
    name = "heartbeat"
    interval_s: float = 5.0


class WorkerDeregistered(
    WorkerEvent, frozen=True, kw_only=True, tag="cumulus.worker.v1.deregistered"
):
    name = "deregistered"
    reason: str = ""


AnyJobEvent = (
    JobSubmitted
    | JobQueued
    | WorkerSelected
    | PartitionReady
    | PartitionFailed
    | PartitionReleased
    | CancelRequested
    | CancelOrdered
    | PlacementRevoked
    | JobStarted
    | JobAttemptFailed
    | JobLog
    | JobResultPart
    | JobOutputsPart
    | JobCompleted
    | JobFailed
    | JobTimedOut
    | JobCancelled
)


class WorkerNodeObserved(WorkerEvent, frozen=True, kw_only=True, tag="cumulus.worker.v1.node"):
    """What the Swarm API says of the worker's node (published by the scheduler on change)."""

    name = "node"
    node_id: str
    state: str
    """ready | down | unknown | disconnected (Swarm's node status)."""
    availability: str
    """active | pause | drain: only an active node gets new placements."""
    labels: dict[str, str] = {}
    """The node's labels: the seed's gpu.count, gpu.N.name, gpu.N.memory, chronos.installed,
    ssh.address."""


class WorkerLost(WorkerEvent, frozen=True, kw_only=True, tag="cumulus.worker.v1.lost"):
    """The scheduler's verdict: the worker missed its heartbeats; its capacity left the pool."""

    name = "lost"
    reason: str
    epoch: int = 0
    """The scheduler's epoch that decided it; 0: not stamped."""


class SchedulerElected(Event, frozen=True, kw_only=True, tag="cumulus.scheduler.v1.elected"):
    """The election marker: a scheduler took the lease (services/scheduler/lease.py) with
    this epoch. Published into the job stream on `jobs._._._.elected`, which every
    consumer of decisions also reads, so that in stream order everything before the marker
    is fact for everyone and any later decision stamped with a smaller epoch is stale."""

    name = "elected"
    epoch: int
    holder: str
    """The scheduler instance that leads from here on (config `instance`, or its persisted
    `<hostname>-<random>` name)."""


AnyWorkerEvent = (
    WorkerRegistered | WorkerHeartbeat | WorkerDeregistered | WorkerNodeObserved | WorkerLost
)
AnyEvent = AnyJobEvent | AnyWorkerEvent | SchedulerElected

TERMINAL_NAMES = ("completed", "failed", "timed_out", "cancelled")
JOB_EVENT_TYPES: tuple[type[JobEvent], ...] = AnyJobEvent.__args__
WORKER_EVENT_TYPES: tuple[type[WorkerEvent], ...] = AnyWorkerEvent.__args__

_encoder = msgspec.json.Encoder()


def decoder(typ: Any) -> Callable[[bytes], Any]:
    """A decode function for `typ` (the event union, or a service's union of events and its own
    records): anything that is not a known, well-formed value raises MalformedEvent."""
    typed: msgspec.json.Decoder[Any] = msgspec.json.Decoder(typ)

    def decode(data: bytes) -> Any:
        try:
            return typed.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise MalformedEvent(f"malformed event: {exc}") from None
        except RecursionError:
            raise MalformedEvent("malformed event: nested too deeply") from None

    return decode


_decode = decoder(AnyEvent)


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


def decode(data: bytes) -> AnyEvent:
    """Decode one event; anything that is not a known, well-formed event is MalformedEvent."""
    event: AnyEvent = _decode(data)
    return event


STAMPED: tuple[type[Event], ...] = (
    JobQueued,
    WorkerSelected,
    PlacementRevoked,
    CancelOrdered,
    Terminal,
    WorkerLost,
)
"""Event types the scheduler stamps with its epoch when it decides them."""
SCHEDULER_ONLY: tuple[type[Event], ...] = (
    JobQueued,
    WorkerSelected,
    PlacementRevoked,
    CancelOrdered,
    WorkerLost,
)
"""Stamped types only a scheduler publishes (shared/auth.py); a worker's own ends are
Terminal too, so their epoch is not taken as news of an election."""


_CARRIERS: tuple[type[Event], ...] = (SchedulerElected, *STAMPED)
"""Events carrying an epoch: a marker, the stamped decisions (built once: every consumer asks
per event)."""
_RAISERS: tuple[type[Event], ...] = (SchedulerElected, *SCHEDULER_ONLY)
"""Events that move the epoch seen: a marker, decisions only a scheduler publishes."""


def epoch_of(event: Any) -> int:
    """The scheduler epoch `event` carries: a marker's, a stamped decision's; 0 otherwise."""
    if isinstance(event, _CARRIERS):
        return int(event.epoch)  # type: ignore[attr-defined]
    return 0


def stale(event: Any, known: int) -> bool:
    """The fencing rule every consumer keeps, in stream order: a decision stamped with an
    epoch smaller than the largest it has seen is a superseded scheduler's, never acted on.
    Unstamped events (0: written before epochs, or not the scheduler's) are not fenced."""
    return isinstance(event, STAMPED) and 0 < epoch_of(event) < known


def epoch_after(known: int, event: Any) -> int:
    """The largest epoch seen once `event` is applied: raised by markers and by decisions
    only a scheduler publishes (a worker cannot move it, so cannot fence the scheduler)."""
    if isinstance(event, _RAISERS):
        return max(known, epoch_of(event))
    return known


def stamped(event: Event, epoch: int) -> Event:
    """`event` carrying `epoch` if it is a type the scheduler stamps (else unchanged)."""
    if isinstance(event, STAMPED) and epoch:
        return msgspec.structs.replace(event, epoch=epoch)
    return event


def failure_of(exc: CumulusError, job: JobEvent, **fields: Any) -> JobFailed:
    """The JobFailed event that reports `exc` for `job`."""
    fields.setdefault("permanent", bool(getattr(exc, "permanent", False)))
    return JobFailed(
        job_id=job.job_id,
        user=job.user,
        worker_id=fields.pop("worker_id", job.worker_id),
        code=exc.code,
        message=exc.message,
        trace=job.trace,
        **fields,
    )
