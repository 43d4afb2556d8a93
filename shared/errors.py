"""The one error tree of Cumulus, with the seed's codes and the data each error carries.

    CumulusError                      code                (declared attributes)
    ├── InvalidArgument               INVALID_ARGUMENT    (field)
    │   ├── InvalidGpuAmount                              (requested)
    │   ├── InvalidDuration                               (requested, minimum, maximum)
    │   ├── PackagingError                                a function or directory cannot travel
    │   ├── MalformedEvent                                a message on the bus is not an event
    │   └── ConfigError                                   (key, allowed)
    ├── Unavailable                   UNAVAILABLE         (worker_id)
    │   └── ApiUnreachable                                (subject)
    ├── ResourceExhausted             RESOURCE_EXHAUSTED  (requested, largest_free, permanent)
    ├── Internal                      INTERNAL
    │   ├── EventLogError                                 (path)
    │   └── PartitionFailed                               (detail)
    ├── DeadlineExceeded              DEADLINE_EXCEEDED   (duration_s)
    ├── NotFound                      NOT_FOUND           (resource_id)
    ├── Cancelled                     CANCELLED
    ├── Unauthenticated               UNAUTHENTICATED
    └── PermissionDenied              PERMISSION_DENIED

Every error also carries `job_id` and `remote_traceback` (set when it ends a job).

Over NATS an error travels in the micro-service headers `Nats-Service-Error` (message) and
`Nats-Service-Error-Code` (code), with its declared attributes as JSON in the reply body
(`{"error": {"code", "message", "details"}}`); `from_code()` rebuilds the typed error on the
client. A process that is not Python-aware (chronos_cli --json) prints the same object.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"


class CumulusError(Exception):
    """Root of every error Cumulus raises on purpose; carries a seed code and a message."""

    code: ClassVar[str] = "INTERNAL"
    fields: ClassVar[tuple[str, ...]] = ()
    """The attributes this class declares beyond `message`, `job_id` and `remote_traceback`;
    they travel over the wire in `details()` and come back through `from_code()`."""

    def __init__(self, message: str, *, job_id: str = "", remote_traceback: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.job_id = job_id
        """The job this error ended, when it ended one."""
        self.remote_traceback = remote_traceback
        """The job's own traceback, when its code raised."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code}: {self.message!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self).code, self.message, self.details()))

    def details(self) -> dict[str, Any]:
        """The declared attributes with a value, for the wire."""
        out = {name: getattr(self, name) for name in type(self).all_fields()}
        return {k: v for k, v in out.items() if v not in ("", None, ())}

    def to_dict(self) -> dict[str, Any]:
        """`{"code", "message", "details"}`: the error as JSON carries it."""
        return {"code": self.code, "message": self.message, "details": self.details()}

    @classmethod
    def all_fields(cls) -> tuple[str, ...]:
        return ("job_id", "remote_traceback", *cls.fields)

    @staticmethod
    def from_code(
        code: str, message: str, details: Mapping[str, Any] | None = None
    ) -> CumulusError:
        """The typed error for a seed code with the attributes it declares; an unknown code
        becomes Internal, unknown details are dropped."""
        cls = _BY_CODE.get(code, Internal)
        known = {k: v for k, v in (details or {}).items() if k in cls.all_fields()}
        try:
            return cls(message, **known)
        except TypeError:  # a detail of the wrong type from an older or foreign peer
            return cls(message)

    @staticmethod
    def from_dict(body: Mapping[str, Any]) -> CumulusError:
        """Rebuild from `to_dict()`'s shape (what chronos_cli --json prints under "error")."""
        details = body.get("details")
        return CumulusError.from_code(
            str(body.get("code", "INTERNAL")),
            str(body.get("message", "unknown error")),
            details if isinstance(details, Mapping) else None,
        )


def _rebuild(code: str, message: str, details: Mapping[str, Any]) -> CumulusError:
    return CumulusError.from_code(code, message, details)


# -- INVALID_ARGUMENT ------------------------------------------------------------------------


class InvalidArgument(CumulusError):
    """The request is malformed; retrying it unchanged cannot succeed."""

    code = "INVALID_ARGUMENT"
    fields: ClassVar[tuple[str, ...]] = ("field",)

    def __init__(self, message: str, *, field: str = "", **common: str) -> None:
        super().__init__(message, **common)
        self.field = field
        """The request field (or config key) at fault, when one is."""


class InvalidGpuAmount(InvalidArgument):
    """A GPU share outside 0.1-0.9 (steps of 0.1) or whole 1-8."""

    fields: ClassVar[tuple[str, ...]] = ("field", "requested")

    def __init__(self, requested: object, **common: str) -> None:
        super().__init__(
            f"Invalid GPU amount: {shown(requested)}. Must be 0.1-0.9 or whole number 1-8",
            field="gpu",
            **common,
        )
        self.requested = str(requested)


class InvalidDuration(InvalidArgument):
    """A duration outside the configured bounds (the seed: 60-86400 seconds)."""

    fields: ClassVar[tuple[str, ...]] = ("field", "requested", "minimum", "maximum")

    def __init__(
        self, requested: object, minimum: int = 60, maximum: int = 86400, **common: str
    ) -> None:
        super().__init__(
            f"Invalid duration: {shown(requested)}. Must be {minimum}-{maximum} seconds",
            field="duration",
            **common,
        )
        self.requested = str(requested)
        self.minimum = minimum
        self.maximum = maximum


class PackagingError(InvalidArgument):
    """A function, script or directory cannot be packaged to travel to a worker."""


class MalformedEvent(InvalidArgument):
    """A message on the bus is not a known, well-formed event; it is set aside, never retried."""


class ConfigError(InvalidArgument):
    """A configuration value is wrong; names the key and, for enumerations, what is allowed."""

    fields: ClassVar[tuple[str, ...]] = ("field", "key", "allowed")

    def __init__(self, message: str, *, key: str = "", allowed: tuple[str, ...] = ()) -> None:
        super().__init__(message, field=key)
        self.key = key
        self.allowed = tuple(allowed)


# -- UNAVAILABLE ---------------------------------------------------------------------------


class Unavailable(CumulusError):
    """Cumulus (or one worker) cannot take this now; a retry later may succeed."""

    code = "UNAVAILABLE"
    fields: ClassVar[tuple[str, ...]] = ("worker_id",)

    def __init__(self, message: str, *, worker_id: str = "", **common: str) -> None:
        super().__init__(message, **common)
        self.worker_id = worker_id
        """The worker that was lost or unreachable, when one was."""


class ApiUnreachable(Unavailable):
    """Nobody answered on an API subject: the service is not running or not reachable."""

    fields: ClassVar[tuple[str, ...]] = ("worker_id", "subject")

    def __init__(self, message: str, *, subject: str = "", **common: str) -> None:
        super().__init__(message, **common)
        self.subject = subject


# -- RESOURCE_EXHAUSTED --------------------------------------------------------------------


class ResourceExhausted(CumulusError):
    """No worker can hold the share asked for, now or ever (see the message)."""

    code = "RESOURCE_EXHAUSTED"
    fields: ClassVar[tuple[str, ...]] = ("requested", "largest_free", "permanent")

    def __init__(
        self,
        message: str,
        *,
        requested: str = "",
        largest_free: str = "",
        permanent: bool = False,
        **common: str,
    ) -> None:
        super().__init__(message, **common)
        self.requested = requested
        """The GPU amount asked for, as the user wrote it (e.g. "0.5", "2")."""
        self.largest_free = largest_free
        """The largest amount one placement could get when the request was refused."""
        self.permanent = permanent
        """True when the request can never be granted as the pool and the policy stand (larger
        than any worker, or than the user's share): retrying it cannot help, so it is not."""

    def details(self) -> dict[str, Any]:
        out = super().details()
        if not self.permanent:  # the wire says so only when it is
            out.pop("permanent", None)
        return out


# -- INTERNAL ------------------------------------------------------------------------------


class Internal(CumulusError):
    """Something in Cumulus failed; the message says what."""

    code = "INTERNAL"


class EventLogError(Internal):
    """A service's SQLite file could not be read or written."""

    fields: ClassVar[tuple[str, ...]] = ("path",)

    def __init__(self, message: str, *, path: str = "", **common: str) -> None:
        super().__init__(message, **common)
        self.path = path


class PartitionFailed(Internal):
    """chronos_cli could not create a partition (the seed's message)."""

    fields: ClassVar[tuple[str, ...]] = ("detail",)

    def __init__(self, message: str, *, detail: str = "", **common: str) -> None:
        super().__init__(message, **common)
        self.detail = detail


# -- the other codes -------------------------------------------------------------------------


class DeadlineExceeded(CumulusError):
    """A job ran past its duration and was stopped."""

    code = "DEADLINE_EXCEEDED"
    fields: ClassVar[tuple[str, ...]] = ("duration_s",)

    def __init__(self, message: str, *, duration_s: int = 0, **common: str) -> None:
        super().__init__(message, **common)
        self.duration_s = duration_s


class NotFound(CumulusError):
    """No such job, partition or worker (for this user)."""

    code = "NOT_FOUND"
    fields: ClassVar[tuple[str, ...]] = ("resource_id",)

    def __init__(self, message: str, *, resource_id: str = "", **common: str) -> None:
        super().__init__(message, **common)
        self.resource_id = resource_id


class Cancelled(CumulusError):
    code = "CANCELLED"


class Unauthenticated(CumulusError):
    code = "UNAUTHENTICATED"


class PermissionDenied(CumulusError):
    code = "PERMISSION_DENIED"


_BY_CODE: dict[str, type[CumulusError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        Unavailable,
        ResourceExhausted,
        Internal,
        DeadlineExceeded,
        NotFound,
        Cancelled,
        Unauthenticated,
        PermissionDenied,
    )
}

CODES = frozenset(_BY_CODE)


# -- the seed's messages ----------------------------------------------------------------------


def no_workers() -> Unavailable:
    return Unavailable("No GPU workers available in Swarm cluster")


def resources_exhausted(requested: str, largest_free: str) -> ResourceExhausted:
    return ResourceExhausted(
        f"No workers with sufficient GPU capacity (requested: {requested}, "
        f"max available: {largest_free})",
        requested=requested,
        largest_free=largest_free,
        permanent=True,
    )


def shown(value: object, limit: int = 40) -> str:
    """A value as an error message quotes it: whole if short, else cut with its length."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def invalid_duration(requested: object, minimum: int = 60, maximum: int = 86400) -> InvalidDuration:
    return InvalidDuration(requested, minimum, maximum)


def partition_failed(detail: str) -> PartitionFailed:
    return PartitionFailed(f"Chronos partition creation failed: {detail}", detail=detail)


def ssh_failed(worker_id: str = "") -> Unavailable:
    return Unavailable(
        "Failed to create Chronos partition on worker: SSH connection failed", worker_id=worker_id
    )


def deadline_exceeded(duration_s: int) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"Job exceeded allocated duration of {duration_s} seconds", duration_s=duration_s
    )
