"""Cumulus: run Python functions and scripts on a share of a GPU.

    import cumulus

    client = cumulus.Client()                      # $CUMULUS_NATS_URL, else nats://127.0.0.1:4222
    client.run(train, 0.1, gpu=0.5, duration=600)  # prints the job's logs, returns its value

    @cumulus.remote(gpu=0.5)
    def train(lr: float) -> float: ...
    train.remote(0.1)                              # on the cluster; train(0.1) runs here

Every public name is re-exported here from private modules; tests/sdk/test_exports.py pins the
list. Importing this package loads neither the services nor the partition manager (nor
`fcntl`), so it works on any platform Python runs on.
"""

from cumulus._client import AsyncClient, Client
from cumulus._jobs import AsyncJob, Job, LogLine, decode_result
from cumulus._options import JobOptions
from cumulus._packaging import package_function, package_script, read_requirements
from cumulus._remote import RemoteFunction, connect, default_client, remote
from cumulus._retry import RetryPolicy
from shared.errors import (
    ApiUnreachable,
    Cancelled,
    ConfigError,
    CumulusError,
    DeadlineExceeded,
    EventLogError,
    Internal,
    InvalidArgument,
    InvalidDuration,
    InvalidGpuAmount,
    MalformedEvent,
    NotFound,
    PackagingError,
    PartitionFailed,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from shared.views import (
    DeviceUsage,
    HealthInfo,
    JobInfo,
    JobStatus,
    SwarmNode,
    WorkerInfo,
)

__all__ = [
    "ApiUnreachable",
    "AsyncClient",
    "AsyncJob",
    "Cancelled",
    "Client",
    "ConfigError",
    "CumulusError",
    "DeadlineExceeded",
    "DeviceUsage",
    "EventLogError",
    "HealthInfo",
    "Internal",
    "InvalidArgument",
    "InvalidDuration",
    "InvalidGpuAmount",
    "Job",
    "JobInfo",
    "JobOptions",
    "JobStatus",
    "LogLine",
    "MalformedEvent",
    "NotFound",
    "PackagingError",
    "PartitionFailed",
    "PermissionDenied",
    "RemoteFunction",
    "ResourceExhausted",
    "RetryPolicy",
    "SwarmNode",
    "Unauthenticated",
    "Unavailable",
    "WorkerInfo",
    "connect",
    "decode_result",
    "default_client",
    "package_function",
    "package_script",
    "read_requirements",
    "remote",
]
