"""Finding 5: a job's `env` overrode what Cumulus sets (CUDA_VISIBLE_DEVICES,
CUDA_MPS_PINNED_DEVICE_MEM_LIMIT, NVIDIA_VISIBLE_DEVICES and CHRONOS_* escaped the partition;
CUMULUS_NETWORK=1 turned networking on) and `priority` was unbounded.

Now the gateway refuses variables Cumulus owns (INVALID_ARGUMENT naming the variable), network
is an option the operator's policy grants, and priority is bounded by policy.max_priority.
The requests go straight to the gateway (no SDK check in between); nothing is published.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient

from cumulus import AsyncClient, InvalidArgument, PermissionDenied, package_function
from services.stack import Stack
from shared import api
from tests.security.conftest import watch


def add(a: int, b: int) -> int:
    return a + b


OWNED = [
    "CUDA_VISIBLE_DEVICES",
    "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT",
    "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE",
    "NVIDIA_VISIBLE_DEVICES",
    "CHRONOS_PARTITION_ID",
    "CHRONOS_X",
    "CUMULUS_NETWORK",
    "LD_PRELOAD",
    "ld_preload",
    "PYTHONPATH",
]


@pytest.fixture
async def code_ref(alice: AsyncClient) -> str:
    return await alice.upload(package_function(add, (1, 2)))


async def submit_raw(alice: AsyncClient, code_ref: str, **fields: Any) -> Any:
    body = {"code_ref": code_ref, "gpu": 0.1, "duration": 600, **fields}
    return await api.request(alice.nc, "submit", body, dict, user="alice", timeout=5)


@pytest.mark.parametrize("name", OWNED)
async def test_a_variable_cumulus_owns_is_refused(
    alice: AsyncClient, admin: NatsClient, code_ref: str, name: str
) -> None:
    published = await watch(admin, "jobs.alice.*._.submitted")
    with pytest.raises(InvalidArgument) as refused:
        await submit_raw(alice, code_ref, env={name: "0,1"})
    assert name in str(refused.value)
    assert published.got == []


async def test_network_only_where_the_policy_allows(
    alice: AsyncClient, admin: NatsClient, code_ref: str
) -> None:
    published = await watch(admin, "jobs.alice.*._.submitted")
    with pytest.raises(PermissionDenied) as refused:
        await submit_raw(alice, code_ref, network=True)
    assert "policy.network" in str(refused.value)
    with pytest.raises(PermissionDenied):
        await alice.submit_package(
            package_function(add, (1, 2)), gpu=0.1, duration=600, network=True
        )
    assert published.got == []


async def test_network_where_the_policy_allows_it(make_stack: Any, tmp_path: Path) -> None:
    config = tmp_path / "cumulus.yaml"
    config.write_text("policy:\n  users:\n    carol: {network: true}\n")
    s: Stack = await make_stack(config_path=str(config))
    async with AsyncClient(profile=s.profile("carol")) as carol:
        job = await carol.submit_package(
            package_function(add, (2, 3)), gpu=0.1, duration=600, network=True
        )
        assert await job.result(timeout=60) == 5
    async with AsyncClient(profile=s.profile("dave")) as dave:
        with pytest.raises(PermissionDenied):
            await dave.submit_package(
                package_function(add, (2, 3)), gpu=0.1, duration=600, network=True
            )


@pytest.mark.parametrize("priority", [2**63 - 1, -(2**63), 101])
async def test_priority_is_bounded(
    alice: AsyncClient, admin: NatsClient, code_ref: str, priority: int
) -> None:
    published = await watch(admin, "jobs.alice.*._.submitted")
    with pytest.raises(InvalidArgument) as refused:
        await submit_raw(alice, code_ref, priority=priority)
    assert "priority" in str(refused.value)
    assert published.got == []
