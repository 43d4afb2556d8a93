"""The runner's decisions: pure functions of a job's state and what its backend reports.

No I/O here: `app.py` starts, watches and ends jobs through the backend and emits what these
functions return, so which jobs to start or watch, when a job is over and why, how its output
becomes JobLog events (batched, capped) and which terminal event reports it are unit-tested
without NATS, Docker or a process.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from job_image.runner import end_marker, parse_frame
from services.runner import state as st
from shared import events as ev
from shared.errors import InvalidArgument, deadline_exceeded
from shared.policy import env_refusal
from shared.tracing import child_trace

MAX_LINES_PER_EVENT = 1000
MAX_BYTES_PER_EVENT = 256 * 1024
HOST_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "PYTHONPATH")
"""The runner's own variables a job inherits; everything else comes from the partition and
the job's spec."""


@dataclass(frozen=True)
class Work:
    """What reconciling starts: revoked attempts to discard, jobs cancelled before they
    started, starts and watchers."""

    cancel: list[st.RunJob] = field(default_factory=list)
    start: list[st.RunJob] = field(default_factory=list)
    watch: list[st.RunJob] = field(default_factory=list)
    discard: list[st.RunJob] = field(default_factory=list)


def work(state: st.RunnerState, busy: Iterable[str]) -> Work:
    """Jobs that need an effect; jobs in `busy` have one under way.

    One effect per job at a time: a replaced attempt is discarded (killed, cleaned up) before
    the newer attempt of its job starts, so a job never runs twice here at once.
    """
    out = Work()
    taken = set(busy)
    for job in [*state.discarding.values(), *state.active()]:
        if job.job_id in taken:
            continue
        taken.add(job.job_id)
        if job.revoked:
            out.discard.append(job)
        elif job.status == "ready" and job.cancel:
            out.cancel.append(job)
        elif job.status in ("ready", "launching"):
            out.start.append(job)
        elif job.status == "running":
            out.watch.append(job)
    return out


def leftovers(state: st.RunnerState, held: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    """What a backend holds that no running attempt owns: a crash left it behind."""
    out = []
    for job_id, attempt in held:
        job = state.jobs.get(job_id)
        if job is None or job.status == "done" or job.attempt != attempt:
            out.append((job_id, attempt))
    return out


def job_env(
    job: st.RunJob,
    worker_id: str,
    host: Mapping[str, str],
    max_unpacked: int,
    wheelhouse: str = "",
    secrets: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The job's environment: a few host variables, the job's own, the partition's, ours.

    The job's own never override the partition's or ours, and a variable Cumulus owns is
    dropped even if a spec that the gateway did not check carries it (defence in depth).
    `secrets` (the values of the job's secrets, from the gateway) go with the job's own."""
    env = {k: v for k, v in host.items() if k in HOST_ENV}
    env.update({k: v for k, v in job.spec.env.items() if not env_refusal(k) and "\x00" not in v})
    env.update({k: v for k, v in (secrets or {}).items() if not env_refusal(k) and "\x00" not in v})
    env.update(job.env)
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "CUMULUS_JOB_ID": job.job_id,
            "CUMULUS_WORKER_ID": worker_id,
            "CUMULUS_REQUIREMENTS": msgspec.json.encode(job.spec.requirements).decode(),
            "CUMULUS_MAX_UNPACKED": str(max_unpacked),
        }
    )
    if wheelhouse:
        env["CUMULUS_WHEELHOUSE"] = wheelhouse
    if job.spec.map is not None:  # job_image/warm.py serves it
        env["CUMULUS_MAP"] = msgspec.json.encode(job.spec.map).decode()
    return env


def fenced(ending: ev.Terminal, job: st.RunJob) -> ev.Terminal:
    """`ending` naming the attempt it ends: the scheduler and the partitioner believe only
    the job's current attempt's end (DESIGN.md rule 9)."""
    return msgspec.structs.replace(ending, attempt=job.attempt)


def _common(job: st.RunJob, worker_id: str) -> dict[str, Any]:
    return {
        "job_id": job.job_id,
        "user": job.user,
        "worker_id": worker_id,
        "trace": child_trace(job.trace),
    }


def started(job: st.RunJob, worker_id: str, backend: str, handle: str) -> ev.JobStarted:
    return ev.JobStarted(
        backend=backend, handle=handle, attempt=job.attempt, **_common(job, worker_id)
    )


def start_failed(job: st.RunJob, worker_id: str, exc: BaseException) -> ev.JobFailed:
    """The job's end when its start raised: UNAVAILABLE when the worker's container engine
    could not be reached (the host going down, its engine restarting), else INTERNAL."""
    if engine_unreachable(exc):
        return ev.JobFailed(
            code="UNAVAILABLE",
            message=(
                f"Worker {worker_id}'s container engine did not answer while the job started "
                f"({exc}); submit the job again"
            ),
            **_common(job, worker_id),
        )
    if isinstance(exc, InvalidArgument):  # e.g. a volume this worker does not offer
        return ev.JobFailed(
            code=exc.code,
            message=f"Cannot start the job on {worker_id}: {exc.message}",
            permanent=True,
            **_common(job, worker_id),
        )
    return ev.JobFailed(
        code="INTERNAL",
        message=f"Failed to start the job on {worker_id}: {exc}",
        **_common(job, worker_id),
    )


def engine_unreachable(exc: BaseException | None) -> bool:
    """Whether `exc` (or what caused it) says the container engine's API could not be reached
    or broke off: a connection refused, reset or aborted (the Docker SDK wraps them)."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, ConnectionError) or type(exc).__name__ in UNREACHABLE_ERRORS:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


UNREACHABLE_ERRORS = frozenset({"ConnectionError", "ProtocolError", "ReadTimeoutError"})
"""requests' and urllib3's names for an engine that refused, reset or aborted the connection
(matched by name: this module stays free of the Docker SDK's imports)."""


def cancelled(job: st.RunJob, worker_id: str) -> ev.JobCancelled:
    return ev.JobCancelled(
        message=job.cancel_reason or "cancelled by user", **_common(job, worker_id)
    )


def timed_out(job: st.RunJob, worker_id: str) -> ev.JobTimedOut:
    return ev.JobTimedOut(
        message=deadline_exceeded(job.spec.duration_s).message,
        duration_s=job.spec.duration_s,
        **_common(job, worker_id),
    )


class Stop(enum.Enum):
    """Why watching a job stops reading output as it comes and starts finishing."""

    REVOKED = "revoked"
    """The placement was given up: kill, clean up, report nothing."""
    CANCEL = "cancel"
    TIMEOUT = "timeout"


def stop(job: st.RunJob, now: float) -> Stop | None:
    """What must end a job still running, checked before every read of its output."""
    if job.revoked:
        return Stop.REVOKED
    if job.cancel:
        return Stop.CANCEL
    if now >= job.started_at + job.spec.duration_s:
        return Stop.TIMEOUT
    return None


def ending(job: st.RunJob, worker_id: str, why: Stop) -> ev.Terminal:
    return cancelled(job, worker_id) if why is Stop.CANCEL else timed_out(job, worker_id)


@dataclass
class Frames:
    """Output lines as log lines, with the in-job runner's result frame taken out."""

    nonce: str
    result: dict[str, Any] | None = None

    def lines(self, got: Iterable[tuple[str, str]]) -> list[ev.LogLine]:
        end_line = end_marker(self.nonce) if self.nonce else "\x00"
        lines: list[ev.LogLine] = []
        for name, text in got:
            if end_line in text:
                text = text[: text.index(end_line)]
                if not text:
                    continue
            if name == "stdout" and self.nonce and self.result is None:
                framed = parse_frame(text, self.nonce)
                if framed is not None:
                    before, self.result = framed
                    if before:
                        lines.append(ev.LogLine(name, before))
                    continue
            lines.append(ev.LogLine(name, text))
        return lines


MIN_MASKED = 4
"""A secret's value (or a line of one) at least this long is masked in the job's output;
a shorter one would mask ordinary text and hide little."""
MASK = "***"


def secret_masks(values: Iterable[str]) -> list[str]:
    """What to mask in a job's output: each secret's value and each line of a multi-line
    one (output is cut into lines), longest first."""
    pieces: set[str] = set()
    for value in values:
        for piece in (value, *value.splitlines()):
            if len(piece) >= MIN_MASKED:
                pieces.add(piece)
    return sorted(pieces, key=len, reverse=True)


def mask(text: str, masks: Iterable[str]) -> str:
    """`text` with every occurrence of a mask replaced by `***`."""
    for piece in masks:
        if piece in text:
            text = text.replace(piece, MASK)
    return text


def mask_lines(lines: list[ev.LogLine], masks: list[str]) -> list[ev.LogLine]:
    if not masks:
        return lines
    return [ev.LogLine(line.stream, mask(line.text, masks)) for line in lines]


def mask_ending(ending: ev.Terminal, masks: list[str]) -> ev.Terminal:
    """A JobFailed's message and traceback (the job's exception) with its secrets masked."""
    if not masks or not isinstance(ending, ev.JobFailed):
        return ending
    return msgspec.structs.replace(
        ending, message=mask(ending.message, masks), traceback=mask(ending.traceback, masks)
    )


LogRecords = tuple[list[ev.Event], list[Any]]
"""JobLog events to publish and the internal LogCursor record that goes with them."""


def log_events(
    job: st.RunJob,
    worker_id: str,
    lines: list[ev.LogLine],
    offsets: dict[str, int],
    limit: int,
    partials: Iterable[ev.LogLine] = (),
) -> LogRecords | None:
    """JobLog events for `lines` (batched, capped at `limit` bytes) and the new cursor; then
    one `partial` JobLog per unterminated last line in `partials` (within the cap too)."""
    partials = list(partials)
    if not lines and not partials and offsets == job.offsets:
        return None
    out: list[ev.Event] = []
    batch: list[ev.LogLine] = []
    size = 0
    seq, sent, truncated = job.seq, job.sent_bytes, job.truncated

    def flush() -> None:
        nonlocal batch, size, seq
        if batch:
            out.append(
                ev.JobLog(
                    job_id=job.job_id,
                    user=job.user,
                    worker_id=worker_id,
                    seq=seq,
                    lines=batch,
                    attempt=job.attempt,
                    trace=job.trace,
                )
            )
            seq += len(batch)
            batch, size = [], 0

    for line in lines:
        if truncated:
            break
        cost = len(line.text) + 8
        if sent + cost > limit:
            truncated = True
            line = ev.LogLine("stderr", f"[cumulus] output truncated after {sent} bytes")
        batch.append(line)
        size += cost
        sent += cost
        if len(batch) >= MAX_LINES_PER_EVENT or size >= MAX_BYTES_PER_EVENT:
            flush()
    flush()
    for line in partials:
        cost = len(line.text) + 8
        if truncated or sent + cost > limit:
            break
        out.append(
            ev.JobLog(
                job_id=job.job_id,
                user=job.user,
                worker_id=worker_id,
                seq=seq,
                lines=[line],
                partial=True,
                attempt=job.attempt,
                trace=job.trace,
            )
        )
        seq += 1
        sent += cost
    cursor = st.LogCursor(
        job_id=job.job_id, seq=seq, offsets=offsets, sent_bytes=sent, truncated=truncated
    )
    return out, [cursor]


RESULT_PART_BYTES = 256 * 1024
"""Bytes of a large result in one JobResultPart (under NATS's 1 MiB payload in base64)."""
MiB = 1024 * 1024


def part_count(size: int) -> int:
    """How many parts carry a result of `size` bytes (one, even when empty)."""
    return max(1, -(-size // RESULT_PART_BYTES))


def result_part(
    job: st.RunJob, worker_id: str, index: int, count: int, data: bytes
) -> ev.JobResultPart:
    """One part of a result too large for its JobCompleted, under this worker's own subject.
    Its event id is the same whenever it is made again: a restarted runner's copies are
    dropped as duplicates."""
    return ev.JobResultPart(
        event_id=f"result-{job.job_id}-{job.attempt}-{index}",
        attempt=job.attempt,
        index=index,
        count=count,
        data=data,
        **_common(job, worker_id),
    )


def parts_envelope(count: int, size: int, sha256: str, payload: str = "", shown: str = "") -> bytes:
    """What the completed event of a result in parts carries instead of it: their count, size
    and sha256; `payload: pickle` when the parts are the value's pickle (the in-job runner's
    result file) rather than the JSON envelope, with a short `repr` of the value."""
    envelope: dict[str, Any] = {"ok": True, "parts": count, "size": size, "sha256": sha256}
    if payload:
        envelope.update(payload=payload, repr=shown)
    return msgspec.json.encode(envelope)


def _mib(size: int) -> str:
    return f"{size / MiB:.1f} MiB"


def result_too_large(job: st.RunJob, worker_id: str, size: int, limit: int) -> ev.JobFailed:
    return ev.JobFailed(
        code="RESOURCE_EXHAUSTED",
        message=(
            f"The result is {_mib(size)}; the most a job may return is {_mib(limit)} "
            "(worker.max_result_bytes): write large outputs to storage and return a path"
        ),
        permanent=True,
        **_common(job, worker_id),
    )


def result_failed(job: st.RunJob, worker_id: str, code: str, message: str) -> ev.JobFailed:
    """A result that could not be delivered (unreadable, or the bus did not take it)."""
    return ev.JobFailed(code=code, message=message, **_common(job, worker_id))


def _exit_status(result: dict[str, Any]) -> int:
    """n of the job's `sys.exit(n)` (job_image/runner.py's frame says so); 0: not an exit."""
    value = result.get("exit_status")
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _reported_size(result: dict[str, Any], key: str) -> int:
    value = result.get(key)
    return value if isinstance(value, int) and value >= 0 else 0


def outcome(
    job: st.RunJob,
    worker_id: str,
    result: dict[str, Any] | None,
    reason: str,
    runtime_s: float,
    stored: bytes | None = None,
    max_result: int = 0,
) -> ev.Terminal:
    """The terminal event for a job that exited: its result, its error, or why it has none.

    `stored` replaces a result too large for an event (its parts' envelope: parts_envelope).
    A result the in-job runner found over the maximum (`max_result`, this worker's) is
    RESOURCE_EXHAUSTED.
    """
    common = _common(job, worker_id)
    if result is not None and result.get("ok"):
        encoded = stored if stored is not None else msgspec.json.encode(result)
        return ev.JobCompleted(result=msgspec.Raw(encoded), runtime_s=runtime_s, **common)
    if result is not None and (result.get("stage"), result.get("code")) == (
        "result",
        "RESOURCE_EXHAUSTED",
    ):
        size = _reported_size(result, "size")
        limit = max_result or _reported_size(result, "limit")
        return result_too_large(job, worker_id, size, limit)
    if result is not None and _exit_status(result):
        status, said = _exit_status(result), str(result.get("message") or "")
        return ev.JobFailed(
            code="INTERNAL",
            message=f"the job exited with exit status {status}" + (f": {said}" if said else ""),
            exit_status=status,
            **common,
        )
    if result is not None:
        return ev.JobFailed(
            code="INTERNAL",
            message=f"{result.get('type')}: {result.get('message')}",
            traceback=str(result.get("traceback", "")),
            error_type=str(result.get("error_type", "")),
            **common,
        )
    return ev.JobFailed(code="INTERNAL", message=f"Job ended without a result: {reason}", **common)


def attempt_failed(ending: ev.Terminal, job: st.RunJob) -> ev.Terminal | ev.JobAttemptFailed:
    """How the end of a job that ended by itself is reported: a failure of its code (INTERNAL,
    and not one a rerun cannot change) of a job that may be retried (`spec.retries`) ends
    the attempt only, as `attempt_failed`; the scheduler decides whether the job runs again
    or ends with this error. Any other end is reported as it is."""
    if not isinstance(ending, ev.JobFailed) or job.spec.retries <= 0:
        return ending
    if ending.code != "INTERNAL" or ending.permanent:
        return ending
    return ev.JobAttemptFailed(
        job_id=ending.job_id,
        user=ending.user,
        worker_id=ending.worker_id,
        trace=ending.trace,
        attempt=ending.attempt,
        code=ending.code,
        message=ending.message,
        traceback=ending.traceback,
        error_type=ending.error_type,
        exit_status=ending.exit_status,
        log_lines=ending.log_lines,
        outputs=ending.outputs,
    )


def counted(ending: ev.Terminal, job: st.RunJob, records: Iterable[Any]) -> ev.Terminal:
    """`ending` with the number of output lines its attempt published (`log_lines`), the
    lines published with it (the LogCursor among `records`) included: they travel in another
    stream (LOGS), and a reader waits for that many before it hands out the end."""
    seq = job.seq
    for record in records:
        if isinstance(record, st.LogCursor):
            seq = record.seq
    return msgspec.structs.replace(ending, log_lines=seq)
