"""Driving chronos_cli: our cumulus_core (`python -m cumulus_core`) or another binary by path.

The partitioner only ever runs the CLI, as the seed's orchestrator does, so the same code
drives a local worker and (through a different `Runner`) an agentless one over SSH.

The contract callers code against:

- every failure of a `Chronos` method is a `shared.errors.CumulusError`, typed by its code;
- an unknown partition on `release` is `shared.errors.NotFound` (`resource_id`: its id);
- no room on the device is `ResourceExhausted` (`requested`, `largest_free`: amounts such as
  "0.5"), bad input is `InvalidArgument`, a corrupt state file moved aside is `Unavailable`
  (the retry works);
- the worker or the binary cannot be reached at all (SSH connection failed or lost, the local
  binary cannot be started) is `ChronosUnreachable`, a subclass of `shared.errors.Unavailable`;
  a command that timed out or was killed, or a binary missing on an SSH worker, is a plain
  `Unavailable`. Every `Unavailable` names the worker (`worker_id`) when this `Chronos` knows it.

Our chronos_cli prints its error as JSON with `--json` (`{"error": {"code", "message",
"details"}}`), rebuilt with `CumulusError.from_dict`. A chronos_cli that prints no JSON error
(an older one, another implementation) is typed by its exit code alone, never by its words:
2 is `InvalidArgument`; 126 and 127 (cannot run, not found) and a kill by a signal are
`Unavailable`; anything else is `Internal`, except that a failed `release` then lists the
partitions and, when the id is not among them, raises `NotFound`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cumulus_core.amounts import format_amount
from services.partitioner.types import (
    DeviceStats,
    Partition,
    as_devices,
    as_partition,
    as_partitions,
)
from shared.errors import (
    CumulusError,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
)

ChronosError = CumulusError
"""Deprecated alias, kept for one release: catch `shared.errors.CumulusError` (or a subclass)."""


class ChronosUnreachable(Unavailable):
    """The worker or its chronos_cli could not be reached at all (SSH down, binary missing)."""


EXIT_USAGE = 2
"""chronos_cli's exit status for bad usage or input."""
EXIT_CANNOT_RUN = frozenset({126, 127})
"""A shell's exit statuses for a command it found but could not run, or did not find."""


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
        raise Unavailable(f"{shlex.join(argv[:3])} … timed out after {timeout:.0f} s") from None
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
    """One worker's chronos_cli; its failures are typed `CumulusError`s (module docstring)."""

    command: Sequence[str] = field(default_factory=lambda: [sys.executable, "-m", "cumulus_core"])
    options: Sequence[str] = ()
    """Global options, e.g. --state-dir and --devices."""
    run: CommandRunner = run_local
    timeout: float = 30.0
    worker_id: str = ""
    """The worker this chronos_cli serves, named by the `Unavailable` errors it raises."""

    async def _call(self, *args: str) -> Any:
        code, out, err = await self._run(*args)
        return self._result(code, out, err)

    async def _run(self, *args: str) -> tuple[int, str, str]:
        argv = [*self.command, "--json", *self.options, *args]
        try:
            return await self.run(argv, self.timeout)
        except Unavailable as exc:
            self._named(exc)
            raise

    def _result(self, code: int, out: str, err: str) -> Any:
        """The JSON document of a success; for a failure, the typed error it stands for."""
        if code != 0:
            reported = _json_error(out)
            if reported is not None:
                raise self._named(CumulusError.from_dict(_shared_vocabulary(reported)))
            line = (err.strip().splitlines() or [f"exit code {code}"])[-1]
            raise self._named(_by_exit_code(code, line.removeprefix("chronos_cli: error: ")))
        try:
            return json.loads(out)
        except ValueError:
            raise Internal(
                f"chronos_cli printed something that is not JSON: {out[:200]!r}"
            ) from None

    def _named(self, exc: CumulusError) -> CumulusError:
        if isinstance(exc, Unavailable) and not exc.worker_id:
            exc.worker_id = self.worker_id
        return exc

    async def stats(self) -> list[DeviceStats]:
        return as_devices((await self._call("stats"))["devices"])

    async def create(self, device: int, tenths: int, duration_s: int, label: str) -> Partition:
        return as_partition(
            await self._call(
                "create", str(device), format_amount(tenths), str(duration_s), "--label", label
            )
        )

    async def release(self, partition_id: str) -> None:
        """Release one partition; `NotFound` when no partition has this id (any more)."""
        code, out, err = await self._run("release", partition_id)
        try:
            self._result(code, out, err)
        except Internal as exc:
            if code == 0 or _json_error(out) is not None:
                raise  # chronos_cli typed it itself, or the failure is its output
            # Typed by exit code only: whether the partition is still there says NotFound.
            try:
                listed = await self._call("list", "--all")
                held = {p["partition_id"] for p in listed["partitions"]}
            except (CumulusError, KeyError, TypeError):
                raise exc from None
            if partition_id not in held:
                raise NotFound(exc.message, resource_id=partition_id) from None
            raise

    async def partitions(self) -> list[Partition]:
        return as_partitions((await self._call("list"))["partitions"])

    async def reap(self) -> list[Partition]:
        return as_partitions((await self._call("reap"))["reaped"])


def _json_error(out: str) -> Mapping[str, Any] | None:
    """The `{"code", "message", "details"}` a chronos_cli --json printed for its failure."""
    try:
        document = json.loads(out) if out.strip() else None
    except ValueError:
        return None
    error = document.get("error") if isinstance(document, dict) else None
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        return error
    return None


def _shared_vocabulary(error: Mapping[str, Any]) -> dict[str, Any]:
    """chronos_cli's error attributes under the names `shared.errors` declares."""
    details = error.get("details")
    details = dict(details) if isinstance(details, Mapping) else {}
    code = error.get("code")
    if code == "NOT_FOUND" and "partition_id" in details:
        details.setdefault("resource_id", str(details["partition_id"]))
    if code == "RESOURCE_EXHAUSTED":
        for tenths, amount in (("requested_tenths", "requested"), ("free_tenths", "largest_free")):
            if isinstance(details.get(tenths), int):
                details.setdefault(amount, format_amount(details[tenths]))
    return {**error, "details": details}


def _by_exit_code(code: int, message: str) -> CumulusError:
    """The typed error of a chronos_cli that printed no JSON error: its exit status decides."""
    if code == EXIT_USAGE:
        return InvalidArgument(message)
    if code in EXIT_CANNOT_RUN or code < 0:
        return Unavailable(message)
    return Internal(message)
