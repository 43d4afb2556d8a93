"""Job directories, the code package cache and the environment cache's keys, shared by every
backend.

A job's attempt has a directory `<root>/<job_id>.<attempt>` (the package, its nonce, and for
the process backend its output and exit); `scan` lists them after a crash. Jobs with the same
requirements share one installed environment, keyed by `requirements_key`: a directory under
`envs/` for the process backend, a volume `cumulus-env-<key>` for the container backends.

Code packages come from the object store into `PackageCache`, a directory of files named by
their object name (`<user>.<sha256>`: content addressed), bounded in bytes; each attempt gets
a copy (`place_package`), never a link: the job owns its `package.zip` and could otherwise
change the copy the next job gets.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import shutil
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import BinaryIO

PACKAGE = "package.zip"
HOLD_S = 600.0
"""A cached package used this recently is never evicted: a launch that fetched it copies it
into its job's directory within this time."""


def requirements_key(requirements: Iterable[str]) -> str:
    """The environment cache key: a hash of the requirements, order and case insensitive."""
    text = "\n".join(sorted(r.strip().lower() for r in requirements))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class JobDirs:
    """The attempts' directories under one root."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, job_id: str, attempt: int) -> Path:
        return self.root / f"{job_id}.{attempt}"

    def write(self, job_id: str, attempt: int, package: Path | bytes, nonce: str) -> Path:
        """Create the attempt's directory with its code package and result nonce."""
        job_dir = self.path(job_id, attempt)
        job_dir.mkdir(parents=True, exist_ok=True)
        place_package(package, job_dir / PACKAGE)
        (job_dir / ".nonce").write_text(nonce)
        return job_dir

    def remove(self, job_id: str, attempt: int) -> None:
        shutil.rmtree(self.path(job_id, attempt), ignore_errors=True)

    def scan(self) -> list[tuple[str, int]]:
        """(job id, attempt) of every attempt's directory present, for reconciling."""
        out = []
        for path in self.root.glob("*.*"):
            job_id, _, attempt = path.name.rpartition(".")
            if attempt.isdigit():
                out.append((job_id, int(attempt)))
        return out


def place_package(package: Path | bytes, dest: Path) -> None:
    """Put a job's code package at `dest`: a copy of the cached file (the kernel copies it,
    nothing passes through this process's memory), or the bytes of a small one."""
    if isinstance(package, bytes):
        dest.write_bytes(package)
    else:
        shutil.copyfile(package, dest)


class PackageCache:
    """Code packages on disk by object name, at most `limit` bytes of them: the least recently
    used go first, but never one used within HOLD_S (a launch may be about to copy it).

    A package is fetched into a temporary file beside its place and renamed there once whole
    (the object store checks its digest as it comes), so a file present is a whole package;
    files of a fetch cut short are removed at the next start.
    """

    def __init__(self, root: Path, limit: int) -> None:
        self.root = root
        self.limit = limit
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._files: OrderedDict[str, tuple[int, float]] = OrderedDict()
        """Object name -> (size, last use), least recently used first."""
        self._fetching: dict[str, asyncio.Event] = {}
        found = []
        for path in root.iterdir():
            if path.name.endswith(".part") or not path.is_file():
                path.unlink(missing_ok=True)
                continue
            st = path.stat()
            found.append((st.st_mtime, path.name, st.st_size))
        for _, name, size in sorted(found):
            self._files[name] = (size, 0.0)

    @property
    def bytes(self) -> int:
        return sum(size for size, _ in self._files.values())

    async def get(self, name: str, fetch: Callable[[BinaryIO], Awaitable[None]]) -> Path:
        """The file of package `name`, fetched with `fetch(file)` unless cached; one fetch at a
        time per package (a launch of a package being fetched waits for that fetch, and
        fetches it itself if that one failed)."""
        while (fetching := self._fetching.get(name)) is not None:
            await fetching.wait()
        path = self.root / name
        if name in self._files:
            self._files[name] = (self._files[name][0], time.monotonic())
            self._files.move_to_end(name)
            if await asyncio.to_thread(path.exists):
                return path
            del self._files[name]  # removed behind our back: fetched again
        fetching = self._fetching[name] = asyncio.Event()
        try:
            size = await asyncio.to_thread(_fetched, await _into(self.root, name, fetch), path)
        finally:
            del self._fetching[name]
            fetching.set()
        self._files[name] = (size, time.monotonic())
        self._files.move_to_end(name)
        self._evict(keep=name)
        return path

    def _evict(self, keep: str) -> None:
        total = self.bytes
        now = time.monotonic()
        for name, (size, used) in list(self._files.items()):
            if total <= self.limit:
                break
            if name == keep or now - used < HOLD_S:
                continue
            (self.root / name).unlink(missing_ok=True)
            del self._files[name]
            total -= size


async def _into(root: Path, name: str, fetch: Callable[[BinaryIO], Awaitable[None]]) -> Path:
    """A temporary file beside the cache entry, filled by `fetch`; removed if it fails."""
    part = root / f"{name}.{secrets.token_hex(4)}.part"
    into = await asyncio.to_thread(open, part, "wb")
    try:
        with into:
            await fetch(into)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return part


def _fetched(part: Path, path: Path) -> int:
    """Give a whole fetched package its name; its size."""
    os.replace(part, path)
    return path.stat().st_size
