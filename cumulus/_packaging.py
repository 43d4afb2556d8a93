"""Turning a Python function (with its closure and local modules) or a script into a package.

Two ways to ship a function, chosen by `choose_packaging` and recorded in the manifest:

- **pickle** (where the client's and the workers' Pythons match): cloudpickle of
  `(func, args, kwargs)`. The user's own modules (files that belong to no installed
  distribution: the script, test modules, helpers beside them) are pickled by value, so the job
  needs none of the client's files; installed packages are pickled by reference and must be
  importable in the job (list them in `requirements`).
- **source** (where they differ, since cloudpickled code objects only load on the Python that
  made them): the source files of those same local modules, and a version-independent pickle
  that imports the function by name and calls it. Only a function reachable by name (defined
  at a module's top level) can travel this way.

Scripts and directories travel as files with their requirements (`package_script`).
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import importlib.metadata
import io
import json
import os
import pickle
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import cloudpickle

from cumulus._options import Packaging
from job_image.package import MANIFEST, MAX_FILES, MAX_RATIO
from shared.errors import PackagingError

CLIENT_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
MAX_PACKAGE_BYTES = 2 * 1024 * 1024 * 1024
"""The gateway's default limit on a code package (limits.max_code_bytes)."""
MAIN_AS = "__cumulus_main__"
"""The name a `__main__` script's source is imported under in the job."""
SKIP_DIRS = frozenset(
    {"__pycache__", "node_modules", "venv", "env", "build", "dist", "site-packages"}
)


@functools.cache
def _distributed() -> frozenset[str]:
    """Top-level import names that belong to an installed distribution (editable ones too)."""
    return frozenset(importlib.metadata.packages_distributions())


def _is_local(module: ModuleType) -> bool:
    """The user's own module: a file, not stdlib, not part of any installed distribution."""
    if module.__name__ == "__main__":
        return False  # cloudpickle already pickles __main__ by value
    path = getattr(module, "__file__", None)
    return bool(path) and _local_file(module.__name__, path)


@functools.lru_cache(maxsize=4096)
def _local_file(name: str, path: str) -> bool:
    """Whether module `name` at `path` is the user's own: one realpath per module, not one per
    module per submit (a script's function reaches dozens; that was most of a submit's CPU)."""
    if name.partition(".")[0] in _distributed():
        return False
    resolved = os.path.realpath(path)
    return not any(resolved.startswith(root) for root in _system_roots())


@functools.cache
def _system_roots() -> tuple[str, ...]:
    import sysconfig

    paths = sysconfig.get_paths()
    roots = {paths["stdlib"], paths["platstdlib"], paths["purelib"], paths["platlib"]}
    roots |= {sys.prefix, sys.base_prefix, sys.exec_prefix}
    return tuple(os.path.realpath(p) + os.sep for p in roots)


def local_modules(func: Any) -> list[ModuleType]:
    """The user's modules `func` may reach: its own and, transitively, the local modules (or
    objects of local modules) in their globals. Sorted by name, so packages are reproducible."""
    start = sys.modules.get(getattr(func, "__module__", "") or "")
    seen: dict[str, ModuleType] = {}
    todo = [start] if start is not None else []
    main = sys.modules.get("__main__")
    while todo and len(seen) < 500:
        module = todo.pop()
        if module.__name__ in seen or not (_is_local(module) or module is main):
            continue
        seen[module.__name__] = module
        for value in list(vars(module).values()):
            if isinstance(value, ModuleType):
                todo.append(value)
            else:
                owner = getattr(value, "__module__", None)
                if isinstance(owner, str) and owner in sys.modules and owner not in seen:
                    todo.append(sys.modules[owner])
    return [seen[name] for name in sorted(seen) if name != "__main__"] + (
        [seen["__main__"]] if "__main__" in seen else []
    )


SAMPLE_BYTES = 1 << 20
"""Piece of a large entry compressed to judge the whole (three: its start, middle and end)."""


def _ratio(data: bytes) -> float:
    """How well `data` compresses: exactly for a small entry; from three samples for a large
    one (compressing hundreds of MiB twice, to judge and then to store, was most of a large
    submit's time)."""
    if len(data) <= 4 * SAMPLE_BYTES:
        return len(data) / (len(zlib.compress(data, 6)) or 1)
    view = memoryview(data)
    starts = (0, len(data) // 2, len(data) - SAMPLE_BYTES)
    samples = [view[i : i + SAMPLE_BYTES] for i in starts]
    return 3 * SAMPLE_BYTES / (sum(len(zlib.compress(piece, 1)) for piece in samples) or 1)


def _zip(files: dict[str, bytes], stored: frozenset[str] = frozenset()) -> bytes:
    """A reproducible zip. Stored rather than deflated: an entry that does not compress (random
    data, compressed formats: deflating it costs time and saves nothing) and one that compresses
    too well (the gateway's bomb guard), judged by `_ratio`, or named in `stored`."""
    buf = io.BytesIO()
    too_good: list[str] = []
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(files):
            data = files[name]
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            ratio = _ratio(data) if name not in stored else 0.0
            keep = name in stored or ratio < 1.05 or ratio > MAX_RATIO / 2
            info.compress_type = zipfile.ZIP_STORED if keep else zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
            if not keep and info.file_size > (info.compress_size or 1) * (MAX_RATIO / 2):
                too_good.append(name)  # a large entry its samples misjudged
    if too_good:
        return _zip(files, stored | frozenset(too_good))
    return buf.getvalue()


def choose_packaging(
    requested: Packaging, worker_pythons: Iterable[str], client_python: str = CLIENT_PYTHON
) -> tuple[Literal["pickle", "source"], str]:
    """(how to ship a function, the sentence that says why).

    `worker_pythons` are the `python` labels the workers report; a worker that reports none is
    taken to run the client's Python (the embedded stack runs jobs with the client's own).
    """
    others = sorted({p for p in worker_pythons if p and p != client_python})
    if requested == "pickle":
        return "pickle", f"cloudpickle (Python {client_python}), as asked"
    if requested == "source":
        return "source", "source, as asked"
    if requested != "auto":
        raise PackagingError(f"packaging must be 'auto', 'pickle' or 'source', not {requested!r}")
    if others:
        return "source", (
            f"source, since workers run Python {', '.join(others)} and this client "
            f"{client_python} (cloudpickled code only loads on the Python that made it)"
        )
    return "pickle", f"cloudpickle (Python {client_python} here and on the workers)"


def package_function(
    func: Callable[..., Any],
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    requirements: Sequence[str] = (),
    packaging: Literal["pickle", "source"] = "pickle",
) -> bytes:
    """A function package: the call `func(*args, **kwargs)` and the manifest."""
    if not callable(func):
        raise PackagingError(f"{func!r} is not callable")
    func = getattr(func, "__cumulus_function__", func)  # a @remote function ships as itself
    name = getattr(func, "__qualname__", None) or repr(func)
    manifest: dict[str, Any] = {
        "kind": "function",
        "pickle": "function.pkl",
        "python": CLIENT_PYTHON,
        "name": name,
        "packaging": packaging,
        "requirements": list(requirements),
    }
    if packaging == "source":
        files, module_name = _source_files(func)
        manifest["module"] = module_name
        files["function.pkl"] = _source_call(func, module_name, tuple(args), dict(kwargs or {}))
    else:
        files = {"function.pkl": _pickled_call(func, tuple(args), dict(kwargs or {}))}
        manifest["cloudpickle"] = cloudpickle.__version__  # the job's must load what it made
    files[MANIFEST] = json.dumps(manifest).encode()
    return _zip(files)


def _pickled_call(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    registered = []
    for module in local_modules(func):
        if module.__name__ != "__main__":
            cloudpickle.register_pickle_by_value(module)
            registered.append(module)
    try:
        data: bytes = cloudpickle.dumps((func, args, kwargs))
        return data
    except Exception as exc:
        raise PackagingError(
            f"cannot package {getattr(func, '__qualname__', func)!r}: {type(exc).__name__}: {exc}. "
            "Pass only picklable arguments, and create clients, locks and open files "
            "inside the function"
        ) from None
    finally:
        for module in registered:
            cloudpickle.unregister_pickle_by_value(module)


def _source_files(func: Callable[..., Any]) -> tuple[dict[str, bytes], str]:
    """The source files of the local modules `func` reaches, keyed by their path in the job,
    and the name the function's module is imported under there."""
    qualname = getattr(func, "__qualname__", "")
    module = sys.modules.get(getattr(func, "__module__", "") or "")
    if module is None or not qualname or not all(p.isidentifier() for p in qualname.split(".")):
        raise PackagingError(
            f"cannot package {qualname or func!r} as source: only functions defined at a "
            "module's top level can be imported by name in the job (not lambdas, nested "
            "functions or closures). Move it to the top level, or use the workers' Python "
            "version so that it can be cloudpickled"
        )
    if not _is_local(module) and module.__name__ != "__main__":
        return {}, module.__name__  # an installed module: the job imports it as it is
    files: dict[str, bytes] = {}
    for mod in local_modules(func):
        path = getattr(mod, "__file__", None)
        if not path or not path.endswith(".py"):
            raise PackagingError(
                f"cannot package module {mod.__name__} as source: it has no .py file "
                "(defined in a notebook or an interactive session?); put the function in a file"
            )
        if mod.__name__ == "__main__":
            files[f"{MAIN_AS}.py"] = Path(path).read_bytes()
            continue
        parts = mod.__name__.split(".")
        is_package = Path(path).name == "__init__.py"
        rel = Path(*parts, "__init__.py") if is_package else Path(*parts[:-1], parts[-1] + ".py")
        files[rel.as_posix()] = Path(path).read_bytes()
        for depth in range(1, len(parts)):  # the parent packages' __init__ files
            parent = sys.modules.get(".".join(parts[:depth]))
            init = getattr(parent, "__file__", None)
            key = Path(*parts[:depth], "__init__.py").as_posix()
            if init and key not in files:
                files[key] = Path(init).read_bytes()
    return files, MAIN_AS if module.__name__ == "__main__" else module.__name__


def _source_call(
    func: Callable[..., Any], module_name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> bytes:
    """A pickle any Python 3 reads: `eval` (by reference) of an import-and-call expression."""
    target = "".join(f".{part}" for part in func.__qualname__.split("."))
    expression = f"__import__('importlib').import_module({module_name!r}){target}(*__a, **__k)"
    try:
        return pickle.dumps((builtins.eval, (expression, {"__a": args, "__k": kwargs}), {}), 4)
    except Exception as exc:
        raise PackagingError(
            f"cannot package the arguments of {func.__qualname__!r} as source: "
            f"{type(exc).__name__}: {exc}. Pass plain data (numbers, strings, lists, dicts, "
            "instances of top-level classes)"
        ) from None


def read_requirements(path: str | Path) -> list[str]:
    """The requirement lines of a requirements.txt (comments and blanks dropped, `-r` followed)."""
    file = Path(path)
    if not file.is_file():
        raise PackagingError(f"requirements file {file} does not exist")
    found: list[str] = []
    for number, raw in enumerate(file.read_text().splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("-r ", "--requirement ")):
            found += read_requirements(file.parent / line.split(None, 1)[1])
        elif line.startswith("-"):
            raise PackagingError(
                f"{file}:{number}: pip option {line.split()[0]!r} cannot be sent to the workers; "
                "list plain requirements (the workers choose the index or wheelhouse)"
            )
        else:
            found.append(line)
    return found


def _directory_files(root: Path, limit: int) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    total = 0
    for folder, dirs, names in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS)
        for name in sorted(names):
            path = Path(folder, name)
            if name.endswith((".pyc", ".pyo")) or name.startswith("."):
                continue
            if path.is_symlink() and not os.path.realpath(path).startswith(
                os.path.realpath(root) + os.sep
            ):
                raise PackagingError(
                    f"{path} is a link to {os.path.realpath(path)}, outside {root}; "
                    "copy the file in or remove the link"
                )
            if not path.is_file():
                continue
            data = path.read_bytes()
            total += len(data)
            if total > limit or len(files) >= MAX_FILES:
                raise PackagingError(
                    f"the working directory {root} holds more than {limit // (1024 * 1024)} MiB "
                    f"or {MAX_FILES} files; put the script in a directory of its own (or pass "
                    "a smaller working directory), and fetch data inside the job"
                )
            files[path.relative_to(root).as_posix()] = data
    return files


def package_script(
    path: str | Path,
    args: Sequence[str] = (),
    requirements: Sequence[str] = (),
    working_dir: str | Path | None = None,
    max_bytes: int = MAX_PACKAGE_BYTES,
) -> bytes:
    """A script package: the script (or its whole `working_dir`) and the manifest.

    With `working_dir` the job runs in a copy of that directory (hidden files, caches and
    virtualenvs left out), so the script can import its neighbours and read its data files.
    """
    script = Path(path)
    if not script.is_file():
        raise PackagingError(f"script {script} does not exist")
    if working_dir is None:
        root, files = script.parent, {script.name: script.read_bytes()}
    else:
        root = Path(working_dir)
        if not root.is_dir():
            raise PackagingError(f"working directory {root} does not exist")
        files = _directory_files(root, max_bytes)
    entry = script_entry(script, root)
    files[entry] = script.read_bytes()
    manifest = {
        "kind": "script",
        "entry": entry,
        "args": list(args),
        "requirements": list(requirements),
    }
    files[MANIFEST] = json.dumps(manifest).encode()
    return _zip(files)


def script_entry(script: str | Path, working_dir: str | Path | None = None) -> str:
    """The script's path inside its package (relative to the working directory)."""
    root = Path(working_dir) if working_dir is not None else Path(script).parent
    try:
        return Path(script).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        raise PackagingError(
            f"script {script} is not inside the working directory {root}"
        ) from None


def code_ref(data: bytes) -> str:
    """The content address of a package: its sha256, as the object store name."""
    return hashlib.sha256(data).hexdigest()
