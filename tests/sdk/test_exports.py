"""The SDK's public names are pinned: changing them is a deliberate act (and a CHANGELOG line)."""

from __future__ import annotations

import sdk


def test_public_api() -> None:
    assert sorted(sdk.__all__) == [
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
    for name in sdk.__all__:
        assert getattr(sdk, name) is not None, name


def test_errors_are_the_shared_tree() -> None:
    assert issubclass(sdk.ResourceExhausted, sdk.CumulusError)
    assert sdk.CumulusError.from_code("UNAVAILABLE", "x").__class__ is sdk.Unavailable
