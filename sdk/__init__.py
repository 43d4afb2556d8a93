"""Cumulus client SDK: run Python functions and scripts on a share of a GPU.

    from sdk import CumulusClient, remote

    client = CumulusClient()                       # $CUMULUS_NATS_URL, else nats://127.0.0.1:4222
    client.run(train, 0.1, gpu=0.5, duration=600)  # prints the job's logs, returns its value

    @remote(gpu=0.5)
    def train(lr: float) -> float: ...
    train.remote(0.1)                              # on the cluster; train(0.1) runs here

Every public name is re-exported here; tests/sdk/test_exports.py pins the list.
"""

from sdk.client import AsyncCumulusClient, CumulusClient
from sdk.jobs import AsyncJob, Job, LogLine, decode_result
from sdk.packaging import (
    PackagingError,
    package_function,
    package_script,
    read_requirements,
)
from sdk.remote import RemoteFunction, connect, default_client, remote
from sdk.retry import RetryPolicy
from shared.errors import (
    Cancelled,
    CumulusError,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
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
