"""Device discovery: declared virtual devices, backend choice, and clear refusals."""

from __future__ import annotations

import importlib.util

import pytest

from cumulus_core import (
    DeviceUnavailable,
    InvalidDeviceSpec,
    InvalidRequest,
    discover_devices,
    parse_virtual_spec,
)

GIB = 1024**3


def test_spec_declares_devices_in_order() -> None:
    devices = parse_virtual_spec("1x80GiB,2x24GiB")
    assert [(d.index, d.memory_bytes, d.kind) for d in devices] == [
        (0, 80 * GIB, "virtual"),
        (1, 24 * GIB, "virtual"),
        (2, 24 * GIB, "virtual"),
    ]
    assert devices[0].name == "Virtual GPU 80GiB"
    assert len({d.uuid for d in devices}) == 3
    assert all(d.uuid.startswith("VIRTUAL-") for d in devices)


def test_uuids_are_stable_across_calls() -> None:
    assert parse_virtual_spec("2x16GiB") == parse_virtual_spec("2x16GiB")


@pytest.mark.parametrize(
    ("spec", "sizes"),
    [
        ("17179869184", [16 * GIB]),
        ("16GiB", [16 * GIB]),
        ("2 x 1.5GiB", [1536 * 1024**2] * 2),
        ("1x16gb", [16 * 1000**3]),
        ("3X512MiB", [512 * 1024**2] * 3),
    ],
)
def test_spec_spellings(spec: str, sizes: list[int]) -> None:
    assert [d.memory_bytes for d in parse_virtual_spec(spec)] == sizes


@pytest.mark.parametrize(
    "spec",
    ["", " ", "2x", "x16GiB", "0x16GiB", "2x16XB", "16GiB,", "abc", "1024", "2x0.3B", "65x1GiB"],
)
def test_bad_specs_are_refused_clearly(spec: str) -> None:
    with pytest.raises(InvalidDeviceSpec, match="Invalid device spec") as caught:
        parse_virtual_spec(spec)
    assert isinstance(caught.value, InvalidRequest)
    assert isinstance(caught.value, ValueError)


def test_virtual_backend_uses_the_spec_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CHRONOS_DEVICES", "virtual")
    monkeypatch.setenv("CHRONOS_VIRTUAL_DEVICES", "3x8GiB")
    assert [d.memory_bytes for d in discover_devices()] == [8 * GIB] * 3
    assert [d.memory_bytes for d in discover_devices("1x40GiB")] == [40 * GIB]
    monkeypatch.delenv("CHRONOS_VIRTUAL_DEVICES")
    assert [d.memory_bytes for d in discover_devices()] == [16 * GIB] * 2


def test_explicit_backend_beats_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHRONOS_DEVICES", "bogus")
    assert discover_devices("1x1GiB", backend="virtual")[0].kind == "virtual"


def test_unknown_backend_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHRONOS_DEVICES", "tpu")
    with pytest.raises(InvalidDeviceSpec, match="backend must be one of auto, nvidia"):
        discover_devices()


@pytest.mark.skipif(importlib.util.find_spec("pynvml") is not None, reason="NVML bindings present")
def test_demanding_nvidia_without_nvml_is_a_clear_error() -> None:
    with pytest.raises(DeviceUnavailable, match="No nvidia devices: pynvml"):
        discover_devices(backend="nvidia")


@pytest.mark.skipif(importlib.util.find_spec("pyopencl") is not None, reason="pyopencl present")
def test_demanding_opencl_without_pyopencl_is_a_clear_error() -> None:
    with pytest.raises(DeviceUnavailable, match="No opencl devices: pyopencl"):
        discover_devices(backend="opencl")


@pytest.mark.skipif(
    importlib.util.find_spec("pynvml") is not None
    or importlib.util.find_spec("pyopencl") is not None,
    reason="a GPU backend's bindings are present",
)
def test_auto_falls_back_to_declared_virtual_devices() -> None:
    devices = discover_devices("1x24GiB", backend="auto")
    assert [(d.kind, d.memory_bytes) for d in devices] == [("virtual", 24 * GIB)]
