"""The errors Chronos raises on purpose, each with the seed's error code.

    ChronosError                      code
    ├── InvalidRequest (ValueError)   INVALID_ARGUMENT   bad input: the CLI exits 2
    │   ├── InvalidAmount             (amount)
    │   ├── AmountExceedsDevice       (tenths)
    │   ├── InvalidDevice             (device, device_count)
    │   ├── InvalidDuration           (duration_s)
    │   ├── InvalidLabel              (label)
    │   └── InvalidDeviceSpec         (spec)
    ├── InsufficientCapacity          RESOURCE_EXHAUSTED (device, requested_tenths, free_tenths)
    ├── NotFound                      NOT_FOUND          (partition_id)
    ├── DeviceUnavailable             UNAVAILABLE        (backend)
    └── StateError                    INTERNAL           (path)
        └── StateRecovered            UNAVAILABLE        (moved_to): retry succeeds

cumulus_core stands alone, so these do not derive from `shared.errors`; the `code` class
attribute is the seed code a service maps them to, and `to_dict()` is the shape
`chronos_cli --json` prints under `"error"` (`{"code", "message", "details"}`), which
`shared.errors.CumulusError.from_dict()` turns back into a typed error. `details()` holds the
attributes in parentheses above.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .tenths import format_amount


class ChronosError(Exception):
    """Root of every error cumulus_core raises on purpose; `str(err)` is the user's message."""

    code: ClassVar[str] = "INTERNAL"
    fields: ClassVar[tuple[str, ...]] = ()
    """The attributes this class declares; they travel in `details()`."""

    def details(self) -> dict[str, Any]:
        """The declared attributes as JSON values (a path or other object becomes its text)."""
        out: dict[str, Any] = {}
        for name in self.fields:
            value = getattr(self, name, None)
            if value is None:
                continue
            out[name] = value if isinstance(value, str | int | float | bool) else str(value)
        return out

    def to_dict(self) -> dict[str, Any]:
        """`{"code", "message", "details"}`: what `chronos_cli --json` prints under "error"."""
        return {"code": self.code, "message": str(self), "details": self.details()}


class InvalidRequest(ChronosError, ValueError):
    """The caller asked for something malformed; retrying unchanged cannot succeed."""

    code = "INVALID_ARGUMENT"


def _shown(value: object, limit: int = 40) -> str:
    """A value as a message quotes it: whole if short, else cut with its length (the same
    words as the orchestrator's `shared.errors.shown`, which this package does not import)."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


class InvalidAmount(InvalidRequest):
    """A GPU amount outside 0.1-0.9 (steps of 0.1) or whole 1-8; `amount` is the input as given."""

    fields: ClassVar[tuple[str, ...]] = ("amount",)

    def __init__(self, amount: object) -> None:
        super().__init__(
            f"Invalid GPU amount: {_shown(amount)}. Must be 0.1-0.9 or whole number 1-8"
        )
        self.amount = amount


class AmountExceedsDevice(InvalidRequest):
    """A valid amount above 1: one partition lives on one device."""

    fields: ClassVar[tuple[str, ...]] = ("tenths",)

    def __init__(self, tenths: int, text: str) -> None:
        super().__init__(
            f"A partition lives on one device: amount {text} exceeds 1 GPU. "
            "Create one partition of amount 1 per device for a multi-GPU job"
        )
        self.tenths = tenths


class InvalidDevice(InvalidRequest):
    """A device index this machine does not have."""

    fields: ClassVar[tuple[str, ...]] = ("device", "device_count")

    def __init__(self, device: object, device_count: int) -> None:
        have = f"devices 0-{device_count - 1}" if device_count else "no devices"
        super().__init__(f"Invalid device index: {device}. This machine has {have}")
        self.device = device
        self.device_count = device_count


class InvalidDuration(InvalidRequest):
    """A partition duration that is not a whole number of seconds >= 1."""

    fields: ClassVar[tuple[str, ...]] = ("duration_s",)

    def __init__(self, duration_s: object) -> None:
        super().__init__(
            f"Invalid duration: {duration_s}. Must be a whole number of seconds, at least 1"
        )
        self.duration_s = duration_s


class InvalidLabel(InvalidRequest):
    """A label that would not survive one-line output (empty, too long, control characters)."""

    fields: ClassVar[tuple[str, ...]] = ("label",)

    def __init__(self, label: str) -> None:
        super().__init__(
            f"Invalid label: {label!r}. Use 1-128 printable characters without line breaks"
        )
        self.label = label


class InvalidDeviceSpec(InvalidRequest):
    """A virtual-device declaration or backend name that cannot be parsed."""

    fields: ClassVar[tuple[str, ...]] = ("spec",)

    def __init__(self, spec: str, reason: str) -> None:
        super().__init__(f"Invalid device spec {spec!r}: {reason}")
        self.spec = spec


class InsufficientCapacity(ChronosError):
    """The device has less free share than requested; amounts are in tenths of a GPU."""

    code = "RESOURCE_EXHAUSTED"
    fields: ClassVar[tuple[str, ...]] = ("device", "requested_tenths", "free_tenths")

    def __init__(self, device: int, requested_tenths: int, free_tenths: int) -> None:
        super().__init__(
            f"Not enough available capacity on device {device}: requested "
            f"{format_amount(requested_tenths)} GPU, free {format_amount(free_tenths)} GPU. "
            "Release a partition, wait for one to expire, or request less"
        )
        self.device = device
        self.requested_tenths = requested_tenths
        self.free_tenths = free_tenths


class NotFound(ChronosError):
    """No live or expired-but-unreaped partition has this id."""

    code = "NOT_FOUND"
    fields: ClassVar[tuple[str, ...]] = ("partition_id",)

    def __init__(self, partition_id: str) -> None:
        super().__init__(f"Partition not found or already released: {partition_id}")
        self.partition_id = partition_id


class DeviceUnavailable(ChronosError):
    """A backend was demanded explicitly (CHRONOS_DEVICES=nvidia|opencl) but has no devices."""

    code = "UNAVAILABLE"
    fields: ClassVar[tuple[str, ...]] = ("backend",)

    def __init__(self, backend: str, reason: str) -> None:
        super().__init__(f"No {backend} devices: {reason}")
        self.backend = backend


class StateError(ChronosError):
    """The partition state cannot be used as is and cannot safely be recovered."""

    code = "INTERNAL"
    fields: ClassVar[tuple[str, ...]] = ("path",)

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"Partition state {path}: {reason}")
        self.path = path


class StateRecovered(StateError):
    """The state file was corrupt: it was moved aside and an empty table put in its place.

    The operation that found it did not run; retrying it works on the new, empty table.
    """

    code = "UNAVAILABLE"
    fields: ClassVar[tuple[str, ...]] = ("path", "moved_to")

    def __init__(self, path: object, moved_to: object, problem: str) -> None:
        ChronosError.__init__(
            self,
            f"Partition state {path} was corrupt ({problem}); moved it to {moved_to} and "
            "started an empty table. Partitions it held are forgotten; retry the command",
        )
        self.path = path
        self.moved_to = moved_to
