"""The environment a job's container needs to stay inside its partition.

Visible devices are narrowed to the partition's device (by UUID for NVIDIA, which stays valid
inside a container that sees only that GPU; by index otherwise). A fractional share adds the
CUDA MPS client limits: pinned device memory and active thread percentage. The MPS memory
limit is keyed by the device ordinal *as the job sees it*: after CUDA_VISIBLE_DEVICES narrows
enumeration to one device that ordinal is 0, whatever the host index is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from .amounts import TENTHS_PER_GPU, format_amount, parse_amount
from .devices import MIB, Device
from .errors import InvalidRequest
from .partition import Partition

CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
NVIDIA_VISIBLE_DEVICES = "NVIDIA_VISIBLE_DEVICES"
MPS_MEM_LIMIT = "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"
MPS_THREAD_PERCENTAGE = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
PARTITION_ID = "CHRONOS_PARTITION_ID"
PARTITION_EXPIRES_AT = "CHRONOS_PARTITION_EXPIRES_AT"
DEVICE_KIND = "CHRONOS_DEVICE_KIND"
GPU_AMOUNT = "CUMULUS_GPU_AMOUNT"


def partition_env(partition: Partition, device: Device) -> dict[str, str]:
    """Environment variables confining a process to `partition` on `device`."""
    visible = device.uuid if device.kind == "nvidia" else str(device.index)
    env = {CUDA_VISIBLE_DEVICES: visible, NVIDIA_VISIBLE_DEVICES: visible}
    if partition.tenths < TENTHS_PER_GPU:
        limit_mib = device.memory_bytes * partition.tenths // (TENTHS_PER_GPU * MIB)
        env[MPS_MEM_LIMIT] = f"0={limit_mib}M"
        env[MPS_THREAD_PERCENTAGE] = str(partition.tenths * 100 // TENTHS_PER_GPU)
    env[PARTITION_ID] = partition.partition_id
    # Whole seconds, rounded down, so a job never believes it has time it has not.
    env[PARTITION_EXPIRES_AT] = str(math.floor(partition.expires_at))
    env[DEVICE_KIND] = device.kind
    env[GPU_AMOUNT] = format_amount(partition.tenths)
    return env


def merge_envs(envs: Sequence[Mapping[str, str]]) -> dict[str, str]:
    """One environment for a multi-device job made of whole-device partitions."""
    if not envs:
        raise InvalidRequest("merge_envs needs at least one partition environment")
    if len(envs) == 1:
        return dict(envs[0])
    if any(MPS_MEM_LIMIT in env or MPS_THREAD_PERCENTAGE in env for env in envs):
        raise InvalidRequest(
            "Only whole-device partitions (amount 1) can be combined into one job; "
            "a fractional share must be the job's only partition"
        )
    visible = [env[CUDA_VISIBLE_DEVICES] for env in envs]
    if len(set(visible)) != len(visible):
        raise InvalidRequest(f"A device appears twice among the partitions: {','.join(visible)}")
    kinds = list(dict.fromkeys(env[DEVICE_KIND] for env in envs))
    return {
        CUDA_VISIBLE_DEVICES: ",".join(visible),
        NVIDIA_VISIBLE_DEVICES: ",".join(env[NVIDIA_VISIBLE_DEVICES] for env in envs),
        PARTITION_ID: ",".join(env[PARTITION_ID] for env in envs),
        PARTITION_EXPIRES_AT: str(min(int(env[PARTITION_EXPIRES_AT]) for env in envs)),
        DEVICE_KIND: ",".join(kinds),
        GPU_AMOUNT: format_amount(sum(parse_amount(env[GPU_AMOUNT]) for env in envs)),
    }
