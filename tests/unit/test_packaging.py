"""Packaging a function the user wrote: it must run where the user's files are absent."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from cumulus._packaging import PackagingError, code_ref, package_function, package_script
from job_image.package import MANIFEST, check

SCALE = 3


def _helper(x: int) -> int:
    return x * SCALE


def compute(x: int, *, plus: int = 0) -> dict[str, Any]:
    return {"value": _helper(x) + plus, "module": __name__}


def make_adder(n: int) -> Callable[[int], int]:
    offset = n * 10

    def add(x: int) -> int:
        return x + offset

    return add


RUN = r"""
import importlib, io, json, sys, zipfile
try:
    importlib.import_module(sys.argv[1])
    importable = True
except ImportError:
    importable = False
import cloudpickle
with zipfile.ZipFile(io.BytesIO(sys.stdin.buffer.read())) as z:
    func, args, kwargs = cloudpickle.loads(z.read("function.pkl"))
print(json.dumps({"importable": importable, "result": func(*args, **kwargs)}))
"""


def run_fresh(package: bytes, cwd: Path) -> dict[str, Any]:
    """Call the packaged function in a new, isolated interpreter (no cwd or PYTHONPATH)."""
    done = subprocess.run(
        [sys.executable, "-I", "-c", RUN, __name__],
        input=package,
        cwd=cwd,
        capture_output=True,
        timeout=20,
    )
    assert done.returncode == 0, done.stderr.decode()
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_local_function_runs_where_its_module_cannot_be_imported(tmp_path: Path) -> None:
    got = run_fresh(package_function(compute, (4,), {"plus": 1}), tmp_path)
    assert got["importable"] is False
    assert got["result"] == {"value": 13, "module": __name__}


def test_closure_is_captured(tmp_path: Path) -> None:
    got = run_fresh(package_function(make_adder(2), (5,)), tmp_path)
    assert got["result"] == 25


def test_lambda_is_captured(tmp_path: Path) -> None:
    factor = 7
    got = run_fresh(package_function(lambda x: x * factor, (6,)), tmp_path)
    assert got["result"] == 42


def test_module_is_not_left_registered_by_value() -> None:
    package_function(compute, (1,))
    assert sys.modules[__name__] not in cloudpickle.list_registry_pickle_by_value()


def test_package_is_a_valid_function_package() -> None:
    data = package_function(compute, (1,), requirements=["numpy==2.0"])
    manifest = check(data, 10 * 1024 * 1024)
    assert manifest["kind"] == "function"
    assert manifest["name"] == "compute"
    assert manifest["requirements"] == ["numpy==2.0"]
    assert manifest["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"


def test_unpicklable_argument_gives_a_helpful_error() -> None:
    with pytest.raises(PackagingError) as info:
        package_function(compute, (threading.Lock(),))
    message = str(info.value)
    assert "cannot package 'compute'" in message
    assert "lock" in message.lower()
    assert "create clients, locks and open files inside the function" in message


def test_not_callable_is_rejected() -> None:
    with pytest.raises(PackagingError, match="is not callable"):
        package_function(42)  # type: ignore[arg-type]


def test_same_function_gives_the_same_bytes_and_ref() -> None:
    first = package_function(compute, (1,), {"plus": 2})
    second = package_function(compute, (1,), {"plus": 2})
    assert first == second
    assert code_ref(first) == code_ref(second)


def test_code_ref_is_the_sha256_hex() -> None:
    data = package_function(compute, (1,))
    ref = code_ref(data)
    assert ref == hashlib.sha256(data).hexdigest()
    assert len(ref) == 64
    assert code_ref(package_function(compute, (2,))) != ref


def test_script_package(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    data = package_script(script, args=["--lr", "0.1"], requirements=["torch"])
    assert check(data, 1024 * 1024) == {
        "kind": "script",
        "entry": "train.py",
        "args": ["--lr", "0.1"],
        "requirements": ["torch"],
    }
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.read("train.py") == b"print('hi')\n"
        assert sorted(archive.namelist()) == [MANIFEST, "train.py"]
    assert package_script(script, args=["--lr", "0.1"], requirements=["torch"]) == data


def test_missing_script_is_a_packaging_error(tmp_path: Path) -> None:
    with pytest.raises(PackagingError, match="does not exist"):
        package_script(tmp_path / "absent.py")
