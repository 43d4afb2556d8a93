"""The public names of `cumulus` are pinned: changing them is a deliberate act (and a CHANGELOG
line). Importing `cumulus` loads neither the services nor the partition manager, and works in a
project that has its own `sdk/` package; `sdk` is a deprecated alias for one release."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import cumulus
from shared import errors

ROOT = Path(__file__).resolve().parents[2]


def test_public_api() -> None:
    assert sorted(cumulus.__all__) == [
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
    for name in cumulus.__all__:
        assert getattr(cumulus, name) is not None, name


def test_every_public_error_is_exported_and_is_the_shared_tree() -> None:
    public = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, errors.CumulusError)
    }
    assert public <= set(cumulus.__all__)
    assert issubclass(cumulus.ResourceExhausted, cumulus.CumulusError)
    assert issubclass(cumulus.PackagingError, cumulus.InvalidArgument)
    assert cumulus.CumulusError.from_code("UNAVAILABLE", "x").__class__ is cumulus.Unavailable


def test_job_status_knows_the_terminal_ones() -> None:
    terminal = {s for s in cumulus.JobStatus if s.is_terminal}
    assert terminal == {"COMPLETED", "FAILED", "TIMED_OUT", "CANCELLED"}
    assert cumulus.JobStatus("RUNNING") == "RUNNING"


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_import_cumulus_loads_no_service_code_and_needs_no_fcntl(tmp_path: Path) -> None:
    """As on Windows, where there is no `fcntl`: on Linux the standard library's `subprocess`
    imports it (asyncio needs subprocess), so the check blocks the module instead of looking
    for it in sys.modules."""
    done = _python(
        "import sys; sys.modules['fcntl'] = None\n"
        "import cumulus, cumulus.cli\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('services', 'sdk')"
        " or m == 'cumulus_core.table')\n"
        "assert not loaded, loaded\n"
        "assert sys.modules['fcntl'] is None\n"
        "print('ok')\n",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ok\n"


def test_import_cumulus_from_a_project_with_its_own_sdk_package(tmp_path: Path) -> None:
    (tmp_path / "sdk").mkdir()
    (tmp_path / "sdk" / "__init__.py").write_text("MINE = True\n")
    done = _python(
        "import cumulus, sdk\nassert sdk.MINE\nassert cumulus.Client\nprint('ok')\n", tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ok\n"


def test_sdk_is_a_deprecated_alias() -> None:
    sys.modules.pop("sdk", None)
    with pytest.warns(DeprecationWarning, match="use `import cumulus`") as caught:
        import sdk
    assert caught[0].filename == __file__  # the warning points at the importer
    assert sdk.CumulusClient is cumulus.Client
    assert sdk.AsyncCumulusClient is cumulus.AsyncClient
    assert sdk.remote is cumulus.remote
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in sdk.__all__:
            assert getattr(sdk, name) is not None, name
