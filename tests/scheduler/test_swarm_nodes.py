"""Swarm nodes as the scheduler sees them: matching, change detection, and the real Swarm."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from cumulus import AsyncClient
from services.scheduler.swarm import observations
from services.stack import Stack
from shared import api
from tests.scheduler.harness import Driver


def node_attrs(
    hostname: str, state: str = "ready", availability: str = "active", **labels: str
) -> dict[str, Any]:
    return {
        "ID": f"id-{hostname}",
        "Description": {"Hostname": hostname},
        "Status": {"State": state},
        "Spec": {"Availability": availability, "Labels": labels},
    }


def test_nodes_match_workers_by_label_then_host_name_and_only_changes_count() -> None:
    d = Driver()
    d.add_worker("w1", 1)  # harness: hostname == worker id
    d.add_worker("w2", 1)
    nodes = [
        node_attrs("w1", **{"gpu.count": "1"}),
        node_attrs("elsewhere", **{"cumulus.worker": "w2"}),
        node_attrs("stranger"),
    ]
    seen = observations(nodes, d.state)
    assert [(o.worker_id, o.node_id) for o in seen] == [("w1", "id-w1"), ("w2", "id-elsewhere")]
    for o in seen:
        d.feed(o)
    assert observations(nodes, d.state) == []
    nodes[0]["Spec"]["Availability"] = "drain"
    assert [o.availability for o in observations(nodes, d.state)] == ["drain"]


def _docker() -> Any:
    try:
        import docker

        client = docker.from_env(timeout=5)
        if client.info().get("Swarm", {}).get("LocalNodeState") != "active":
            raise RuntimeError("Swarm is not active")
        return client
    except Exception as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"needs a Docker engine with an active Swarm: {exc}")


@pytest.mark.docker
@pytest.mark.slow
async def test_the_real_swarm_node_labels_and_drain_reach_the_scheduler(
    make_stack: Any, tmp_path: Path
) -> None:
    client = _docker()
    (me,) = [n for n in client.nodes.list() if n.attrs["ID"] == client.info()["Swarm"]["NodeID"]]
    spec = dict(me.attrs["Spec"])
    stack: Stack = await make_stack(
        devices="1x16GiB",
        proc_env={
            "scheduler": {
                "CUMULUS_SCHEDULER_SWARM_NODES": "true",
                "CUMULUS_SCHEDULER_SWARM_POLL_S": "0.2",
            }
        },
    )
    try:
        labels = {
            "cumulus.worker": "worker-1",
            "gpu.count": "1",
            "gpu.0.name": "Virtual GPU",
            "chronos.installed": "true",
        }
        me.update({**spec, "Labels": {**(spec.get("Labels") or {}), **labels}})
        async with AsyncClient(profile=stack.profile()) as sdk:

            async def worker() -> dict[str, Any]:
                reply = await api.request(sdk.nc, "workers", {}, dict)
                return reply["workers"][0]

            async def until(check: Any) -> dict[str, Any]:
                deadline = time.monotonic() + 15
                while True:
                    seen = await worker()
                    if check(seen) or time.monotonic() > deadline:
                        return seen
                    await asyncio.sleep(0.1)

            # The node matches worker-1 by host name at once; the labels come with the next poll.
            seen = await until(
                lambda w: w["node"] is not None and "gpu.count" in w["node"]["labels"]
            )
            assert seen["node"]["labels"]["gpu.count"] == "1"
            assert seen["node"]["state"] == "ready"
            me.reload()
            me.update({**me.attrs["Spec"], "Availability": "drain"})
            assert (await until(lambda w: w["status"] == "drain"))["status"] == "drain"
    finally:
        me.reload()
        me.update(spec)  # the node as it was: active, its own labels
