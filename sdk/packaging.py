"""Turning a Python function (with its closure and local modules) or a script into a package.

Functions are pickled with cloudpickle. Modules that are not installed packages (the user's
own files, the `__main__` script, test modules) are pickled by value, so the job needs none of
the client's files; installed packages are pickled by reference and must be importable in the
job (list them in `requirements`).
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import sysconfig
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import cloudpickle

from job_image.package import MANIFEST

_INSTALLED = tuple(
    str(Path(p).resolve())
    for p in {
        sysconfig.get_paths()["purelib"],
        sysconfig.get_paths()["platlib"],
        sys.prefix,
        sys.base_prefix,
    }
)


class PackagingError(ValueError):
    """The function or script cannot be packaged; the message says what to change."""


def _is_local(module: ModuleType) -> bool:
    if module.__name__ == "__main__":
        return False  # cloudpickle already pickles __main__ by value
    path = getattr(module, "__file__", None)
    if not path:
        return False
    resolved = str(Path(path).resolve())
    return not resolved.startswith(_INSTALLED)


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, files[name])
    return buf.getvalue()


def package_function(
    func: Callable[..., Any],
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    requirements: Sequence[str] = (),
) -> bytes:
    """A function package: cloudpickle of (func, args, kwargs) and the manifest."""
    if not callable(func):
        raise PackagingError(f"{func!r} is not callable")
    module = sys.modules.get(getattr(func, "__module__", "") or "")
    registered = False
    if module is not None and _is_local(module):
        cloudpickle.register_pickle_by_value(module)
        registered = True
    try:
        payload = cloudpickle.dumps((func, tuple(args), dict(kwargs or {})))
    except Exception as exc:
        raise PackagingError(
            f"cannot package {getattr(func, '__qualname__', func)!r}: {type(exc).__name__}: {exc}. "
            "Pass only picklable arguments, and create clients, locks and open files "
            "inside the function"
        ) from None
    finally:
        if registered and module is not None:
            cloudpickle.unregister_pickle_by_value(module)
    manifest = {
        "kind": "function",
        "pickle": "function.pkl",
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "name": getattr(func, "__qualname__", repr(func)),
        "requirements": list(requirements),
    }
    return _zip({MANIFEST: json.dumps(manifest).encode(), "function.pkl": payload})


def package_script(
    path: str | Path, args: Sequence[str] = (), requirements: Sequence[str] = ()
) -> bytes:
    """A script package: the script's directory (or the script alone) and the manifest."""
    script = Path(path)
    if not script.is_file():
        raise PackagingError(f"script {script} does not exist")
    manifest = {
        "kind": "script",
        "entry": script.name,
        "args": list(args),
        "requirements": list(requirements),
    }
    return _zip({MANIFEST: json.dumps(manifest).encode(), script.name: script.read_bytes()})


def code_ref(data: bytes) -> str:
    """The content address of a package: its sha256, as the object store name."""
    return hashlib.sha256(data).hexdigest()
