"""A job's `outputs/` folder, kept after the job ends for `cumulus download`.

The in-job runner runs the job in `work/` of its directory (job_image/runner.py), so what the
job leaves in `work/outputs/` is on this host when it ends (the process backend's directory,
or the directory bind-mounted at `/job` in a container). Before it reports the end, the runner
packs that folder into a gzipped tar, publishes it as JobOutputsPart events under the worker's
own subject (stream RESULTS, kept for `retention.results_ttl_s`), and the end carries their
count, size and sha256 (`ev.OutputsKept`).

The files are the job's, so they are trusted for nothing: every directory is opened without
following a link (a job that swapped `work` or `outputs` for a link to the host gets nothing
kept), only regular files with no other name and folders are packed (links, devices and
pipes are left out), and the file bytes stop at `worker.max_output_bytes`.
"""

from __future__ import annotations

import asyncio
import functools
import os
import stat
import tarfile
import tempfile
from pathlib import Path
from typing import BinaryIO

from services.runner import handlers, results
from services.runner import state as st
from shared import events as ev

FOLDER = ("work", "outputs")
"""Where the outputs are, under the job's directory (its working directory's `outputs/`)."""
MAX_ENTRIES = 100_000
"""Files and folders packed at most (a folder of a million empty files is not kept)."""
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class NotKept(Exception):
    """The outputs cannot be kept; the message says why (shown in the job's log)."""


def _open_folder(job_dir: Path) -> int | None:
    """The outputs folder, opened without following a link; None if there is none."""
    try:
        fd = os.open(job_dir, _OPEN | os.O_DIRECTORY)
    except OSError:
        return None
    for name in FOLDER:
        try:
            inner = os.open(name, _OPEN | os.O_DIRECTORY, dir_fd=fd)
        except OSError:  # missing, a file, or a link (ELOOP)
            inner = -1
        os.close(fd)
        if inner < 0:
            return None
        fd = inner
    return fd


def pack(job_dir: Path, limit: int, into: BinaryIO) -> int:
    """Pack the job's outputs folder into `into` (a gzipped tar); how many files it holds.
    NotKept when the files hold more than `limit` bytes or there are too many."""
    top = _open_folder(job_dir)
    if top is None:
        return 0
    files = total = entries = 0
    try:
        with tarfile.open(fileobj=into, mode="w:gz") as tar:
            walk = os.fwalk(".", dir_fd=top, follow_symlinks=False)
            for path, dirnames, filenames, dirfd in walk:
                dirnames.sort()
                where = os.path.normpath(path)
                if where != ".":
                    folder = tarfile.TarInfo(where)
                    folder.type, folder.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(folder)
                for name in sorted(filenames):
                    entries += 1
                    if entries > MAX_ENTRIES:
                        raise NotKept(f"outputs/ holds more than {MAX_ENTRIES} entries")
                    try:
                        fd = os.open(name, _OPEN, dir_fd=dirfd)
                    except OSError:  # a link (ELOOP) or gone
                        continue
                    with os.fdopen(fd, "rb") as source:
                        info = os.fstat(fd)
                        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                            continue
                        total += info.st_size
                        if total > limit:
                            raise NotKept(
                                f"outputs/ holds more than {limit} bytes (worker.max_output_bytes)"
                            )
                        member = tarfile.TarInfo(os.path.normpath(os.path.join(where, name)))
                        member.size = info.st_size
                        member.mode = 0o755 if info.st_mode & 0o111 else 0o644
                        member.mtime = int(info.st_mtime)
                        tar.addfile(member, source)
                        files += 1
    finally:
        os.close(top)
    return files


def part(job: st.RunJob, worker_id: str, index: int, count: int, data: bytes) -> ev.JobOutputsPart:
    """One part of the outputs; the same event id whenever made again (a restarted runner's
    copies are dropped as duplicates)."""
    return ev.JobOutputsPart(
        event_id=f"outputs-{job.job_id}-{job.attempt}-{index}",
        attempt=job.attempt,
        index=index,
        count=count,
        data=data,
        **handlers._common(job, worker_id),
    )


async def keep(
    job: st.RunJob, worker_id: str, job_dir: Path, limit: int, publish: results.Publish
) -> ev.OutputsKept | None:
    """Pack and publish the job's outputs; what its end says of them (None: no outputs/, or
    nothing in it). NotKept when they are over the limits."""
    if not job_dir.joinpath(*FOLDER).is_dir():  # most jobs: no spool file, no thread
        return None
    with tempfile.TemporaryFile() as spool:
        files = await asyncio.to_thread(pack, job_dir, limit, spool)
        if not files:
            return None
        size = spool.tell()
        spool.seek(0)
        make = functools.partial(part, job, worker_id)
        digest = await results.publish_all(spool, size, make, publish)
    return ev.OutputsKept(parts=handlers.part_count(size), size=size, sha256=digest, files=files)
