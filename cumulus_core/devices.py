"""Device discovery: NVIDIA through NVML, OpenCL through pyopencl, else declared virtual devices.

Virtual devices are the only stand-in for absent hardware; they are declared by a spec such
as ``"2x16GiB"`` or ``"1x80GiB,2x24GiB"`` (a bare number is bytes) and always carry
``kind="virtual"`` so every listing shows them for what they are.

Environment:
    CHRONOS_DEVICES          auto (default) | nvidia | opencl | virtual.
                             auto takes NVIDIA if NVML finds any, else OpenCL GPUs, else virtual.
    CHRONOS_VIRTUAL_DEVICES  the virtual spec used when virtual devices are chosen
                             (default ``"2x16GiB"``).
"""

from __future__ import annotations

import os
import re
import uuid
from decimal import Decimal
from typing import Any, Literal, Protocol

import msgspec

from .errors import DeviceUnavailable, InvalidDeviceSpec

DeviceKind = Literal["nvidia", "opencl", "virtual"]
BACKENDS = ("auto", "nvidia", "opencl", "virtual")
DEFAULT_VIRTUAL_SPEC = "2x16GiB"
MAX_VIRTUAL_DEVICES = 64
MIB = 1024**2

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "kib": 1024,
    "mb": 1000**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "gib": 1024**3,
    "tb": 1000**4,
    "tib": 1024**4,
}
_ITEM = re.compile(r"^(?:(\d+)\s*[xX]\s*)?(\d+(?:\.\d+)?)\s*([a-zA-Z]*)$")
_VIRTUAL_NAMESPACE = uuid.UUID("6c1f3a52-3f0e-4d5c-9a43-0b7f0d7f2c11")


class Device(msgspec.Struct, frozen=True):
    """One GPU as Chronos sees it; `index` is its position in discovery order."""

    index: int
    name: str
    memory_bytes: int
    kind: DeviceKind
    uuid: str


def parse_virtual_spec(spec: str) -> list[Device]:
    """Virtual devices from a spec like ``"1x80GiB,2x24GiB"``; sizes of at least 1 MiB."""
    items = [item.strip() for item in spec.split(",")]
    if not spec.strip() or any(not item for item in items):
        raise InvalidDeviceSpec(spec, "expected items like 2x16GiB separated by commas")
    sizes: list[int] = []
    for item in items:
        match = _ITEM.match(item)
        if match is None or match.group(3).lower() not in _UNITS:
            raise InvalidDeviceSpec(
                spec, f"cannot read {item!r}; write [COUNTx]SIZE with a unit B, MB, MiB, GB, GiB"
            )
        count = int(match.group(1) or "1")
        size = Decimal(match.group(2)) * _UNITS[match.group(3).lower()]
        if count < 1:
            raise InvalidDeviceSpec(spec, f"{item!r} declares no devices")
        if size < MIB or size != int(size):
            raise InvalidDeviceSpec(
                spec, f"{item!r}: a device needs a whole number of bytes >= 1MiB"
            )
        sizes.extend([int(size)] * count)
    if len(sizes) > MAX_VIRTUAL_DEVICES:
        raise InvalidDeviceSpec(
            spec, f"declares {len(sizes)} devices, at most {MAX_VIRTUAL_DEVICES}"
        )
    return [
        Device(
            index=index,
            name=f"Virtual GPU {_human_size(size)}",
            memory_bytes=size,
            kind="virtual",
            uuid=f"VIRTUAL-{uuid.uuid5(_VIRTUAL_NAMESPACE, f'{index}:{size}')}",
        )
        for index, size in enumerate(sizes)
    ]


def discover_devices(spec: str | None = None, backend: str | None = None) -> list[Device]:
    """The devices of this machine; `spec` and `backend` default to the environment."""
    chosen = (backend or os.environ.get("CHRONOS_DEVICES") or "auto").strip().lower()
    if chosen not in BACKENDS:
        raise InvalidDeviceSpec(chosen, f"backend must be one of {', '.join(BACKENDS)}")
    virtual_spec = spec or os.environ.get("CHRONOS_VIRTUAL_DEVICES") or DEFAULT_VIRTUAL_SPEC
    if chosen == "virtual":
        return parse_virtual_spec(virtual_spec)
    if chosen in ("auto", "nvidia"):
        found, why = _nvidia_devices()
        if found:
            return found
        if chosen == "nvidia":
            raise DeviceUnavailable("nvidia", why)
    found, why = _opencl_devices()
    if found:
        return found
    if chosen == "opencl":
        raise DeviceUnavailable("opencl", why)
    return parse_virtual_spec(virtual_spec)


class NvmlQueries(Protocol):
    """The NVML calls discovery makes (pynvml's names); recorded answers stand in for tests."""

    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...
    def nvmlDeviceGetName(self, handle: Any) -> Any: ...
    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any: ...
    def nvmlDeviceGetUUID(self, handle: Any) -> Any: ...


def nvml_devices(nvml: NvmlQueries) -> list[Device]:
    """The Devices NVML reports, in its index order; NVML must already be initialised."""
    devices = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        devices.append(
            Device(
                index=index,
                name=_text(nvml.nvmlDeviceGetName(handle)),
                memory_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
                kind="nvidia",
                uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
            )
        )
    return devices


def _nvidia_devices() -> tuple[list[Device], str]:
    """NVIDIA GPUs via NVML, or none and the reason; pynvml is imported only if installed."""
    try:
        import pynvml
    except ImportError:
        return [], "pynvml (nvidia-ml-py) is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        return [], f"NVML failed to start: {err}"
    try:
        return nvml_devices(pynvml), "NVML reports no devices"
    except pynvml.NVMLError as err:
        return [], f"NVML query failed: {err}"
    finally:
        pynvml.nvmlShutdown()


def _opencl_devices() -> tuple[list[Device], str]:
    """OpenCL GPU devices of every platform, or none and the reason."""
    try:
        import pyopencl
    except ImportError:
        return [], "pyopencl is not installed"
    try:
        platforms = pyopencl.get_platforms()
    except pyopencl.Error as err:
        return [], f"no OpenCL platform: {err}"
    devices: list[Device] = []
    for platform in platforms:
        try:
            found = platform.get_devices(device_type=pyopencl.device_type.GPU)
        except pyopencl.Error:
            continue  # a platform without GPUs raises DEVICE_NOT_FOUND
        for cl_device in found:
            index = len(devices)
            devices.append(
                Device(
                    index=index,
                    name=str(cl_device.name).strip(),
                    memory_bytes=int(cl_device.global_mem_size),
                    kind="opencl",
                    uuid=f"OPENCL-{uuid.uuid5(_VIRTUAL_NAMESPACE, f'{platform.name}:{index}')}",
                )
            )
    return devices, "no OpenCL GPU device on any platform"


def _text(value: Any) -> str:
    """NVML returns bytes in old bindings and str in new ones."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _human_size(size: int) -> str:
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", MIB)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"
