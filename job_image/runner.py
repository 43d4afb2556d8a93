"""The in-job runner: unpack the code package, install requirements, run, frame the result.

Runs inside the job's container (or, on the process backend, as the job's process) as
`python -m job_image.runner --job-dir DIR`. The directory holds `package.zip` and `.nonce`.
The nonce is read and deleted before any user code runs, and the result is written to stdout
as one line `\\x1eCUMULUS-RESULT <nonce> <base64 json>`: user code cannot know the nonce, so
nothing it prints can be mistaken for the result. The line stays small (INLINE_BYTES): a larger
value is pickled, as it is made, into RESULT_FILE in the job directory, and the line says so
(`{"ok": true, "file": true, "payload": "pickle", "size": n}`); the worker's runner streams
the file to the bus part by part. A value over $CUMULUS_MAX_RESULT_BYTES (the worker's
`worker.max_result_bytes`) is not kept: the line reports its size (RESOURCE_EXHAUSTED).
Standard library only, apart from cloudpickle for function packages.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import reprlib
import sys
from pathlib import Path
from typing import Any

from job_image import package
from job_image.requirements import canonical_list
from job_image.tracing import job_span

FRAME = "\x1eCUMULUS-RESULT"
END = "\x1eCUMULUS-END"
"""After the frame, `END <nonce>` closes stdout and stderr: a log stream reader knows then that it
has everything (a Swarm service's log stream never ends by itself)."""
EXIT_USER_ERROR = 1
EXIT_SETUP_ERROR = 3
READY = ".cumulus-ready"
RESULT_FILE = ".cumulus-result"
"""A value too large for the frame is pickled here, in the job directory."""
INLINE_BYTES = 256 * 1024
"""The most a result's envelope takes in the frame (JSON, before base64)."""
MAX_RESULT_BYTES = 256 * 1024 * 1024
"""The default of `worker.max_result_bytes`; the runner passes its own in the environment."""
MAX_MESSAGE = 16 * 1024
MAX_TRACEBACK = 64 * 1024
"""An error's message and traceback are cut to these (their ends kept): the frame stays small."""
REPR_CHARS = 1000
SCALARS = (str, int, float, bool, type(None))
"""Values JSON carries alone (no pickle beside)."""


_OURS = (os.path.dirname(os.path.abspath(__file__)) + os.sep, "<frozen runpy>")
"""Frames of these files (this runner, `runpy` running a script) are the runner's, not the
user's: a job's traceback starts at the user's first frame."""


def _ours(filename: str) -> bool:
    import runpy

    return filename.startswith(_OURS) or filename == runpy.__file__


DYNAMIC_CODE = "<dynamic-code>"
"""The file name cloudpickle gives the code it carries by value; the module's `__file__`,
which it keeps in the function's globals, names the user's real file."""


def _traceback(exc: BaseException, work: Path | None = None) -> str:
    """The traceback as Python prints it. With `work` (the user's code ran): without the
    runner's own frames before the user's first, with a function's real file (not
    cloudpickle's `<dynamic-code>`), and with the files of the job's working directory named
    as the user named them (`train.py`, not `/job/work/train.py`)."""
    import traceback  # only when a job fails: a job's start imports as little as it can

    if work is None:
        return "".join(traceback.format_exception(exc))[-MAX_TRACEBACK:]
    tb = exc.__traceback__
    while tb is not None and _ours(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    shown = traceback.TracebackException(type(exc), exc, tb)
    prefix = str(work) + os.sep
    todo: list[tuple[traceback.TracebackException, BaseException, Any]] = [(shown, exc, tb)]
    seen: set[int] = set()
    while todo:
        one, error, start = todo.pop()
        if id(one) in seen:
            continue
        seen.add(id(one))
        frames = [frame for frame, _ in traceback.walk_tb(start)]
        for i, (summary, frame) in enumerate(zip(one.stack, frames, strict=False)):
            one.stack[i] = _renamed(summary, frame.f_globals, prefix)
        pairs = [(one.__cause__, error.__cause__), (one.__context__, error.__context__)]
        pairs += zip(
            getattr(one, "exceptions", None) or [], getattr(error, "exceptions", ()), strict=False
        )
        for inner, raised in pairs:
            if inner is not None and raised is not None:
                todo.append((inner, raised, raised.__traceback__))
    return "".join(shown.format())[-MAX_TRACEBACK:]


def _renamed(summary: Any, where: dict[str, Any], prefix: str) -> Any:
    """A traceback frame (`traceback.FrameSummary`) named by the user's file, its source line
    read from there (`where`: the frame's globals)."""
    import linecache
    import traceback

    source = summary.filename
    if source == DYNAMIC_CODE and isinstance(where.get("__file__"), str):
        source = where["__file__"]
    name = source[len(prefix) :] if source.startswith(prefix) else source
    if name == summary.filename:
        return summary
    return traceback.FrameSummary(
        name,
        summary.lineno,
        summary.name,
        lookup_line=False,
        line=linecache.getline(source, summary.lineno or 0),
        end_lineno=summary.end_lineno,
        colno=summary.colno,
        end_colno=summary.end_colno,
    )


def frame(nonce: str, envelope: dict[str, Any]) -> bytes:
    return _frame(nonce, json.dumps(envelope).encode())


def _frame(nonce: str, encoded: bytes) -> bytes:
    return f"{FRAME} {nonce} {base64.b64encode(encoded).decode()}\n".encode()


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


def end_marker(nonce: str) -> str:
    return f"{END} {nonce}"


def _emit(nonce: str, envelope: dict[str, Any] | bytes) -> None:
    """The frame (an envelope, or one already encoded), then the end markers."""
    encoded = envelope if isinstance(envelope, bytes) else json.dumps(envelope).encode()
    sys.stdout.flush()
    sys.stderr.flush()
    _write_all(1, _frame(nonce, encoded) + f"{end_marker(nonce)}\n".encode())
    _write_all(2, f"{end_marker(nonce)}\n".encode())


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def no_new_privileges() -> None:
    """prctl(PR_SET_NO_NEW_PRIVS): nothing the job executes can gain privileges (setuid)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    except (OSError, AttributeError):
        pass


def _cut(message: str) -> str:
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE // 2] + " […] " + message[-MAX_MESSAGE // 2 :]
    return message


def _error_envelope(exc: BaseException, stage: str, work: Path | None = None) -> dict[str, Any]:
    """The frame of an error; `error_type` names its class (`module:QualName`), so that the
    caller can raise one that is also an instance of it."""
    kind = type(exc)
    return {
        "ok": False,
        "stage": stage,
        "type": kind.__name__,
        "error_type": f"{kind.__module__}:{kind.__qualname__}",
        "message": _cut(str(exc)),
        "traceback": _traceback(exc, work),
    }


def _import_hint(exc: BaseException) -> str:
    """For a job in a container (the job image sets $CUMULUS_IMAGE) that could not import a
    module the image lacks: where the job ran, and how to get the module there. Not for a
    missing submodule of a package that is there (a bug, not a missing requirement)."""
    image = os.environ.get("CUMULUS_IMAGE")
    if not image or not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return ""
    top = exc.name.partition(".")[0]
    try:
        import importlib.util

        if top != exc.name and importlib.util.find_spec(top) is not None:
            return ""
    except (ImportError, ValueError):
        pass
    return (
        f"the job runs in the job image {image}, not in the Python environment it was "
        "submitted from (a package installed only there does not travel with the job): list "
        f"it in requirements=[{top!r}] (its distribution's name, where that differs), to be "
        "installed from the operator's wheelhouse or package index"
    )


def _exit_envelope(exc: SystemExit) -> tuple[dict[str, Any], int]:
    """`sys.exit(n)` with n not 0 (or a message) in the job: an exit status, no traceback.
    A message is printed to stderr, as Python prints it, and the status is then 1."""
    status = exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR
    said = "" if isinstance(exc.code, int) else str(exc.code)
    if said:
        print(said, file=sys.stderr)
    envelope = {"ok": False, "stage": "run", "type": "SystemExit", "exit_status": status}
    return {**envelope, "message": _cut(said), "traceback": ""}, status


class _Full(Exception):
    """More than a `_Capped` sink takes."""


class _Capped:
    """A binary sink that keeps up to `limit` bytes in memory and raises _Full beyond."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()

    def write(self, data: Any) -> int:
        if len(self.data) + len(data) > self.limit:
            raise _Full
        self.data += data
        return len(data)


class _Spill:
    """A result file's writer: writes up to `limit` bytes, then only counts (the size is
    what the error reports) and empties the file."""

    def __init__(self, out: Any, limit: int) -> None:
        self.out = out
        self.limit = limit
        self.size = 0

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        if self.size + n <= self.limit:
            self.out.write(data)
        elif self.size <= self.limit:
            self.out.seek(0)
            self.out.truncate()
        self.size += n
        return n


def _pickled(value: Any, limit: int) -> bytes:
    import cloudpickle

    sink = _Capped(limit)
    cloudpickle.dump(value, sink)
    return bytes(sink.data)


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = REPR_CHARS
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = 100
_REPR.maxdict = 50


def _repr(value: Any) -> str:
    """A short repr, cheap however large the value (repr of 300 MB of bytes is 1.2 GB)."""
    try:
        if isinstance(value, str | bytes | bytearray):
            return repr(value[:REPR_CHARS])[:REPR_CHARS]
        return _REPR.repr(value)[:REPR_CHARS]
    except Exception:
        return f"<{type(value).__name__}>"


def _value_envelope(value: Any) -> dict[str, Any] | None:
    """The envelope of a value small enough for the frame, or None. A scalar is JSON alone;
    of anything else the pickle is tried first, capped: JSON is then made only of a small
    value (that of a large one would take a lot of memory)."""
    if isinstance(value, SCALARS) and not (isinstance(value, str) and len(value) > INLINE_BYTES):
        with contextlib.suppress(ValueError):  # an int too long for JSON is pickled
            json.dumps(value)
            return {"ok": True, "encoding": "json", "data": value}
    pickled: bytes | None = None
    pickle_error = ""
    try:
        pickled = _pickled(value, INLINE_BYTES * 3 // 4)
    except _Full:
        return None
    except Exception as exc:  # the JSON form, if any, still gets through
        pickle_error = f"{type(exc).__name__}: {exc}"
    envelope: dict[str, Any] = {"ok": True, "encoding": "json", "data": None}
    try:
        json.dumps(value)
        envelope["data"] = value
    except (TypeError, ValueError):
        envelope["encoding"] = "pickle"
        envelope["repr"] = _repr(value)
    if envelope["encoding"] == "pickle" or not isinstance(value, SCALARS):
        if pickled is not None:
            envelope["pickle"] = base64.b64encode(pickled).decode()
        else:
            envelope["pickle_error"] = pickle_error
    return envelope


def max_result_bytes() -> int:
    """The most a job may return (the worker's `worker.max_result_bytes`)."""
    try:
        return max(0, int(os.environ.get("CUMULUS_MAX_RESULT_BYTES", "")))
    except ValueError:
        return MAX_RESULT_BYTES


def _spill(value: Any, path: Path, limit: int) -> int:
    """Pickle `value` into `path` as it is made; its size, which may exceed `limit` (then the
    file is left empty). Whatever stood at `path` (the job's own file, a link) is replaced."""
    import cloudpickle

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with open(os.open(path, flags, 0o644), "wb", buffering=1 << 20) as out:
        sink = _Spill(out, limit)
        cloudpickle.dump(value, sink)
    return sink.size


def too_large(size: int, limit: int) -> dict[str, Any]:
    """The frame of a value over the maximum (the worker words the message itself)."""
    return {
        "ok": False,
        "stage": "result",
        "code": "RESOURCE_EXHAUSTED",
        "type": "ResultTooLarge",
        "size": size,
        "limit": limit,
        "message": f"the result is {size} bytes; the most a job may return is {limit} bytes",
    }


def result_frame(value: Any, job_dir: Path) -> bytes:
    """What the frame carries for `value` (JSON): its envelope when small, else where its
    pickle lies (RESULT_FILE), or that it is over the maximum."""
    path = job_dir / RESULT_FILE
    limit = max_result_bytes()
    try:
        envelope = _value_envelope(value)
        if envelope is not None:
            encoded = json.dumps(envelope).encode()
            if len(encoded) <= INLINE_BYTES:
                return encoded
        size = _spill(value, path, limit)
    except Exception as exc:  # unpicklable, or no room for the file
        with contextlib.suppress(OSError):
            os.unlink(path)
        return json.dumps(_error_envelope(exc, "result")).encode()
    if size > limit:
        with contextlib.suppress(OSError):
            os.unlink(path)
        return json.dumps(too_large(size, limit)).encode()
    pointer = {"ok": True, "file": True, "payload": "pickle", "size": size, "repr": _repr(value)}
    return json.dumps(pointer).encode()


def install_requirements(requirements: list[str], target: Path) -> None:
    """pip install into `target`; offline from $CUMULUS_WHEELHOUSE when it is set.

    The requirements are checked again here (the gateway did first): pip gets only PEP 508
    specifiers in canonical form, after `--` so none can be read as an option, from an empty
    working directory so no name can be taken for a local file.
    """
    if not requirements:
        return
    specs = canonical_list(requirements)
    argv = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-input",
        "--target",
        os.path.abspath(target),
    ]
    wheelhouse = os.environ.get("CUMULUS_WHEELHOUSE")
    if wheelhouse:
        argv += ["--no-index", "--find-links", os.path.abspath(wheelhouse)]
    print(f"[cumulus] installing requirements: {' '.join(specs)}", file=sys.stderr, flush=True)
    import subprocess  # imported here: every job starts a fresh interpreter, most need no pip
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cumulus-pip-") as empty:
        done = subprocess.run(
            [*argv, "--", *specs],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=empty,
        )
    if done.returncode != 0:
        tail = done.stdout.strip().splitlines()[-5:]
        raise RuntimeError(
            f"could not install {' '.join(specs)}: " + " / ".join(tail or ["pip failed"])
        )


def prepare(requirements: list[str], deps: Path) -> None:
    """Install `requirements` into `deps` once: built aside, marked ready, renamed into place.

    `deps` is the environment cache keyed by the requirements' hash; a second job with the
    same requirements finds it ready and installs nothing. Two jobs preparing it at once both
    build; the first rename wins and the other's copy is dropped.
    """
    if not requirements or (deps / READY).exists():
        return
    import shutil

    deps.parent.mkdir(parents=True, exist_ok=True)
    tmp = deps.parent / f".{deps.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    install_requirements(requirements, tmp)
    (tmp / READY).write_text(json.dumps(requirements))
    try:
        os.rename(tmp, deps)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (deps / READY).exists():
            raise


def run(job_dir: Path) -> int:
    no_new_privileges()
    nonce_file = job_dir / ".nonce"
    nonce = nonce_file.read_text().strip()
    nonce_file.unlink()
    work = job_dir / "work"
    try:
        limit = int(os.environ.get("CUMULUS_MAX_UNPACKED", str(512 * 1024 * 1024)))
        manifest = package.unpack(job_dir / "package.zip", work, limit)  # from the file
        given = os.environ.get("CUMULUS_REQUIREMENTS")
        requirements = json.loads(given) if given else list(manifest.get("requirements", []))
        deps = Path(os.environ.get("CUMULUS_DEPS_DIR", str(job_dir / "deps")))
        if requirements:
            prepare(requirements, deps)
            sys.path.insert(0, str(deps))
    except Exception as exc:
        _emit(nonce, _error_envelope(exc, "setup"))
        return EXIT_SETUP_ERROR
    os.chdir(work)
    sys.path.insert(0, str(work))
    try:
        with job_span(f"job {manifest.get('entry') or manifest['kind']}"):
            value = _call(manifest, work, job_dir)
    except SystemExit as exc:
        if exc.code in (None, 0):
            value = None
        else:
            envelope, status = _exit_envelope(exc)
            _emit(nonce, envelope)
            return status
    except BaseException as exc:
        envelope = _error_envelope(exc, "run", work)
        if hint := _import_hint(exc) or getattr(exc, "__cumulus_hint__", ""):  # same traceback
            envelope["message"] = _cut(f"{envelope['message']}: {hint}")
        _emit(nonce, envelope)
        return EXIT_USER_ERROR
    _emit(nonce, result_frame(value, job_dir))
    return 0


def _call(manifest: dict[str, Any], work: Path, job_dir: Path) -> Any:
    """Run the user's code: call the function (or serve a warm map), or run the script."""
    if manifest["kind"] == "function":
        import cloudpickle

        with open(work / manifest.get("pickle", "function.pkl"), "rb") as f:
            try:
                func, args, kwargs = cloudpickle.load(f)
            except Exception as exc:
                made = manifest.get("cloudpickle")
                if made and made != cloudpickle.__version__:
                    exc.__cumulus_hint__ = (  # type: ignore[attr-defined]
                        f"the function was pickled with cloudpickle {made} and the job has "
                        f"cloudpickle {cloudpickle.__version__}, which may not load it: install "
                        f"cloudpickle=={cloudpickle.__version__} where you submit from, or "
                        f"rebuild the job image (infra/images/build-images.sh) with {made}"
                    )
                raise
        if warm_map := os.environ.get("CUMULUS_MAP"):  # the worker's runner says so
            from job_image.warm import run_map

            return run_map(func, json.loads(warm_map), job_dir)
        return func(*args, **kwargs)
    sys.argv = [manifest["entry"], *manifest.get("args", [])]
    import runpy

    runpy.run_path(str(work / manifest["entry"]), run_name="__main__")
    return None


def wait_for_job(fd: int) -> dict[str, str] | None:
    """A warm start (the process backend's spare sandboxes): the imports a job needs are done
    while no job is there; `ready` is written to the socket `fd`, and the job's environment
    (one JSON line) comes back once its files are in place. None: let go without a job."""
    import cloudpickle  # noqa: F401  (function jobs unpickle with it)

    _write_all(fd, b"ready\n")
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        data += chunk
    os.close(fd)
    if not data.strip():
        return None
    env: dict[str, str] = json.loads(data)
    return env


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--job-dir", default=os.environ.get("CUMULUS_JOB_DIR", "/job"))
    parser.add_argument(
        "--prepare",
        metavar="DEPS_DIR",
        help="only install $CUMULUS_REQUIREMENTS (JSON list) into DEPS_DIR, then exit",
    )
    parser.add_argument(
        "--wait-fd",
        type=int,
        metavar="FD",
        help="start warm: wait for the job's environment (one JSON line) on FD, then run",
    )
    args = parser.parse_args(argv)
    if args.wait_fd is not None:
        env = wait_for_job(args.wait_fd)
        if env is None:
            return 0
        os.environ.clear()
        os.environ.update(env)
    if args.prepare:
        no_new_privileges()
        try:
            prepare(json.loads(os.environ.get("CUMULUS_REQUIREMENTS", "[]")), Path(args.prepare))
        except Exception as exc:
            print(f"[cumulus] {exc}", file=sys.stderr)
            return EXIT_SETUP_ERROR
        return 0
    return run(Path(args.job_dir))


if __name__ == "__main__":
    sys.exit(main())
