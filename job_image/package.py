"""The code package format, and the checks that make unpacking it safe.

A package is a zip holding `cumulus.json` (the manifest) beside the user's files:

    {"kind": "function", "python": "3.11", "pickle": "function.pkl"}
    {"kind": "script", "entry": "train.py", "args": ["--epochs", "3"]}

A function package carries `function.pkl` = cloudpickle of (func, args, kwargs). This module
imports only the standard library: it runs inside the job container as well as in the gateway.
"""

from __future__ import annotations

import io
import json
import os
import stat
import zipfile
from pathlib import Path, PurePosixPath
from typing import IO, Any, TypeAlias

MANIFEST = "cumulus.json"
MAX_FILES = 20_000
MAX_RATIO = 200
"""Largest compression ratio of one entry; beyond it the entry is treated as a zip bomb."""


Source: TypeAlias = "bytes | str | os.PathLike[str] | IO[bytes]"
"""A package in memory, or a path to it, or a seekable file holding it: a large package is
checked and unpacked from its file, never read whole into memory."""


class PackageError(ValueError):
    """The package cannot be run as it is; the message says why."""


def _open(source: Source) -> zipfile.ZipFile:
    return zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source)


def _check_name(name: str) -> None:
    path = PurePosixPath(name)
    if name.startswith(("/", "\\")) or "\\" in name or ".." in path.parts or ":" in path.parts[0]:
        raise PackageError(f"code package entry {name!r} points outside the package")


def check(source: Source, max_unpacked: int) -> dict[str, Any]:
    """Validate a package and return its manifest; raises PackageError. Reads only the zip's
    directory and its manifest, whatever the package's size."""
    try:
        archive = _open(source)
    except (zipfile.BadZipFile, EOFError):
        raise PackageError("code package is not a zip file") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > MAX_FILES:
            raise PackageError(f"code package has {len(infos)} files; the limit is {MAX_FILES}")
        total = 0
        for info in infos:
            _check_name(info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise PackageError(f"code package entry {info.filename!r} is a symbolic link")
            total += info.file_size
            if info.compress_size and info.file_size / info.compress_size > MAX_RATIO:
                raise PackageError(
                    f"code package entry {info.filename!r} expands "
                    f"{info.file_size // info.compress_size}x (zip bomb guard)"
                )
        if total > max_unpacked:
            raise PackageError(
                f"code package unpacks to {total} bytes; the limit is {max_unpacked}"
            )
        try:
            manifest = json.loads(archive.read(MANIFEST))
        except KeyError:
            raise PackageError(f"code package has no {MANIFEST}") from None
        except (zipfile.BadZipFile, RuntimeError, NotImplementedError, EOFError) as exc:
            raise PackageError(f"cannot read {MANIFEST}: {exc}") from None
        except ValueError as exc:
            raise PackageError(f"{MANIFEST} is not valid JSON: {exc}") from None
        manifest = _check_manifest(manifest)
        if manifest["kind"] == "script" and manifest["entry"] not in {i.filename for i in infos}:
            raise PackageError(f"code package has no {manifest['entry']} (its entry)")
    return manifest


def _check_manifest(manifest: Any) -> dict[str, Any]:
    if not isinstance(manifest, dict) or manifest.get("kind") not in ("function", "script"):
        raise PackageError(f'{MANIFEST} must say "kind": "function" or "script"')
    if manifest["kind"] == "script":
        entry = manifest.get("entry")
        if not isinstance(entry, str) or not entry:
            raise PackageError(f'{MANIFEST} of a script must name its "entry"')
        _check_name(entry)
    return manifest


def unpack(source: Source, dest: Path, max_unpacked: int) -> dict[str, Any]:
    """Check, then extract into `dest`, counting real bytes written (sizes in headers can lie)."""
    manifest = check(source, max_unpacked)
    if not isinstance(source, (bytes, str, os.PathLike)):
        source.seek(0)
    dest.mkdir(parents=True, exist_ok=True)
    written = 0
    with _open(source) as archive:
        for info in archive.infolist():
            target = dest / info.filename
            if not os.path.realpath(target).startswith(os.path.realpath(dest) + os.sep):
                raise PackageError(
                    f"code package entry {info.filename!r} points outside the package"
                )
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 16):
                    written += len(chunk)
                    if written > max_unpacked:
                        raise PackageError(
                            f"code package unpacks to more than {max_unpacked} bytes"
                        )
                    out.write(chunk)
    return manifest
