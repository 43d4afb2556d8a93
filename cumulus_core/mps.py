"""The CUDA MPS control daemon's command lines and environment, as pure values.

A fractional share is enforced by MPS only while a control daemon runs: the client limits
`cumulus_core.env.partition_env` sets (pinned device memory, active thread percentage) are
read by the MPS server the daemon starts, and ignored by a plain CUDA context. Nothing here
starts a process; scripts/gpu_check.py runs these commands for its test, in a private pipe
and log directory so a daemon the machine already has is left alone.
"""

from __future__ import annotations

import os
from pathlib import Path

MPS_CONTROL = "nvidia-cuda-mps-control"
PIPE_DIRECTORY = "CUDA_MPS_PIPE_DIRECTORY"
LOG_DIRECTORY = "CUDA_MPS_LOG_DIRECTORY"
QUIT = "quit\n"
"""What `nvidia-cuda-mps-control` reads on standard input to stop its daemon and server."""


def mps_env(base_dir: Path | str) -> dict[str, str]:
    """The pipe and log directories of a private daemon under `base_dir`; its clients (the
    jobs) need the same pipe directory to reach it."""
    base = Path(base_dir)
    return {PIPE_DIRECTORY: str(base / "pipe"), LOG_DIRECTORY: str(base / "log")}


def mps_start_command(control: str = MPS_CONTROL) -> list[str]:
    """Starts the control daemon in the background (`-d`); it returns once the daemon runs."""
    return [control, "-d"]


def mps_stop_command(control: str = MPS_CONTROL) -> tuple[list[str], str]:
    """The command and standard input that stop the daemon reached through the environment."""
    return [control], QUIT


def find_mps_control(path: str | None = None) -> str | None:
    """The control program on `path` (default $PATH), or None where this machine has no MPS."""
    for directory in (path if path is not None else os.environ.get("PATH", "")).split(os.pathsep):
        if not directory:
            continue
        candidate = Path(directory) / MPS_CONTROL
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None
