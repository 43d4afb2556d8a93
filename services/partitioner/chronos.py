"""Driving chronos_cli: our cumulus_core (`python -m cumulus_core`) or another binary by path.

The partitioner only ever runs the CLI, as the seed's orchestrator does, so the same code
drives a local worker and (through a different `Runner`) an agentless one over SSH.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cumulus_core.amounts import format_amount


class ChronosError(Exception):
    """chronos_cli failed; `message` is its one-line error."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class ChronosUnreachable(ChronosError):
    """The worker could not be reached at all (SSH down, binary missing)."""


class CommandRunner(Protocol):
    async def __call__(self, argv: Sequence[str], timeout: float) -> tuple[int, str, str]: ...


async def run_local(argv: Sequence[str], timeout: float) -> tuple[int, str, str]:
    """Run a command on this machine; (exit code, stdout, stderr)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
    except OSError as exc:
        raise ChronosUnreachable(f"cannot run {argv[0]}: {exc}") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise ChronosError(f"{shlex.join(argv[:3])} … timed out after {timeout:.0f} s") from None
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


IN_PROCESS = "chronos_cli"
"""The command name that `run_in_process` answers: our own cumulus_core, without a process."""


async def run_in_process(argv: Sequence[str], timeout: float) -> tuple[int, str, str]:
    """Run our chronos_cli's `main` in this process: the same table, locks and JSON, ~1 ms.

    A subprocess costs ~130 ms of CPU for a Python start-up; the partition table is safe
    across processes (file locks), so the in-process call and any chronos_cli started by hand
    see one table. It runs on the event loop's thread, so redirecting stdout is safe.
    """
    from cumulus_core.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv[1:]))
    return code, out.getvalue(), err.getvalue()


@dataclass
class Chronos:
    """One worker's chronos_cli."""

    command: Sequence[str] = field(default_factory=lambda: [sys.executable, "-m", "cumulus_core"])
    options: Sequence[str] = ()
    """Global options, e.g. --state-dir and --devices."""
    run: CommandRunner = run_local
    timeout: float = 30.0

    async def _call(self, *args: str) -> Any:
        argv = [*self.command, "--json", *self.options, *args]
        code, out, err = await self.run(argv, self.timeout)
        if code != 0:
            line = (err.strip().splitlines() or [f"exit code {code}"])[-1]
            line = line.removeprefix("chronos_cli: error: ")
            raise ChronosError(line, code)
        try:
            return json.loads(out)
        except ValueError:
            raise ChronosError(
                f"chronos_cli printed something that is not JSON: {out[:200]!r}"
            ) from None

    async def stats(self) -> list[dict[str, Any]]:
        return list((await self._call("stats"))["devices"])

    async def create(self, device: int, tenths: int, duration_s: int, label: str) -> dict[str, Any]:
        return dict(
            await self._call(
                "create", str(device), format_amount(tenths), str(duration_s), "--label", label
            )
        )

    async def release(self, partition_id: str) -> None:
        await self._call("release", partition_id)

    async def partitions(self) -> list[dict[str, Any]]:
        partitions: list[dict[str, Any]] = (await self._call("list"))["partitions"]
        return partitions

    async def reap(self) -> list[dict[str, Any]]:
        reaped: list[dict[str, Any]] = (await self._call("reap"))["reaped"]
        return reaped
