"""Code packages are untrusted zips: only a well-formed, bounded package is accepted or unpacked."""

from __future__ import annotations

import io
import json
import stat
import zipfile
from pathlib import Path

import pytest

from job_image.package import MANIFEST, PackageError, check, unpack

LIMIT = 10 * 1024 * 1024
FUNCTION = {"kind": "function", "python": "3.11", "pickle": "function.pkl"}
SCRIPT = {"kind": "script", "entry": "train.py", "args": ["--epochs", "3"]}


def make_zip(
    entries: dict[str, bytes], *, symlinks: tuple[str, ...] = (), stored: bool = False
) -> bytes:
    buf = io.BytesIO()
    method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(buf, "w", method) as archive:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = method
            if name in symlinks:
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, data)
    return buf.getvalue()


def manifest(data: dict[str, object]) -> bytes:
    return json.dumps(data).encode()


def function_package(**extra: bytes) -> bytes:
    return make_zip({MANIFEST: manifest(FUNCTION), "function.pkl": b"pickle bytes", **extra})


def script_package(**extra: bytes) -> bytes:
    return make_zip(
        {
            MANIFEST: manifest(SCRIPT),
            "train.py": b"print('hi')\n",
            "lib/util.py": b"X = 1\n",
            **extra,
        }
    )


def test_function_package_passes() -> None:
    assert check(function_package(), LIMIT) == FUNCTION


def test_script_package_passes() -> None:
    assert check(script_package(), LIMIT) == SCRIPT


@pytest.mark.parametrize(
    "name", ["../x", "lib/../../x", "/abs", "/etc/passwd", "a\\..\\..\\x", "C:/windows"]
)
def test_entries_pointing_outside_are_rejected(name: str) -> None:
    with pytest.raises(PackageError, match="points outside the package"):
        check(function_package(**{name: b"evil"}), LIMIT)


def test_symlink_entry_is_rejected() -> None:
    data = make_zip(
        {MANIFEST: manifest(FUNCTION), "function.pkl": b"p", "link": b"/etc/passwd"},
        symlinks=("link",),
    )
    with pytest.raises(PackageError, match="'link' is a symbolic link"):
        check(data, LIMIT)


def test_not_a_zip_is_rejected() -> None:
    with pytest.raises(PackageError, match="not a zip file"):
        check(b"PK\x03\x04 but not really", LIMIT)


def test_missing_manifest_is_rejected() -> None:
    with pytest.raises(PackageError, match=f"no {MANIFEST}"):
        check(make_zip({"function.pkl": b"p"}), LIMIT)


@pytest.mark.parametrize("text", [b"{not json", b"\xff\xfe\x00", b""])
def test_bad_json_manifest_is_rejected(text: bytes) -> None:
    with pytest.raises(PackageError, match=f"{MANIFEST} is not valid JSON"):
        check(make_zip({MANIFEST: text}), LIMIT)


@pytest.mark.parametrize(
    "content",
    [{"kind": "notebook"}, {}, {"kind": None}, ["function"], "function"],
    ids=["unknown-kind", "no-kind", "null-kind", "list", "string"],
)
def test_unknown_kind_is_rejected(content: object) -> None:
    with pytest.raises(PackageError, match='must say "kind": "function" or "script"'):
        check(make_zip({MANIFEST: json.dumps(content).encode()}), LIMIT)


@pytest.mark.parametrize("entry", [None, "", 42])
def test_script_without_entry_is_rejected(entry: object) -> None:
    content: dict[str, object] = {"kind": "script"}
    if entry is not None:
        content["entry"] = entry
    with pytest.raises(PackageError, match='must name its "entry"'):
        check(make_zip({MANIFEST: manifest(content), "train.py": b""}), LIMIT)


def test_script_entry_outside_the_package_is_rejected() -> None:
    content = {"kind": "script", "entry": "../../bin/sh"}
    with pytest.raises(PackageError, match="points outside the package"):
        check(make_zip({MANIFEST: manifest(content)}), LIMIT)


def test_too_large_total_unpacked_size_is_rejected() -> None:
    # stored, not compressed, so only the total size can be at fault
    data = make_zip(
        {MANIFEST: manifest(FUNCTION), "a.bin": b"a" * 600, "b.bin": b"b" * 600}, stored=True
    )
    with pytest.raises(PackageError, match="unpacks to .* bytes; the limit is 1000"):
        check(data, 1000)
    assert check(data, 10_000) == FUNCTION


def test_highly_compressible_entry_is_rejected_as_a_bomb() -> None:
    data = make_zip({MANIFEST: manifest(FUNCTION), "zeros.bin": bytes(50 * 1024 * 1024)})
    assert len(data) < 1024 * 1024
    with pytest.raises(PackageError, match=r"'zeros\.bin' expands \d+x \(zip bomb guard\)"):
        check(data, 1024 * 1024 * 1024)


def test_unpack_extracts_a_valid_package(tmp_path: Path) -> None:
    dest = tmp_path / "work"
    assert unpack(script_package(), dest, LIMIT) == SCRIPT
    assert (dest / "train.py").read_bytes() == b"print('hi')\n"
    assert (dest / "lib" / "util.py").read_bytes() == b"X = 1\n"
    assert json.loads((dest / MANIFEST).read_bytes()) == SCRIPT


def test_unpack_refuses_traversal_and_writes_nothing_outside(tmp_path: Path) -> None:
    dest = tmp_path / "work"
    with pytest.raises(PackageError, match="points outside the package"):
        unpack(function_package(**{"../escaped.txt": b"evil"}), dest, LIMIT)
    assert not (tmp_path / "escaped.txt").exists()


def test_unpack_refuses_a_symlink(tmp_path: Path) -> None:
    data = make_zip({MANIFEST: manifest(FUNCTION), "link": b"/etc/passwd"}, symlinks=("link",))
    with pytest.raises(PackageError, match="symbolic link"):
        unpack(data, tmp_path / "work", LIMIT)
    assert not (tmp_path / "work" / "link").exists()


def test_unpack_stops_when_real_bytes_exceed_the_limit(tmp_path: Path) -> None:
    data = make_zip({MANIFEST: manifest(FUNCTION), "a.bin": b"a" * 600, "b.bin": b"b" * 600})
    with pytest.raises(PackageError, match="the limit is 1000"):
        unpack(data, tmp_path / "work", 1000)


def test_corrupt_manifest_is_a_package_error() -> None:
    data = make_zip({MANIFEST: manifest(FUNCTION), "function.pkl": b"p"}, stored=True)
    corrupt = data.replace(b'"kind": "function"', b'"kind": "functioN"')
    assert corrupt != data
    with pytest.raises(PackageError):
        check(corrupt, LIMIT)
