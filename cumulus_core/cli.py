"""``chronos_cli``: create, release and inspect GPU partitions from the shell.

Usage::

    chronos_cli [--state-dir DIR] [--backend B] [--devices SPEC] [--json] COMMAND ...
      create <device> <amount> <duration> [--label L]
      release <partition_id>
      list [--all]
      available <device>
      stats
      reap

Global options may also follow the command. Defaults: ``--state-dir`` from
``CHRONOS_STATE_DIR`` else ``~/.chronos``; ``--backend`` from ``CHRONOS_DEVICES`` else auto;
``--devices`` (the virtual-device spec, used when virtual devices are chosen) from
``CHRONOS_VIRTUAL_DEVICES`` else ``2x16GiB``.

Human output keeps the upstream Chronos CLI's lines where they exist (first lines below are
upstream's, verbatim in shape), so scripts that scrape them keep working::

    create    Created partition partition_0001 on device 0 (Virtual GPU 16GiB) with 8192 MB \
                for 3600 seconds                       (one line; wrapped here)
              Amount: 0.5 GPU (virtual device), expires at 2026-11-28T23:00:00Z, label: job-1
    release   Partition partition_0001 released
    list      Active partitions:            | No active partitions
              -----------------
              ID: partition_0001
                Device: 0 (Virtual GPU 16GiB, virtual)
                Memory: 50%
                Amount: 0.5 GPU
                Time remaining: 3598 seconds   (list --all: "0 seconds (expired, not yet reaped)")
                Label: job-1                 (only when labelled)
              <blank line after each partition>
    available 50.00                          (percent of the device free, as upstream)
    stats     Device statistics:
              =================
              Device 0: Virtual GPU 16GiB
                Type: GPU (virtual)
                UUID: VIRTUAL-...
                Memory:
                  Total: 16384 MB
                  Used: 8192 MB
                  Available: 8192 MB
                  Usage: 50.00%
                Chronos management:
                  Active partitions: 1
                  Allocated: 0.5 GPU
                  Free: 0.5 GPU
                  Partitions: partition_0001     (only when there are some)
              <blank line after each device>
    reap      Partition partition_0001 expired and released   | No expired partitions

``--json`` prints exactly one JSON object: create/release -> the partition (with ``amount``
and ``env``); list -> ``{"partitions": [...]}``; stats -> ``{"devices": [{index, name, kind,
uuid, memory_bytes, allocated_tenths, free_tenths, partitions}]}``; available ->
``{"device": 0, "free": "0.5", "free_tenths": 5}``; reap -> ``{"reaped": [...]}``.

Errors print one line, ``chronos_cli: error: <message>``, on stderr and never a traceback.
With ``--json`` they also print one object on stdout, the error's seed code, that same message
and the error's attributes::

    {"error": {"code": "NOT_FOUND", "message": "Partition not found or already released:
      partition_0042", "details": {"partition_id": "partition_0042"}}}      (one line)

codes: INVALID_ARGUMENT (bad usage or input), RESOURCE_EXHAUSTED (no capacity: ``device``,
``requested_tenths``, ``free_tenths``), NOT_FOUND (unknown partition: ``partition_id``),
UNAVAILABLE (no devices of a demanded backend; a corrupt state file moved aside, retry),
INTERNAL (unusable state, I/O, our bugs), CANCELLED (interrupted). The attributes of each error
are listed in ``cumulus_core/errors.py``.
Exit codes: 0 success; 2 bad usage or input (INVALID_ARGUMENT); 130 interrupted; 1 anything
else (no capacity, unknown partition, unusable state, no devices).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import msgspec

from .amounts import TENTHS_PER_GPU, format_amount, parse_amount
from .devices import MIB, Device, discover_devices
from .errors import ChronosError, InvalidDevice, InvalidDuration, InvalidRequest
from .partition import DeviceStats, Partition
from .table import PartitionTable

PROG = "chronos_cli"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class _UsageError(Exception):
    """argparse's complaint, raised instead of printing usage and exiting."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status instead of exiting."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Until the arguments parse, the option's presence is all we know of --json.
    as_json = "--json" in argv
    try:
        args = _parser().parse_args(argv)
        as_json = bool(args.json)
        return int(args.run(args))
    except _UsageError as err:
        return _fail(f"{err} (see {PROG} --help)", EXIT_USAGE, as_json, "INVALID_ARGUMENT")
    except ChronosError as err:
        exit_code = EXIT_USAGE if isinstance(err, InvalidRequest) else EXIT_FAILED
        return _fail(str(err), exit_code, as_json, err.code, err.details())
    except OSError as err:
        message = f"{err.strerror or err}: {err.filename or ''}".rstrip(": ")
        path = {"path": str(err.filename)} if err.filename else {}
        return _fail(message, EXIT_FAILED, as_json, "INTERNAL", path)
    except SystemExit as done:  # --help prints and exits 0
        return done.code if isinstance(done.code, int) else EXIT_OK
    except KeyboardInterrupt:
        return _fail("interrupted", 130, as_json, "CANCELLED")
    except Exception as err:  # the promise is one line and no traceback, even for our bugs
        return _fail(f"internal error: {type(err).__name__}: {err}", EXIT_FAILED, as_json)


def _fail(
    message: str,
    exit_code: int,
    as_json: bool = False,
    code: str = "INTERNAL",
    details: dict[str, Any] | None = None,
) -> int:
    """One line on stderr; with --json also `{"error": {code, message, details}}` on stdout."""
    line = " ".join(message.split())
    if as_json:
        _emit({"error": {"code": code, "message": line, "details": details or {}}})
    print(f"{PROG}: error: {line}", file=sys.stderr)
    return exit_code


@functools.cache
def _parser() -> argparse.ArgumentParser:
    """Built once per process (a parser is reusable): a partitioner calls main() in process."""
    return _build_parser()


def _build_parser() -> argparse.ArgumentParser:
    # The same options on the main parser (real defaults) and on every command (SUPPRESS, so
    # they override only when given): `chronos_cli --json list` and `chronos_cli list --json`.
    def add_globals(parser: argparse.ArgumentParser, suppress: bool) -> None:
        def default(value: Any) -> Any:
            return argparse.SUPPRESS if suppress else value

        parser.add_argument(
            "--state-dir",
            default=default(None),
            help="directory holding the partition table (env CHRONOS_STATE_DIR, ~/.chronos)",
        )
        parser.add_argument(
            "--backend",
            default=default(None),
            choices=("auto", "nvidia", "opencl", "virtual"),
            help="device backend (env CHRONOS_DEVICES, default auto)",
        )
        parser.add_argument(
            "--devices",
            default=default(None),
            metavar="SPEC",
            help="virtual devices, e.g. 2x16GiB (env CHRONOS_VIRTUAL_DEVICES)",
        )
        parser.add_argument(
            "--json", action="store_true", default=default(False), help="print one JSON object"
        )

    parser = _Parser(prog=PROG, description="Chronos GPU partition manager")
    add_globals(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Any, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        add_globals(sub, suppress=True)
        sub.set_defaults(run=run)
        return sub

    create = command("create", _create, "create a partition")
    create.add_argument("device", help="device index")
    create.add_argument("amount", help="0.1-0.9 in steps of 0.1, or 1")
    create.add_argument("duration", help="seconds, at least 1")
    create.add_argument("--label", help="free text to find the partition by, e.g. a job id")
    release = command("release", _release, "release a partition")
    release.add_argument("partition_id")
    listing = command("list", _list, "list live partitions")
    listing.add_argument("--all", action="store_true", help="include expired, unreaped ones")
    available = command("available", _available, "free share of a device")
    available.add_argument("device", help="device index")
    command("stats", _stats, "every device and what is allocated on it")
    command("reap", _reap, "release every expired partition")
    return parser


def _table(args: argparse.Namespace) -> PartitionTable:
    # The environment is read here, per call, not when the (cached) parser was built.
    state_dir = args.state_dir or os.environ.get("CHRONOS_STATE_DIR") or "~/.chronos"
    return PartitionTable(Path(state_dir), discover_devices(args.devices, args.backend))


def _device_index(text: str, table: PartitionTable) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise InvalidDevice(text, len(table.devices)) from None


def _create(args: argparse.Namespace) -> int:
    table = _table(args)
    device = _device_index(args.device, table)
    tenths = parse_amount(args.amount)
    try:
        duration = int(args.duration.strip())
    except ValueError:
        raise InvalidDuration(args.duration) from None
    partition = table.create(device, tenths, duration, label=args.label)
    if args.json:
        return _emit(_partition_json(partition))
    target = table.devices[device]
    print(
        f"Created partition {partition.partition_id} on device {device} ({target.name}) "
        f"with {partition.memory_bytes // MIB} MB for {duration} seconds"
    )
    details = [
        f"Amount: {partition.amount} GPU ({target.kind} device)",
        f"expires at {_iso(partition.expires_at)}",
    ]
    if partition.label is not None:
        details.append(f"label: {partition.label}")
    print(", ".join(details))
    return EXIT_OK


def _release(args: argparse.Namespace) -> int:
    partition = _table(args).release(args.partition_id)
    if args.json:
        return _emit(_partition_json(partition))
    print(f"Partition {partition.partition_id} released")
    return EXIT_OK


def _list(args: argparse.Namespace) -> int:
    table = _table(args)
    partitions = table.list(include_expired=args.all)
    if args.json:
        return _emit({"partitions": [_partition_json(p) for p in partitions]})
    if not partitions:
        print("No active partitions")
        return EXIT_OK
    print("Active partitions:")
    print("-----------------")
    now = table.clock()
    for p in partitions:
        print(f"ID: {p.partition_id}")
        print(f"  Device: {p.device} ({_device_label(table.devices, p.device)})")
        print(f"  Memory: {p.tenths * 100 // TENTHS_PER_GPU}%")
        print(f"  Amount: {p.amount} GPU")
        if p.expired(now):
            print("  Time remaining: 0 seconds (expired, not yet reaped)")
        else:
            print(f"  Time remaining: {int(p.expires_at - now)} seconds")
        if p.label is not None:
            print(f"  Label: {p.label}")
        print()
    return EXIT_OK


def _available(args: argparse.Namespace) -> int:
    table = _table(args)
    device = _device_index(args.device, table)
    free = table.available(device)
    if args.json:
        return _emit({"device": device, "free": format_amount(free), "free_tenths": free})
    print(f"{free * 100 / TENTHS_PER_GPU:.2f}")
    return EXIT_OK


def _stats(args: argparse.Namespace) -> int:
    stats = _table(args).stats()
    if args.json:
        return _emit({"devices": msgspec.to_builtins(stats)})
    print("Device statistics:")
    print("=================")
    for device in stats:
        _print_device(device)
    return EXIT_OK


def _print_device(device: DeviceStats) -> None:
    used = device.memory_bytes * device.allocated_tenths // TENTHS_PER_GPU
    print(f"Device {device.index}: {device.name}")
    print(f"  Type: GPU ({device.kind})")
    print(f"  UUID: {device.uuid}")
    print("  Memory:")
    print(f"    Total: {device.memory_bytes // MIB} MB")
    print(f"    Used: {used // MIB} MB")
    print(f"    Available: {(device.memory_bytes - used) // MIB} MB")
    print(f"    Usage: {device.allocated_tenths * 100 / TENTHS_PER_GPU:.2f}%")
    print("  Chronos management:")
    print(f"    Active partitions: {len(device.partitions)}")
    print(f"    Allocated: {format_amount(device.allocated_tenths)} GPU")
    print(f"    Free: {format_amount(device.free_tenths)} GPU")
    if device.partitions:
        print(f"    Partitions: {', '.join(device.partitions)}")
    print()


def _reap(args: argparse.Namespace) -> int:
    reaped = _table(args).reap()
    if args.json:
        return _emit({"reaped": [_partition_json(p) for p in reaped]})
    for p in reaped:
        print(f"Partition {p.partition_id} expired and released")
    if not reaped:
        print("No expired partitions")
    return EXIT_OK


def _partition_json(partition: Partition) -> dict[str, Any]:
    encoded: dict[str, Any] = msgspec.to_builtins(partition)
    encoded["amount"] = partition.amount
    return encoded


def _emit(document: dict[str, Any]) -> int:
    sys.stdout.write(msgspec.json.encode(document).decode() + "\n")
    return EXIT_OK


def _device_label(devices: Sequence[Device], index: int) -> str:
    if 0 <= index < len(devices):
        return f"{devices[index].name}, {devices[index].kind}"
    return "not present now"


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
