"""Packaging as users meet it: local modules, source vs cloudpickle, scripts with their files."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cumulus import AsyncClient, PackagingError, package_function, package_script
from cumulus._packaging import choose_packaging, read_requirements
from job_image.package import MANIFEST, check

RUN = r"""
import io, json, sys, zipfile, pickle
with zipfile.ZipFile(io.BytesIO(sys.stdin.buffer.read())) as z:
    z.extractall(sys.argv[1])
sys.path.insert(0, sys.argv[1])
import cloudpickle
with open(sys.argv[1] + "/function.pkl", "rb") as f:
    func, args, kwargs = cloudpickle.load(f)
print(json.dumps(func(*args, **kwargs)))
"""


def run_fresh(package: bytes, tmp: Path) -> Any:
    """Call the packaged function in an isolated interpreter that has none of our files."""
    out = tmp / "job"
    done = subprocess.run(
        [sys.executable, "-I", "-c", RUN, str(out)],
        input=package,
        cwd=tmp,
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


@pytest.fixture
def user_modules(tmp_path: Path) -> Iterator[Any]:
    """A user's project: `project/app.py` imports its neighbour `project/helpers/maths.py`."""
    root = tmp_path / "project"
    (root / "helpers").mkdir(parents=True)
    (root / "helpers" / "__init__.py").write_text("")
    (root / "helpers" / "maths.py").write_text(
        "FACTOR = 7\n\ndef scale(x):\n    return x * FACTOR\n"
    )
    (root / "app.py").write_text(
        textwrap.dedent(
            """
            from helpers import maths

            def work(x, plus=0):
                return {"value": maths.scale(x) + plus}
            """
        )
    )
    sys.path.insert(0, str(root))
    try:
        import app  # type: ignore[import-not-found]

        yield app
    finally:
        sys.path.remove(str(root))
        for name in ("app", "helpers", "helpers.maths"):
            sys.modules.pop(name, None)


def test_local_modules_a_function_imports_travel_with_it(user_modules: Any, tmp_path: Path) -> None:
    package = package_function(user_modules.work, (3,), {"plus": 1})
    assert run_fresh(package, tmp_path) == {"value": 22}


def test_source_packaging_ships_the_files_and_imports_by_name(
    user_modules: Any, tmp_path: Path
) -> None:
    package = package_function(user_modules.work, (3,), {"plus": 1}, packaging="source")
    with zipfile.ZipFile(io.BytesIO(package)) as archive:
        names = sorted(archive.namelist())
        manifest = json.loads(archive.read(MANIFEST))
    assert names == [
        "app.py",
        MANIFEST,
        "function.pkl",
        "helpers/__init__.py",
        "helpers/maths.py",
    ]
    assert manifest["packaging"] == "source"
    assert manifest["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert run_fresh(package, tmp_path) == {"value": 22}


def test_what_source_packaging_cannot_ship_is_named() -> None:
    factor = 3
    with pytest.raises(PackagingError) as info:
        package_function(lambda x: x * factor, (1,), packaging="source")
    assert "only functions defined at a module's top level" in str(info.value)


def test_auto_chooses_cloudpickle_where_pythons_match_and_says_why() -> None:
    assert choose_packaging("auto", [], "3.11")[0] == "pickle"
    assert choose_packaging("auto", ["3.11", ""], "3.11") == (
        "pickle",
        "cloudpickle (Python 3.11 here and on the workers)",
    )
    how, why = choose_packaging("auto", ["3.12"], "3.11")
    assert how == "source"
    assert "workers run Python 3.12 and this client 3.11" in why
    assert choose_packaging("source", [], "3.11")[0] == "source"
    with pytest.raises(PackagingError):
        choose_packaging("zip", [], "3.11")  # type: ignore[arg-type]


async def test_a_source_package_runs_on_the_cluster(user_modules: Any, stack: Any) -> None:
    async with AsyncClient(profile=stack.profile(), packaging="source") as client:
        job = await client.submit(user_modules.work, 2, plus=5, gpu=0.1, duration=600)
        assert job.packaging == "source, as asked"
        assert await job.result(timeout=60) == {"value": 19}


def test_a_script_travels_with_its_directory_but_not_its_junk(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text("import data\nprint(data.X)\n")
    (tmp_path / "data.py").write_text("X = 1\n")
    (tmp_path / "zeros.bin").write_bytes(b"\0" * 1_000_000)  # compresses 1000x: stored
    for junk in (".git", "__pycache__", ".venv", "node_modules"):
        (tmp_path / junk).mkdir()
        (tmp_path / junk / "x.py").write_text("junk")
    (tmp_path / "old.pyc").write_bytes(b"junk")
    package = package_script(tmp_path / "train.py", ["--lr", "1"], ["tinystats"], tmp_path)
    manifest = check(package, 10 * 1024 * 1024)  # what the gateway checks, zip-bomb guard too
    assert manifest["entry"] == "train.py"
    with zipfile.ZipFile(io.BytesIO(package)) as archive:
        assert sorted(archive.namelist()) == [MANIFEST, "data.py", "train.py", "zeros.bin"]
        assert archive.getinfo("zeros.bin").compress_type == zipfile.ZIP_STORED


def test_a_link_out_of_the_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "train.py").write_text("print(1)\n")
    (tmp_path / "secret").write_text("s")
    (tmp_path / "job" / "secret").symlink_to(tmp_path / "secret")
    with pytest.raises(PackagingError, match="outside"):
        package_script(tmp_path / "job" / "train.py", working_dir=tmp_path / "job")


def test_a_directory_too_big_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text("print(1)\n")
    (tmp_path / "big.bin").write_bytes(b"x" * 2048)
    with pytest.raises(PackagingError, match="put the script in a directory of its own"):
        package_script(tmp_path / "train.py", working_dir=tmp_path, max_bytes=1024)


def test_requirements_files(tmp_path: Path) -> None:
    (tmp_path / "base.txt").write_text("numpy==2.0  # pinned\n")
    (tmp_path / "requirements.txt").write_text("# deps\n\n-r base.txt\ntinystats>=0.1\n")
    assert read_requirements(tmp_path / "requirements.txt") == ["numpy==2.0", "tinystats>=0.1"]
    (tmp_path / "bad.txt").write_text("--index-url http://example.invalid\n")
    with pytest.raises(PackagingError, match="bad.txt:1: pip option '--index-url'"):
        read_requirements(tmp_path / "bad.txt")
    with pytest.raises(PackagingError, match="does not exist"):
        read_requirements(tmp_path / "absent.txt")
