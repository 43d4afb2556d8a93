"""A job's large result on its way to the bus, part by part, in bounded memory.

The in-job runner pickles a value too large for its frame into a file in the job's directory
(job_image/runner.py RESULT_FILE) and its frame says so. The runner reads that file
RESULT_PART_BYTES at a time, hashes it as it goes and publishes each piece as a JobResultPart
(under the worker's own subject) with at most WINDOW of them awaiting the bus's ack: it never
holds more than a few parts, whatever the size. The completed event then carries the parts'
count, size and sha256 (handlers.parts_envelope).

A part's event id is the same whenever it is published again, so a runner that crashed half way
publishes every part again after its restart and the bus drops the copies; a bus that does not
take a part is tried again, from the first part, for up to RETRY_S. The file is the job's, so it
is trusted for nothing: opened without following a link, a regular file with no other name, its
size checked against `worker.max_result_bytes` before a byte is read, and exactly that many
bytes read.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import io
import logging
import os
import stat
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, BinaryIO

import nats.errors

from services.runner import handlers
from services.runner import state as st
from shared import events as ev

log = logging.getLogger(__name__)

WINDOW = 4
"""Parts published and not yet acknowledged at once."""
ACK_S = 30.0
"""How long one part's acknowledgement may take before the parts are published again."""
RETRY_S = 120.0
"""How long a result is tried again while the bus does not take it; then the job fails."""

Part = ev.JobResultPart | ev.JobOutputsPart
Publish = Callable[[Part], Awaitable["asyncio.Future[Any]"]]
"""Publishes a part and returns the future of the bus's acknowledgement."""
MakePart = Callable[[int, int, bytes], Part]
"""The part of a given index (of a count) carrying the given bytes."""


class TooLarge(Exception):
    """A result over the maximum; `size` in bytes."""

    def __init__(self, size: int) -> None:
        super().__init__(f"{size} bytes")
        self.size = size


class ResultError(Exception):
    """A result that cannot be delivered: the job fails with `code` and this message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def open_result(path: Path, limit: int) -> tuple[BinaryIO, int]:
    """The result file, opened for reading, and its size; TooLarge over `limit`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ResultError(
            "INTERNAL", f"The job's result file could not be read ({exc.strerror})"
        ) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise ResultError("INTERNAL", "The job's result file is not a plain file of its own")
    if info.st_size > limit:
        os.close(fd)
        raise TooLarge(info.st_size)
    return os.fdopen(fd, "rb", buffering=0), info.st_size


def _read(source: BinaryIO, n: int) -> bytes:
    chunks: list[bytes] = []
    while n > 0:
        chunk = source.read(n)
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


async def publish_all(source: BinaryIO, size: int, make: MakePart, publish: Publish) -> str:
    """Publish `size` bytes of `source` as the parts `make` makes, in order, with at most
    WINDOW awaiting their acknowledgement; their sha256."""
    count = handlers.part_count(size)
    digest = hashlib.sha256()
    pending: deque[asyncio.Future[Any]] = deque()
    try:
        for index in range(count):
            want = min(handlers.RESULT_PART_BYTES, size - index * handlers.RESULT_PART_BYTES)
            data = await asyncio.to_thread(_read, source, want)
            if len(data) != want:
                raise ResultError("INTERNAL", "The job's result file shrank while it was read")
            digest.update(data)
            pending.append(await publish(make(index, count, data)))
            del data
            while len(pending) >= WINDOW:
                await asyncio.wait_for(pending.popleft(), ACK_S)
        while pending:
            await asyncio.wait_for(pending.popleft(), ACK_S)
    finally:
        for future in pending:  # after a failure: none is left unretrieved
            if future.done() and not future.cancelled():
                future.exception()
            future.cancel()
    return digest.hexdigest()


async def publish_parts(
    job: st.RunJob, worker_id: str, source: BinaryIO, size: int, publish: Publish
) -> str:
    """`publish_all` of the job's result parts, again from the first part while the bus does
    not take them (the copies it has are dropped), for up to RETRY_S; ResultError
    (UNAVAILABLE) after that."""
    deadline = time.monotonic() + RETRY_S
    pause = 0.5
    while True:
        try:
            make = functools.partial(handlers.result_part, job, worker_id)
            return await publish_all(source, size, make, publish)
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            if time.monotonic() + pause > deadline:
                raise ResultError(
                    "UNAVAILABLE",
                    f"The job's result could not be stored: the bus did not take it within "
                    f"{RETRY_S:.0f} s ({exc!r}); run the job again",
                ) from None
            fields = {"job_id": job.job_id, "error": repr(exc)}
            log.warning("result parts not taken; publishing again", extra={"fields": fields})
        await asyncio.sleep(pause)
        pause = min(pause * 2, 5.0)
        source.seek(0)


async def store_file(
    job: st.RunJob, worker_id: str, path: Path, limit: int, publish: Publish, shown: str
) -> bytes:
    """Publish the job's result file as parts; the envelope its completed event carries."""
    source, size = await asyncio.to_thread(open_result, path, limit)
    with contextlib.closing(source):
        digest = await publish_parts(job, worker_id, source, size, publish)
    count = handlers.part_count(size)
    return handlers.parts_envelope(count, size, digest, payload="pickle", shown=shown)


async def store_bytes(job: st.RunJob, worker_id: str, encoded: bytes, publish: Publish) -> bytes:
    """Publish an envelope too large for the completed event (a frame of at most MAX_FRAME)
    as parts; the envelope the completed event carries instead."""
    digest = await publish_parts(job, worker_id, io.BytesIO(encoded), len(encoded), publish)
    return handlers.parts_envelope(handlers.part_count(len(encoded)), len(encoded), digest)
