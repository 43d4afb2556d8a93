"""Deprecated: the SDK is the `cumulus` package now (`import cumulus`; `cumulus.Client`).

`sdk` collides with any user project that has its own `sdk/` folder. This alias re-exports
the old names for one release and warns on import; it goes away in the next.
"""

import warnings

from cumulus import (
    AsyncClient as AsyncCumulusClient,
)
from cumulus import (
    AsyncJob,
    Cancelled,
    CumulusError,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    Job,
    LogLine,
    NotFound,
    PackagingError,
    PermissionDenied,
    RemoteFunction,
    ResourceExhausted,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
    connect,
    decode_result,
    default_client,
    package_function,
    package_script,
    read_requirements,
    remote,
)
from cumulus import (
    Client as CumulusClient,
)

warnings.warn(
    "`sdk` is deprecated and will be removed in the next release: "
    "use `import cumulus` (cumulus.Client, cumulus.AsyncClient, cumulus.remote, …)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "AsyncCumulusClient",
    "AsyncJob",
    "Cancelled",
    "CumulusClient",
    "CumulusError",
    "DeadlineExceeded",
    "Internal",
    "InvalidArgument",
    "Job",
    "LogLine",
    "NotFound",
    "PackagingError",
    "PermissionDenied",
    "RemoteFunction",
    "ResourceExhausted",
    "RetryPolicy",
    "Unauthenticated",
    "Unavailable",
    "connect",
    "decode_result",
    "default_client",
    "package_function",
    "package_script",
    "read_requirements",
    "remote",
]
