"""Measure the Docker/Swarm facts Cumulus relies on, with the python `docker` SDK.

Run with the project venv after infra/ci/setup-docker.sh and infra/images/build-base.sh:

    .venv/bin/python infra/ci/docker_facts.py [--image cumulus-base:bookworm] [--runs 5]

Prints one JSON object.  Creates only objects named `cu-facts-*` and removes them again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import docker
from docker.types import (
    ContainerSpec,
    Placement,
    Resources,
    RestartPolicy,
    TaskTemplate,
)

PREFIX = "cu-facts-"
NET = PREFIX + "nonet"


def ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 1)


def run_latency(client: docker.DockerClient, image: str, runs: int) -> dict[str, Any]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        res = client.containers.run(image, ["python3", "-c", "print(2+2)"], remove=True)
        out.append(ms(t0))
        assert res.strip() == b"4", res
    return {"ms": out, "median_ms": statistics.median(out)}


def hardened_run(client: docker.DockerClient, image: str) -> dict[str, Any]:
    script = (
        "import os,socket\n"
        "s=open('/proc/self/status').read()\n"
        "print([l for l in s.splitlines() if l.startswith(('CapEff','NoNewPrivs'))])\n"
        "print(os.getuid(), socket.if_nameindex())\n"
        "print(open('/sys/fs/cgroup/pids/pids.max').read().strip(),"
        " open('/sys/fs/cgroup/memory/memory.limit_in_bytes').read().strip())\n"
        "try:\n open('/x','w')\nexcept OSError as e: print('rootfs', e.strerror)\n"
    )
    t0 = time.perf_counter()
    res = client.containers.run(
        image,
        ["python3", "-c", script],
        remove=True,
        read_only=True,
        tmpfs={"/tmp": "size=64m"},
        network_mode="none",
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        pids_limit=64,
        mem_limit="256m",
        memswap_limit="256m",
        user="65534:65534",
    )
    return {"ms": ms(t0), "output": res.decode().strip().splitlines()}


def wait_service_log(svc: Any, needle: bytes, timeout: float = 30.0) -> float | None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            data = b"".join(svc.logs(stdout=True, stderr=True))
        except docker.errors.APIError:
            data = b""
        if needle in data:
            return time.perf_counter()
        time.sleep(0.02)
    return None


def service_once(
    client: docker.DockerClient,
    image_id: str,
    node_id: str,
    name: str,
    *,
    hardened: bool = False,
    cmd: list[str] | None = None,
) -> dict[str, Any]:
    cmd = cmd or ["python3", "-c", "print('hello from service', flush=True)"]
    spec_kw: dict[str, Any] = {}
    resources = None
    networks = None
    if hardened:
        spec_kw = {"read_only": True, "cap_drop": ["ALL"], "user": "65534:65534"}
        resources = Resources(mem_limit=256 * 1024 * 1024)
        resources["Limits"]["Pids"] = 64  # SDK has no argument for it; API >= 1.41
        networks = [NET]
    ts = TaskTemplate(
        container_spec=ContainerSpec(image_id, command=cmd, **spec_kw),
        restart_policy=RestartPolicy(condition="none"),
        placement=Placement(constraints=[f"node.id=={node_id}"]),
        resources=resources,
        networks=networks,
    )
    t0 = time.perf_counter()
    sid = client.api.create_service(ts, name=name)["ID"]
    created = ms(t0)
    svc = client.services.get(sid)
    try:
        t_log = wait_service_log(svc, b"hello" if not hardened else b"NoNewPrivs")
        first_log = round((t_log - t0) * 1000, 1) if t_log else None
        # wait for the terminal task state
        state = None
        for _ in range(300):
            tasks = svc.tasks()
            if tasks and tasks[0]["Status"]["State"] in ("complete", "failed", "rejected"):
                state = tasks[0]["Status"]["State"]
                break
            time.sleep(0.02)
        terminal = ms(t0)
        logs = b"".join(svc.logs(stdout=True, stderr=True)).decode().strip().splitlines()
        return {
            "create_call_ms": created,
            "first_log_ms": first_log,
            "terminal_state": state,
            "terminal_ms": terminal,
            "logs": logs,
        }
    finally:
        svc.remove()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", default="cumulus-base:bookworm")
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()

    client = docker.from_env()
    ver = client.version()
    info = client.info()
    image_id = client.images.get(a.image).id
    node_id = info["Swarm"]["NodeID"]
    facts: dict[str, Any] = {
        "engine": ver["Version"],
        "api": ver["ApiVersion"],
        "sdk": docker.__version__,
        "sdk_negotiated_api": client.api.api_version,
        "cgroup": f"v{info.get('CgroupVersion')} ({info.get('CgroupDriver')})",
        "storage": info["Driver"],
        "swarm": info["Swarm"]["LocalNodeState"],
        "image_id": image_id,
    }
    facts["docker_run"] = run_latency(client, a.image, a.runs)
    facts["docker_run_hardened"] = hardened_run(client, a.image)

    svc_runs = [service_once(client, image_id, node_id, f"{PREFIX}svc-{i}") for i in range(a.runs)]
    facts["service"] = {
        "first_log_ms": [r["first_log_ms"] for r in svc_runs],
        "terminal_ms": [r["terminal_ms"] for r in svc_runs],
        "create_call_ms": [r["create_call_ms"] for r in svc_runs],
        "states": sorted({r["terminal_state"] for r in svc_runs}),
        "sample_logs": svc_runs[0]["logs"],
    }

    # Swarm has no `--network none`; an --internal overlay network is the equivalent.
    net = None
    try:
        net = client.networks.create(NET, driver="overlay", internal=True)
        probe = (
            "import socket,os\n"
            "print(open('/proc/self/status').read().split('CapEff:')[1].split()[0], os.getuid())\n"
            "st=open('/proc/self/status').read().splitlines()\n"
            "print([line for line in st if 'NoNewPrivs' in line])\n"
            "try: socket.create_connection(('1.1.1.1',80),timeout=2); print('net: REACHABLE')\n"
            "except OSError as e: print('net: blocked', e)\n"
            "try: open('/x','w')\nexcept OSError as e: print('rootfs', e.strerror)\n"
            "print('pids', open('/sys/fs/cgroup/pids/pids.max').read().strip(),"
            " 'mem', open('/sys/fs/cgroup/memory/memory.limit_in_bytes').read().strip())\n"
        )
        facts["service_hardened"] = service_once(
            client,
            image_id,
            node_id,
            f"{PREFIX}hard",
            hardened=True,
            # API 1.41 has no NoNewPrivileges for services (added in 1.46); setpriv
            # (util-linux, in the base image) sets it from inside the container.
            cmd=["setpriv", "--no-new-privs", "python3", "-c", probe],
        )
    finally:
        if net is not None:
            for _ in range(50):  # the task's endpoint lingers a moment after removal
                try:
                    net.remove()
                    break
                except docker.errors.APIError:
                    time.sleep(0.2)
    # Removing a service removes its containers asynchronously (~1-2 s later).
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 20:
        left = [
            c
            for c in client.containers.list(all=True)
            if c.labels.get("com.docker.swarm.service.name", "").startswith(PREFIX)
        ]
        if not left:
            break
        time.sleep(0.1)
    facts["service_containers_gone_after_rm_ms"] = ms(t0)
    print(json.dumps(facts, indent=1))


if __name__ == "__main__":
    main()
