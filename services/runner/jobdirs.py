"""Job directories and the environment cache's keys, shared by every backend.

A job's attempt has a directory `<root>/<job_id>.<attempt>` (the package, its nonce, and for
the process backend its output and exit); `scan` lists them after a crash. Jobs with the same
requirements share one installed environment, keyed by `requirements_key`: a directory under
`envs/` for the process backend, a volume `cumulus-env-<key>` for the container backends.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterable
from pathlib import Path


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

    def write(self, job_id: str, attempt: int, package: bytes, nonce: str) -> Path:
        """Create the attempt's directory with its code package and result nonce."""
        job_dir = self.path(job_id, attempt)
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "package.zip").write_bytes(package)
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
