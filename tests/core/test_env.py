"""The environment that keeps a container inside its partition."""

from __future__ import annotations

import pytest

from cumulus_core import Device, InvalidRequest, Partition, merge_envs, partition_env

GIB = 1024**3
VIRTUAL = Device(
    index=1, name="Virtual GPU 16GiB", memory_bytes=16 * GIB, kind="virtual", uuid="VIRTUAL-x"
)
NVIDIA = Device(
    index=3, name="NVIDIA H200", memory_bytes=140 * GIB, kind="nvidia", uuid="GPU-1234-abcd"
)


def partition(device: int, tenths: int, number: int = 1) -> Partition:
    return Partition(
        partition_id=f"partition_{number:04d}",
        device=device,
        tenths=tenths,
        memory_bytes=0,
        created_at=1000.0,
        expires_at=1060.75 + number,
    )


def test_fractional_share_on_a_virtual_device() -> None:
    assert partition_env(partition(1, 3), VIRTUAL) == {
        "CUDA_VISIBLE_DEVICES": "1",
        "NVIDIA_VISIBLE_DEVICES": "1",
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=4915M",
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30",
        "CHRONOS_PARTITION_ID": "partition_0001",
        "CHRONOS_PARTITION_EXPIRES_AT": "1061",
        "CHRONOS_DEVICE_KIND": "virtual",
        "CUMULUS_GPU_AMOUNT": "0.3",
    }


def test_nvidia_devices_are_named_by_uuid() -> None:
    env = partition_env(partition(3, 5), NVIDIA)
    assert env["CUDA_VISIBLE_DEVICES"] == env["NVIDIA_VISIBLE_DEVICES"] == "GPU-1234-abcd"
    assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=71680M"
    assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50"
    assert env["CHRONOS_DEVICE_KIND"] == "nvidia"


def test_a_whole_device_has_no_mps_limits() -> None:
    env = partition_env(partition(1, 10), VIRTUAL)
    assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in env
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in env
    assert env["CUMULUS_GPU_AMOUNT"] == "1"


def test_merge_whole_devices_for_a_multi_gpu_job() -> None:
    devices = [
        Device(
            index=i, name="Virtual GPU 16GiB", memory_bytes=16 * GIB, kind="virtual", uuid=f"V-{i}"
        )
        for i in range(3)
    ]
    envs = [partition_env(partition(i, 10, number=i + 1), devices[i]) for i in (0, 2)]
    assert merge_envs(envs) == {
        "CUDA_VISIBLE_DEVICES": "0,2",
        "NVIDIA_VISIBLE_DEVICES": "0,2",
        "CHRONOS_PARTITION_ID": "partition_0001,partition_0003",
        "CHRONOS_PARTITION_EXPIRES_AT": "1061",
        "CHRONOS_DEVICE_KIND": "virtual",
        "CUMULUS_GPU_AMOUNT": "2",
    }


def test_merge_of_one_is_a_copy() -> None:
    env = partition_env(partition(1, 4), VIRTUAL)
    merged = merge_envs([env])
    assert merged == env
    assert merged is not env


def test_merge_refuses_fractions_duplicates_and_nothing() -> None:
    whole = partition_env(partition(1, 10), VIRTUAL)
    with pytest.raises(InvalidRequest, match="Only whole-device partitions"):
        merge_envs([whole, partition_env(partition(3, 5), NVIDIA)])
    with pytest.raises(InvalidRequest, match="appears twice"):
        merge_envs([whole, whole])
    with pytest.raises(InvalidRequest, match="at least one"):
        merge_envs([])
