"""Large inputs end to end (issue 15): a function called with a `--mib` MiB random argument.

Starts an embedded stack (process backend, every service a process of its own), runs a small
warm-up job, then for each size: packages `digest(blob)` with a fresh random `blob`, uploads it
(the gateway spools it to its disk and streams it into the object store), submits it and waits
for its result (the runner streams the package into its cache, copies it into the job's
directory, the job unpacks and unpickles it and returns its sha256). Prints the time of each
step, MiB/s end to end, and the peak RSS (VmHWM, reset through /proc/<pid>/clear_refs before
each size) of the gateway, the runner, nats-server and this client. Then the upload alone
with one chunk in flight against UPLOAD_WINDOW. Usage:

    .venv/bin/python bench/large_inputs.py [--mib 256 1024] [--sandbox bwrap|none]

Linux only (/proc). Needs about 4x the largest size in free memory (the client holds the
argument, its pickle and its zip) and twice that on disk.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cumulus import AsyncClient, JobOptions  # noqa: E402
from cumulus import _client as client_mod  # noqa: E402
from cumulus._packaging import package_function  # noqa: E402
from services.stack import Stack  # noqa: E402

MiB = 1024 * 1024
SERVICES = ("gateway", "runner-worker-1", "nats")


def digest(blob: bytes) -> tuple[str, int]:
    return hashlib.sha256(blob).hexdigest(), len(blob)


def status_bytes(pid: int | str, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def reset_peak(pid: int | str) -> None:
    """VmHWM back to the current RSS (proc(5): clear_refs, 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


async def one_size(stack: Stack, client: AsyncClient, mib: int) -> str:
    pids: dict[str, int | str] = {name: stack.procs[name].pid for name in SERVICES}
    pids["client"] = "self"
    blob = os.urandom(mib * MiB)
    for pid in pids.values():
        reset_peak(pid)
    rss = {name: status_bytes(pid, "VmRSS") for name, pid in pids.items()}
    started = time.monotonic()
    package = package_function(digest, (blob,))
    packed = time.monotonic()
    await client.upload(package)
    uploaded = time.monotonic()
    job = await client.submit_package(package, JobOptions(gpu=0.1, duration=3600))
    value = await job.result(timeout=3600)
    ended = time.monotonic()
    assert tuple(value) == (hashlib.sha256(blob).hexdigest(), len(blob)), value
    peaks = {name: status_bytes(pid, "VmHWM") for name, pid in pids.items()}
    spool = list((stack.data_dir / "gateway.uploads").iterdir())
    size = len(package) / MiB
    lines = [
        f"{mib} MiB argument (package {size:.0f} MiB): end to end {ended - started:.1f} s = "
        f"{mib / (ended - started):.1f} MiB/s; package {packed - started:.1f} s, upload "
        f"{uploaded - packed:.1f} s = {size / (uploaded - packed):.0f} MiB/s, submit to result "
        f"{ended - uploaded:.1f} s; spool files left: {len(spool)}",
    ]
    for name in pids:
        lines.append(
            f"  {name:16} RSS {rss[name] / MiB:6.0f} MiB before, peak {peaks[name] / MiB:6.0f}"
            f" MiB (+{(peaks[name] - rss[name]) / MiB:.0f})"
        )
    return "\n".join(lines)


async def upload_windows(client: AsyncClient, mib: int) -> str:
    """The upload alone (a fresh package each time: uploads are content addressed)."""
    out = []
    for window in (1, client_mod.UPLOAD_WINDOW):
        client_mod.UPLOAD_WINDOW = window
        package = package_function(digest, (os.urandom(mib * MiB),))
        began = time.monotonic()
        await client.upload(package)
        took = time.monotonic() - began
        out.append(f"window {window}: {took:.1f} s = {len(package) / MiB / took:.0f} MiB/s")
    return f"upload of {mib} MiB alone: " + "; ".join(out)


async def main(sizes: list[int], sandbox: str) -> None:
    env = {"CUMULUS_POLICY_STORED_BYTES": "32GiB", "CUMULUS_WORKER_SANDBOX": sandbox}
    with tempfile.TemporaryDirectory(prefix="cumulus-large-inputs-", dir="/var/tmp") as data:
        stack = Stack(data_dir=Path(data), backend="process", devices="2x16GiB", env=env)
        await stack.start()
        try:
            async with AsyncClient(profile=stack.profile()) as client:
                warm = await client.submit(digest, b"warm", gpu=0.1, duration=300)
                await warm.result(timeout=120)
                for mib in sizes:
                    print(await one_size(stack, client, mib), flush=True)
                print(await upload_windows(client, sizes[0]), flush=True)
        finally:
            stack.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--sandbox", default="bwrap", choices=["bwrap", "none"])
    args = parser.parse_args()
    asyncio.run(main(args.mib, args.sandbox))
