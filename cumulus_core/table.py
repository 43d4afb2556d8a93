"""The partition table: one JSON file under a state directory, shared by many processes.

Every operation holds an exclusive `fcntl.flock` on ``partitions.lock`` for its whole
read-modify-write, and writes ``partitions.json`` atomically (temp file, `os.replace`), so
concurrent ``chronos_cli`` processes never over-commit a device and a crashed process never
leaves a half-written table. There is no fsync: a partition cannot outlive its machine (a GPU
forgets everything on reboot), so the table only has to survive processes, not power loss;
a file left damaged by a power cut is recovered like any corrupt one. The fsyncs cost ~4 ms
per call, most of a create.

Expired partitions hold nothing: `list`, `available`, `stats` and `create` ignore them from
the expiry instant on, while `reap` removes them (so a caller can report each one once) and
`release` still accepts them. Partition ids count up from ``partition_0001`` and are never
reused: the counter is stored in the file. A corrupt file is moved aside to
``partitions.json.corrupt-<UTC timestamp>`` and replaced by an empty table whose counter is
carried past every id still readable in the moved-aside files; the operation that found it
raises `StateRecovered` naming the moved file (the CLI prints it as its one stderr line), so
the loss is reported once and the next operation proceeds: no crash loop.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from .amounts import TENTHS_PER_GPU, format_amount
from .devices import Device
from .env import partition_env
from .errors import (
    AmountExceedsDevice,
    InsufficientCapacity,
    InvalidAmount,
    InvalidDevice,
    InvalidDuration,
    InvalidLabel,
    NotFound,
    StateError,
    StateRecovered,
)
from .partition import DeviceStats, Partition

STATE_FILE = "partitions.json"
LOCK_FILE = "partitions.lock"
STATE_VERSION = 1
MAX_LABEL_LENGTH = 128

Partitions = list[Partition]
DevicesStats = list[DeviceStats]
_ID_PATTERN = re.compile(rb"partition_(\d+)")


class _State(msgspec.Struct):
    """The file's content; `next_id` is the number the next partition id gets."""

    version: int = STATE_VERSION
    next_id: int = 1
    partitions: Partitions = []


class PartitionTable:
    """Time-bounded partitions of `devices`, persisted under `state_dir`.

    `clock` returns epoch seconds; tests inject one to move time without sleeping.
    """

    def __init__(
        self,
        state_dir: Path | str,
        devices: Sequence[Device],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state_dir = Path(state_dir).expanduser()
        self.devices = list(devices)
        self.clock = clock

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    def create(
        self, device: int, tenths: int, duration_s: int, label: str | None = None
    ) -> Partition:
        """A new partition of `tenths` of `device` for `duration_s` seconds, or a clear error."""
        target = self._device(device)
        _check_tenths(tenths)
        if isinstance(duration_s, bool) or not isinstance(duration_s, int) or duration_s < 1:
            raise InvalidDuration(duration_s)
        if label is not None:
            _check_label(label)
        with self._locked() as state:
            now = self.clock()
            free = TENTHS_PER_GPU - _held(state.partitions, device, now)
            if tenths > free:
                raise InsufficientCapacity(device, tenths, free)
            bare = Partition(
                partition_id=f"partition_{state.next_id:04d}",
                device=device,
                tenths=tenths,
                memory_bytes=target.memory_bytes * tenths // TENTHS_PER_GPU,
                created_at=now,
                expires_at=now + duration_s,
                label=label,
            )
            partition = msgspec.structs.replace(bare, env=partition_env(bare, target))
            state.partitions.append(partition)
            state.next_id += 1
            self._write(state)
        return partition

    def release(self, partition_id: str) -> Partition:
        """Remove a partition (live, or expired and not yet reaped) and return it."""
        with self._locked() as state:
            for position, partition in enumerate(state.partitions):
                if partition.partition_id == partition_id:
                    del state.partitions[position]
                    self._write(state)
                    return partition
        raise NotFound(partition_id)

    def get(self, partition_id: str) -> Partition:
        """The partition with this id, expired or not, until it is released or reaped."""
        with self._locked() as state:
            for partition in state.partitions:
                if partition.partition_id == partition_id:
                    return partition
        raise NotFound(partition_id)

    def list(self, include_expired: bool = False) -> Partitions:
        """Partitions in id order; expired ones only when asked for."""
        with self._locked() as state:
            now = self.clock()
            return [p for p in state.partitions if include_expired or not p.expired(now)]

    def find(self, label: str) -> Partitions:
        """Live partitions carrying `label`, in id order."""
        return [p for p in self.list() if p.label == label]

    def available(self, device: int) -> int:
        """Free tenths of `device`: 10 minus what its live partitions hold."""
        self._device(device)
        with self._locked() as state:
            return TENTHS_PER_GPU - _held(state.partitions, device, self.clock())

    def stats(self) -> DevicesStats:
        """Every device with the tenths its live partitions hold and their ids."""
        live = self.list()
        result = []
        for device in self.devices:
            mine = [p for p in live if p.device == device.index]
            allocated = sum(p.tenths for p in mine)
            result.append(
                DeviceStats(
                    index=device.index,
                    name=device.name,
                    kind=device.kind,
                    uuid=device.uuid,
                    memory_bytes=device.memory_bytes,
                    allocated_tenths=allocated,
                    free_tenths=TENTHS_PER_GPU - allocated,
                    partitions=[p.partition_id for p in mine],
                )
            )
        return result

    def reap(self, now: float | None = None) -> Partitions:
        """Remove and return every partition expired at `now` (default: the clock)."""
        with self._locked() as state:
            instant = self.clock() if now is None else now
            expired = [p for p in state.partitions if p.expired(instant)]
            if expired:
                state.partitions = [p for p in state.partitions if not p.expired(instant)]
                self._write(state)
            return expired

    def _device(self, device: int) -> Device:
        if isinstance(device, bool) or not isinstance(device, int):
            raise InvalidDevice(device, len(self.devices))
        if not 0 <= device < len(self.devices):
            raise InvalidDevice(device, len(self.devices))
        return self.devices[device]

    @contextmanager
    def _locked(self) -> Iterator[_State]:
        """The state, read under the exclusive lock that is held until the block ends."""
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(self.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise StateError(self.state_dir, f"cannot open the state directory: {err}") from err
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            yield self._read()
        finally:
            os.close(lock_fd)  # closing the descriptor drops the flock

    def _read(self) -> _State:
        try:
            data = self.state_file.read_bytes()
        except FileNotFoundError:
            return _State()
        try:
            state = msgspec.json.decode(data, type=_State)
            problem = _inconsistency(state)
        except msgspec.DecodeError as err:
            problem = str(err)
        if problem is None:
            return state
        if _newer_version(data):
            raise StateError(
                self.state_file, "written by a newer Chronos; upgrade cumulus_core to read it"
            )
        raise self._recover(problem)

    def _recover(self, problem: str) -> StateRecovered:
        """Move a corrupt file aside and start empty, keeping ids unique across the move."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        moved = self.state_file.with_name(f"{STATE_FILE}.corrupt-{stamp}")
        os.replace(self.state_file, moved)
        seen = [
            int(number)
            for aside in self.state_dir.glob(f"{STATE_FILE}.corrupt-*")
            for number in _ID_PATTERN.findall(aside.read_bytes())
        ]
        self._write(_State(next_id=max(seen, default=0) + 1))
        return StateRecovered(self.state_file, moved, problem)

    def _write(self, state: _State) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.state_dir, prefix=f".{STATE_FILE}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(msgspec.json.encode(state))
            os.replace(tmp, self.state_file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _newer_version(data: bytes) -> bool:
    """True when the file names a state version above ours: not corrupt, just newer."""
    try:
        version = msgspec.json.decode(data, type=dict[str, object]).get("version")
    except msgspec.DecodeError:
        return False
    return isinstance(version, int) and version > STATE_VERSION


def _held(partitions: Partitions, device: int, now: float) -> int:
    return sum(p.tenths for p in partitions if p.device == device and not p.expired(now))


def _check_tenths(tenths: int) -> None:
    if isinstance(tenths, bool) or not isinstance(tenths, int):
        raise TypeError(f"tenths must be an int count of tenths of a GPU, got {tenths!r}")
    if tenths < 1:
        raise InvalidAmount(format_amount(tenths))
    if tenths > TENTHS_PER_GPU:
        raise AmountExceedsDevice(tenths, format_amount(tenths))


def _check_label(label: str) -> None:
    if not label or len(label) > MAX_LABEL_LENGTH or not label.isprintable():
        raise InvalidLabel(label)


def _inconsistency(state: _State) -> str | None:
    """Why a well-formed file still cannot be trusted, or None when it can."""
    if state.version != STATE_VERSION:
        return f"unknown state version {state.version}"
    ids = [p.partition_id for p in state.partitions]
    if len(set(ids)) != len(ids):
        return "a partition id appears twice"
    numbers = [int(m.group(1)) for i in ids if (m := _ID_PATTERN.fullmatch(i.encode()))]
    if len(numbers) != len(ids) or (numbers and max(numbers) >= state.next_id):
        return "partition ids do not match the id counter"
    for p in state.partitions:
        if not 1 <= p.tenths <= TENTHS_PER_GPU or p.expires_at <= p.created_at:
            return f"{p.partition_id} has an impossible amount or lifetime"
    return None
