"""CUDA work inside a job through the driver API (ctypes on libcuda.so): no framework needed.

scripts/gpu_check.py submits `run_job` from here; the module belongs to no installed
distribution, so the job package carries it by value (cumulus/_packaging.py) and the worker
needs only the NVIDIA driver. The PTX and the argument packing are plain values, testable
without a GPU (tests/unit/test_gpu_check.py).
"""

from __future__ import annotations

import ctypes
import os
import time
from typing import Any

KERNEL_NAME = b"fill"
BLOCK = 256

# out[i] = value + i for i < n: every thread writes one u32, so a read-back proves it ran.
# PTX 6.0 for sm_50 is JIT-compiled by any driver since CUDA 9, on every later architecture.
PTX = b"""
.version 6.0
.target sm_50
.address_size 64

.visible .entry fill(
    .param .u64 out,
    .param .u32 value,
    .param .u32 n
)
{
    .reg .pred %p<2>;
    .reg .b32 %r<8>;
    .reg .b64 %rd<5>;

    ld.param.u64 %rd1, [out];
    ld.param.u32 %r1, [value];
    ld.param.u32 %r2, [n];
    mov.u32 %r3, %ctaid.x;
    mov.u32 %r4, %ntid.x;
    mov.u32 %r5, %tid.x;
    mad.lo.s32 %r6, %r3, %r4, %r5;
    setp.ge.u32 %p1, %r6, %r2;
    @%p1 bra DONE;
    cvta.to.global.u64 %rd2, %rd1;
    mul.wide.u32 %rd3, %r6, 4;
    add.s64 %rd4, %rd2, %rd3;
    add.s32 %r7, %r6, %r1;
    st.global.u32 [%rd4], %r7;
DONE:
    ret;
}
"""

SHARE_VARIABLES = (
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT",
    "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE",
    "CUDA_MPS_PIPE_DIRECTORY",
    "CUDA_MPS_LOG_DIRECTORY",
    "CUMULUS_GPU_AMOUNT",
    "CHRONOS_PARTITION_ID",
    "CHRONOS_DEVICE_KIND",
)


class CudaError(RuntimeError):
    """A driver API call returned an error; `code` and `name` are the driver's."""

    def __init__(self, call: str, code: int, name: str, detail: str = "") -> None:
        super().__init__(f"{call} failed: {name} ({code}){detail}")
        self.call, self.code, self.name = call, code, name


def pack_args(pointer: int, value: int, count: int) -> tuple[list[Any], Any]:
    """`fill`'s kernelParams: an array of pointers, one to each argument's value. The values
    are returned too and must stay alive until the launch returns."""
    values: list[Any] = [ctypes.c_uint64(pointer), ctypes.c_uint32(value), ctypes.c_uint32(count)]
    params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
    return values, params


def grid_for(count: int, block: int = BLOCK) -> int:
    """Blocks of `block` threads enough for `count` elements (at least one)."""
    return max(1, -(-count // block))


def share_seen(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The share variables this process was given (CUDA_VISIBLE_DEVICES, the MPS limits)."""
    env = os.environ if environ is None else environ
    return {name: env[name] for name in SHARE_VARIABLES if name in env}


class Driver:
    """The few driver API calls the check makes, each raising CudaError on failure."""

    def __init__(self, library: str = "libcuda.so.1") -> None:
        self.lib = ctypes.CDLL(library)

    def name_of(self, code: int) -> str:
        text = ctypes.c_char_p()
        if self.lib.cuGetErrorName(code, ctypes.byref(text)) != 0 or not text.value:
            return "CUDA_ERROR_UNKNOWN"
        return text.value.decode()

    def call(self, name: str, *args: Any, detail: str = "") -> None:
        code = getattr(self.lib, name)(*args)
        if code != 0:
            raise CudaError(name, code, self.name_of(code), detail)


def use_mps_pipe(pipe: str, environ: Any = None) -> str:
    """Points the job at the check's private MPS daemon where its environment names none (the
    runner gives a job a clean environment); returns where the pipe directory came from."""
    env = os.environ if environ is None else environ
    if "CUDA_MPS_PIPE_DIRECTORY" in env:
        return "job environment"
    if not pipe:
        return "none (the default /tmp/nvidia-mps)"
    env["CUDA_MPS_PIPE_DIRECTORY"] = pipe
    return "set by the job from the check"


def run_job(
    alloc_bytes: int, seconds: float = 0.0, mps_pipe: str = "", count: int = 1 << 20
) -> dict[str, Any]:
    """In a job: allocate `alloc_bytes` on device 0 (as the job sees it), run `fill` over
    `count` u32s, again and again for at least `seconds`, read it back and report what the job
    saw. A failed allocation raises CudaError (the job fails with the driver's error name)."""
    started = time.time()
    share = share_seen()  # before use_mps_pipe: what the job was given
    report: dict[str, Any] = {"started_at": started, "share": share, "pid": os.getpid()}
    report["mps_pipe"] = use_mps_pipe(mps_pipe)
    cuda = Driver()
    cuda.call("cuInit", 0)
    device = ctypes.c_int()
    cuda.call("cuDeviceGet", ctypes.byref(device), 0)
    name = ctypes.create_string_buffer(256)
    cuda.call("cuDeviceGetName", name, 256, device)
    report["device_name"] = name.value.decode()
    context = ctypes.c_void_p()
    cuda.call("cuCtxCreate_v2", ctypes.byref(context), 0, device)
    try:
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        cuda.call("cuMemGetInfo_v2", ctypes.byref(free), ctypes.byref(total))
        report["mem_free"], report["mem_total"] = free.value, total.value
        block = ctypes.c_uint64()
        cuda.call(
            "cuMemAlloc_v2",
            ctypes.byref(block),
            ctypes.c_size_t(alloc_bytes),
            detail=f" allocating {alloc_bytes} bytes",
        )
        report["allocated"] = alloc_bytes
        try:
            count = min(count, alloc_bytes // 4)
            module, function = ctypes.c_void_p(), ctypes.c_void_p()
            cuda.call("cuModuleLoadData", ctypes.byref(module), ctypes.c_char_p(PTX))
            cuda.call("cuModuleGetFunction", ctypes.byref(function), module, KERNEL_NAME)
            launches = 0
            kernel_started = time.monotonic()
            while True:
                values, params = pack_args(block.value, launches, count)
                cuda.call(
                    "cuLaunchKernel", function, grid_for(count), 1, 1, BLOCK, 1, 1, 0, None,
                    params, None,
                )  # fmt: skip
                cuda.call("cuCtxSynchronize")
                launches += 1
                if time.monotonic() - kernel_started >= seconds:
                    break
            report["kernel_seconds"] = time.monotonic() - kernel_started
            report["launches"] = launches
            back = (ctypes.c_uint32 * min(count, 16))()
            cuda.call("cuMemcpyDtoH_v2", back, block, ctypes.c_size_t(ctypes.sizeof(back)))
            expected = [launches - 1 + i for i in range(len(back))]
            report["kernel_ok"] = list(back) == expected
        finally:
            cuda.call("cuMemFree_v2", block)
    finally:
        cuda.call("cuCtxDestroy_v2", context)
    report["ended_at"] = time.time()
    return report
