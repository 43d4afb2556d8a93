"""The in-job runner: unpack the code package, install requirements, run, frame the result.

Runs inside the job's container (or, on the process backend, as the job's process) as
`python -m job_image.runner --job-dir DIR`. The directory holds `package.zip` and `.nonce`.
The nonce is read and deleted before any user code runs, and the result is written to stdout
as one line `\\x1eCUMULUS-RESULT <nonce> <base64 json>`: user code cannot know the nonce, so
nothing it prints can be mistaken for the result. Standard library only, apart from
cloudpickle for function packages.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import runpy
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

from job_image import package

FRAME = "\x1eCUMULUS-RESULT"
EXIT_USER_ERROR = 1
EXIT_SETUP_ERROR = 3


def frame(nonce: str, envelope: dict[str, Any]) -> bytes:
    payload = base64.b64encode(json.dumps(envelope).encode()).decode()
    return f"{FRAME} {nonce} {payload}\n".encode()


def parse_frame(line: str, nonce: str) -> tuple[str, dict[str, Any]] | None:
    """(text before the frame, envelope) if `line` carries the result frame for `nonce`."""
    marker = f"{FRAME} {nonce} "
    at = line.find(marker)
    if at < 0:
        return None
    payload = line[at + len(marker) :].strip()
    try:
        return line[:at], json.loads(base64.b64decode(payload))
    except ValueError:
        return None


def _emit(nonce: str, envelope: dict[str, Any]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(1, frame(nonce, envelope))


def _error_envelope(exc: BaseException, stage: str) -> dict[str, Any]:
    return {
        "ok": False,
        "stage": stage,
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }


def _value_envelope(value: Any) -> dict[str, Any]:
    envelope: dict[str, Any] = {"ok": True, "encoding": "json", "data": None}
    try:
        json.dumps(value)
        envelope["data"] = value
    except (TypeError, ValueError):
        envelope["encoding"] = "pickle"
        envelope["repr"] = repr(value)[:1000]
    if envelope["encoding"] == "pickle" or not isinstance(
        value, (str, int, float, bool, type(None))
    ):
        try:
            import cloudpickle

            envelope["pickle"] = base64.b64encode(cloudpickle.dumps(value)).decode()
        except Exception as exc:  # the JSON form, if any, still gets through
            envelope["pickle_error"] = f"{type(exc).__name__}: {exc}"
    return envelope


def install_requirements(requirements: list[str], target: Path) -> None:
    """pip install into `target`; offline from $CUMULUS_WHEELHOUSE when it is set."""
    if not requirements:
        return
    argv = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-input",
        "--target",
        str(target),
    ]
    wheelhouse = os.environ.get("CUMULUS_WHEELHOUSE")
    if wheelhouse:
        argv += ["--no-index", "--find-links", wheelhouse]
    print(
        f"[cumulus] installing requirements: {' '.join(requirements)}", file=sys.stderr, flush=True
    )
    subprocess.run([*argv, *requirements], check=True, stdout=sys.stderr)
    sys.path.insert(0, str(target))


def run(job_dir: Path) -> int:
    nonce_file = job_dir / ".nonce"
    nonce = nonce_file.read_text().strip()
    nonce_file.unlink()
    work = job_dir / "work"
    try:
        data = (job_dir / "package.zip").read_bytes()
        limit = int(os.environ.get("CUMULUS_MAX_UNPACKED", str(512 * 1024 * 1024)))
        manifest = package.unpack(data, work, limit)
        given = os.environ.get("CUMULUS_REQUIREMENTS")
        requirements = json.loads(given) if given else list(manifest.get("requirements", []))
        deps = Path(os.environ.get("CUMULUS_DEPS_DIR", str(job_dir / "deps")))
        if requirements and (deps / ".cumulus-ready").exists():
            sys.path.insert(0, str(deps))
        else:
            install_requirements(requirements, deps)
    except Exception as exc:
        _emit(nonce, _error_envelope(exc, "setup"))
        return EXIT_SETUP_ERROR
    os.chdir(work)
    sys.path.insert(0, str(work))
    try:
        if manifest["kind"] == "function":
            import cloudpickle

            with open(work / manifest.get("pickle", "function.pkl"), "rb") as f:
                func, args, kwargs = cloudpickle.load(f)
            value = func(*args, **kwargs)
        else:
            sys.argv = [manifest["entry"], *manifest.get("args", [])]
            runpy.run_path(str(work / manifest["entry"]), run_name="__main__")
            value = None
    except SystemExit as exc:
        if exc.code in (None, 0):
            value = None
        else:
            _emit(nonce, _error_envelope(exc, "run"))
            return exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR
    except BaseException as exc:
        _emit(nonce, _error_envelope(exc, "run"))
        return EXIT_USER_ERROR
    _emit(nonce, _value_envelope(value))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--job-dir", default=os.environ.get("CUMULUS_JOB_DIR", "/job"))
    args = parser.parse_args(argv)
    return run(Path(args.job_dir))


if __name__ == "__main__":
    sys.exit(main())
