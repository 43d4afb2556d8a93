"""A job's kept `outputs/` folder, downloaded: `job.download()` and `cumulus download`.

When a job ends, its worker keeps what the job left in `outputs/` (its working directory's)
as a gzipped tar, in parts in the RESULTS stream (services/runner/outputs.py); the end event
says how many parts, their size and sha256. Here the parts are replayed through the gateway
(users have no JetStream API), joined, checked against that digest and unpacked: all of
them, or the one file or folder asked for. Unpacking refuses anything that would land
outside the destination (tarfile's `data` filter).
"""

from __future__ import annotations

import asyncio
import contextlib
import tarfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from nats.aio.msg import Msg

from shared import events as ev
from shared import subjects
from shared.errors import CumulusError, MalformedEvent

if TYPE_CHECKING:
    from cumulus._jobs import AsyncJob


def _not_found(message: str, job_id: str) -> CumulusError:
    return CumulusError.from_code("NOT_FOUND", message, {"job_id": job_id})


async def ending(job: AsyncJob) -> ev.Terminal:
    """The job's end, from its history; NOT_FOUND while it has not ended."""
    status = await job.status()  # NOT_FOUND for no such job; a unique prefix: the whole id
    end: ev.Terminal | None = None
    async with contextlib.aclosing(job._stream(False, logs=False)) as events:
        async for event in events:
            if isinstance(event, ev.Terminal):
                end = event
    if end is None:
        raise _not_found(
            f"Job {job.job_id} is {status.status}: its outputs are kept when it ends", job.job_id
        )
    return end


def _part(msg: Msg, end: ev.Terminal, count: int) -> ev.JobOutputsPart | None:
    """An outputs part of the attempt that ended the job, that agrees with its subject."""
    try:
        event = ev.decode(msg.data)
    except MalformedEvent:
        return None
    if not isinstance(event, ev.JobOutputsPart):
        return None
    expected = subjects.outputs(end.user, end.job_id, end.worker_id, end.attempt)
    if msg.subject != expected or (event.job_id, event.worker_id) != (end.job_id, end.worker_id):
        return None
    if event.attempt != end.attempt or not 0 <= event.index < count:
        return None
    return event


async def gather(job: AsyncJob, end: ev.Terminal, kept: ev.OutputsKept, into: Any) -> None:
    """The outputs' parts joined into `into` (a `_Gathered`), digest checked."""
    from cumulus._jobs import gather_parts

    subject = subjects.outputs(end.user, end.job_id, end.worker_id, end.attempt)
    await gather_parts(job, subject, lambda msg: _part(msg, end, kept.parts), into)
    if not into.complete:
        raise _not_found(
            f"The outputs of job {job.job_id} are no longer kept ({into.have} of {kept.parts} "
            "parts left): they are kept for retention.results_ttl_s",
            job.job_id,
        )
    if into.size != kept.size or into.sha256() != kept.sha256:
        raise CumulusError.from_code(
            "INTERNAL",
            f"The outputs of job {job.job_id} do not match the digest its worker reported; "
            "nothing was unpacked",
        )


def _wanted(members: list[tarfile.TarInfo], path: str | None) -> list[tarfile.TarInfo]:
    if not path:
        return members
    want = PurePosixPath(path.strip("/"))
    want = want.relative_to("outputs") if want.parts[:1] == ("outputs",) else want
    chosen = [m for m in members if (p := PurePosixPath(m.name)) == want or want in p.parents]
    return chosen


def unpack(source: Any, path: str | None, to: Path, job_id: str) -> list[Path]:
    """The files of the tar in `source` (all, or `path`'s) unpacked under `to`."""
    source.seek(0)
    with tarfile.open(fileobj=source, mode="r:gz") as tar:
        members = _wanted(tar.getmembers(), path)
        if not members:
            raise _not_found(f"Job {job_id} kept no {path!r} in its outputs", job_id)
        to.mkdir(parents=True, exist_ok=True)
        tar.extractall(to, members=members, filter="data")
    return [to / m.name for m in members if m.isfile()]


async def download(job: AsyncJob, path: str | None, to: str | Path) -> list[Path]:
    """See AsyncJob.download."""
    from cumulus._jobs import _Gathered

    end = await ending(job)
    kept = end.outputs
    if kept is None:
        raise _not_found(
            f"Job {job.job_id} kept no outputs: it left no files in its outputs/ folder "
            "(or they were over worker.max_output_bytes: its log says so)",
            job.job_id,
        )
    with contextlib.closing(_Gathered(kept.parts)) as parts:
        await gather(job, end, kept, parts)
        return await asyncio.to_thread(unpack, parts.file, path, Path(to), job.job_id)
