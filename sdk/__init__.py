"""Cumulus client SDK: run Python functions on a share of a GPU."""

from sdk.client import AsyncCumulusClient, AsyncJob, CumulusClient, Job, decode_result
from sdk.packaging import PackagingError, package_function, package_script
from shared.errors import CumulusError

__all__ = [
    "AsyncCumulusClient",
    "AsyncJob",
    "CumulusClient",
    "CumulusError",
    "Job",
    "PackagingError",
    "decode_result",
    "package_function",
    "package_script",
]
