"""The one error tree of Cumulus, with the seed's codes.

    CumulusError                      code
    ├── InvalidArgument               INVALID_ARGUMENT
    │   └── InvalidGpuAmount          (requested)
    ├── Unavailable                   UNAVAILABLE       (worker_id)
    ├── ResourceExhausted             RESOURCE_EXHAUSTED (requested, largest_free)
    ├── Internal                      INTERNAL
    ├── DeadlineExceeded              DEADLINE_EXCEEDED (duration_s)
    ├── NotFound                      NOT_FOUND
    ├── Cancelled                     CANCELLED
    ├── Unauthenticated               UNAUTHENTICATED
    └── PermissionDenied              PERMISSION_DENIED

Over NATS an error travels in the micro-service headers `Nats-Service-Error` (message) and
`Nats-Service-Error-Code` (code); `from_code()` rebuilds the typed error on the client.
"""

from __future__ import annotations

from typing import Any, ClassVar

ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"


class CumulusError(Exception):
    """Root of every error Cumulus raises on purpose; carries a seed code and a message."""

    code: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str, **data: Any) -> None:
        super().__init__(message)
        self.message = message
        self.data = data

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["data"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code}: {self.message!r})"

    @staticmethod
    def from_code(code: str, message: str, **data: Any) -> CumulusError:
        """The typed error for a seed code; an unknown code becomes Internal."""
        cls = _BY_CODE.get(code, Internal)
        return cls(message, **data)


class InvalidArgument(CumulusError):
    code = "INVALID_ARGUMENT"


class InvalidGpuAmount(InvalidArgument):
    def __init__(self, requested: object) -> None:
        super().__init__(
            f"Invalid GPU amount: {requested}. Must be 0.1-0.9 or whole number 1-8",
            requested=requested,
        )


class Unavailable(CumulusError):
    code = "UNAVAILABLE"


class ResourceExhausted(CumulusError):
    code = "RESOURCE_EXHAUSTED"


class Internal(CumulusError):
    code = "INTERNAL"


class DeadlineExceeded(CumulusError):
    code = "DEADLINE_EXCEEDED"


class NotFound(CumulusError):
    code = "NOT_FOUND"


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


def no_workers() -> Unavailable:
    return Unavailable("No GPU workers available in Swarm cluster")


def resources_exhausted(requested: str, largest_free: str) -> ResourceExhausted:
    return ResourceExhausted(
        f"No workers with sufficient GPU capacity (requested: {requested}, "
        f"max available: {largest_free})",
        requested=requested,
        largest_free=largest_free,
    )


def invalid_duration(requested: object, minimum: int = 60, maximum: int = 86400) -> InvalidArgument:
    return InvalidArgument(
        f"Invalid duration: {requested}. Must be {minimum}-{maximum} seconds",
        requested=requested,
    )


def partition_failed(detail: str) -> Internal:
    return Internal(f"Chronos partition creation failed: {detail}", detail=detail)


def ssh_failed() -> Unavailable:
    return Unavailable("Failed to create Chronos partition on worker: SSH connection failed")


def deadline_exceeded(duration_s: int) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"Job exceeded allocated duration of {duration_s} seconds", duration_s=duration_s
    )
