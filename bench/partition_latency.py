"""Partition create latency: in-process, `chronos_cli` locally, and over SSH (seed: < 2 s).

Measured in one run, on declared virtual devices, each create followed by an (untimed)
release so the device never fills:

- in-process: `cumulus_core.PartitionTable.create` (file lock, read, write, fsync);
- local: `chronos_cli create` as a subprocess, as the local partitioner runs it;
- SSH: the same command through the partitioner's `SshPool` against an sshd started here
  on 127.0.0.1 (keys generated here), connection reused; the first create, which pays for
  the connection, is reported on its own.

Needs /usr/sbin/sshd for the SSH part (infra/ci/setup-sshd.sh); without it that part is
skipped with a note. Usage:

    .venv/bin/python bench/partition_latency.py [--n 50]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cumulus_core import PartitionTable, parse_virtual_spec  # noqa: E402
from services.partitioner.chronos import Chronos, run_local  # noqa: E402
from services.partitioner.ssh import SshPool, SshRunner, parse_address  # noqa: E402
from shared.config import SshConfig  # noqa: E402
from tests.partitioner.sshd import SSHD, Sshd, make_keys  # noqa: E402

DEVICES = "2x16GiB"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def line(name: str, values: list[float]) -> str:
    return (
        f"{name:<34} p50 {pct(values, 0.5) * 1000:8.1f} ms  p99 {pct(values, 0.99) * 1000:8.1f} ms"
        f"  (n={len(values)})"
    )


def in_process(state: Path, n: int) -> list[float]:
    table = PartitionTable(state, parse_virtual_spec(DEVICES))
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        partition = table.create(0, 5, 600, label=f"bench.{i}")
        out.append(time.perf_counter() - t0)
        table.release(partition.partition_id)
    return out


async def through(chronos: Chronos, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        partition = await chronos.create(0, 5, 600, f"bench.{i}")
        out.append(time.perf_counter() - t0)
        await chronos.release(partition.partition_id)
    return out


async def timed(call: Callable[[], Awaitable[object]]) -> float:
    t0 = time.perf_counter()
    await call()
    return time.perf_counter() - t0


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=50, help="creates per figure")
    args = parser.parse_args()
    options = ["--backend", "virtual", "--devices", DEVICES]
    with tempfile.TemporaryDirectory(prefix="cumulus-bench-part-") as tmp:
        root = Path(tmp)
        print(line("in-process PartitionTable.create", in_process(root / "api", args.n * 4)))
        local = Chronos(options=[*options, "--state-dir", str(root / "local")])
        print(line("local chronos_cli create", await through(local, args.n)))
        bare = [
            await timed(lambda: run_local([sys.executable, "-c", "pass"], 10)) for _ in range(20)
        ]
        print(line("floor: bare python subprocess", bare))
        if not SSHD.exists():
            print(f"over SSH: skipped, {SSHD} is missing (bash infra/ci/setup-sshd.sh)")
            return
        sshd = Sshd(make_keys(root / "keys"), root / "sshd")
        sshd.start()
        pool = SshPool(
            SshConfig(key_path=str(sshd.keys.client_key), known_hosts=str(sshd.known_hosts))
        )
        try:
            target = parse_address(sshd.address)
            command = [sys.executable, "-m", "cumulus_core", *options]
            remote = Chronos(
                command=[*command, "--state-dir", str(root / "remote")],
                run=SshRunner(pool, target),
            )
            cold = await timed(lambda: remote.create(1, 5, 600, "bench.cold"))
            print(f"{'SSH create, first (connects)':<34} {cold * 1000:8.1f} ms")
            print(line("SSH chronos_cli create, reused", await through(remote, args.n)))
            floor = [await timed(lambda: pool.run(target, ["true"], 10)) for _ in range(args.n)]
            print(line("floor: SSH exec of `true`, reused", floor))
            print(f"connections opened: {pool.connects}; seed target: create < 2000 ms")
        finally:
            await pool.close()
            sshd.stop()


if __name__ == "__main__":
    asyncio.run(main())
