"""Cumulus beside Ray and Dask: the same four workloads on each, and Cumulus / peer ratios.

1. Burst: N trivial jobs submitted at once (Cumulus: one job process each) -> jobs/s.
2. The standard mix (bench/placement.py MIX, 300 jobs x 0.2 s, amounts from seed 42), as
   bench/utilisation.py defines it: sum(amount x 0.2 s) / (8 devices x makespan).
3. Serial round trip of one trivial job, submit -> result, p50 over --serial runs -> ms.
4. Warm map of --inputs trivial inputs at gpu=0.1 -> inputs/s (Cumulus: `client.map(...,
   warm=True)`; Ray: one task per input, and round robin over a few actors; Dask: client.map).

The systems, as alike as each allows:
- Cumulus: the embedded stack (services.stack.Stack), process backend, 2 workers x "4x16GiB"
  virtual devices; every job is its own process.
- Ray: a local `ray.init(num_gpus=8)` (one node, 8 fake GPUs); tasks ask num_gpus=0.1. Ray gives
  a GPU task max_calls=1 by default, a new worker process per task: the burst runs that way
  (--fresh-jobs, beside Cumulus's process per job) and with max_calls=0, pooled workers: Ray's
  trivial-task rate, which its map and serial round trip use too. The mix asks each job's amount
  and num_cpus=0 (pooled workers; the GPUs alone bound it). The actor pool: --actors actors.
- Dask: a LocalCluster of 2 worker processes, each with resources GPU=4 and `--threads`
  threads; tasks ask resources={"GPU": amount}. Dask counts GPU as one number per worker, so
  a 0.3 may straddle two devices: its packing is looser than Cumulus's or Ray's.

Each system runs alone, in its own child process, one after the other (Cumulus first), every
workload under --timeout seconds; the child shuts its system down (stack.stop, ray.shutdown,
cluster close) and is interrupted, then killed, if it overruns. Ray and Dask are optional
(`pip install -e '.[bench]'`); a missing one is reported and skipped. Usage:

    .venv/bin/python bench/peers.py [--only cumulus,ray,dask] [--jobs 1000] [--inputs 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.placement import MIX, pct  # noqa: E402

SYSTEMS = ("cumulus", "ray", "dask")
WORKLOADS = (
    # key, label, unit, the Cumulus figure a peer's is set against
    ("burst_fresh", "burst, a new process per job", "jobs/s", "burst_fresh"),
    ("burst", "burst, pooled workers", "jobs/s", "burst_fresh"),
    ("mix", "standard mix utilisation", "", "mix"),
    ("serial", "serial round trip p50", "ms", "serial"),
    ("map", "map of trivial inputs", "inputs/s", "map"),
    ("map_actors", "map, Ray actor pool", "inputs/s", "map"),
)
T = TypeVar("T")


def trivial(x: int = 0) -> int:
    return x


def inc(x: int) -> int:
    return x + 1


def compute(seconds: float) -> float:
    import time as _time

    _time.sleep(seconds)
    return seconds


def mix_amounts(jobs: int) -> list[float]:
    """bench/utilisation.py's amounts: seed 42, MIX in tenths of a GPU."""
    rng = random.Random(42)
    return [rng.choice(MIX) / 10 for _ in range(jobs)]


def utilisation(amounts: list[float], seconds: float, makespan: float) -> float:
    return sum(a * seconds for a in amounts) / (8 * makespan)


def note(text: str) -> None:
    print(f"  {text}", flush=True)


# --- Cumulus -----------------------------------------------------------------------------------


async def _bounded(name: str, timeout: float, coro: Awaitable[T]) -> T | str | None:
    """The workload's figure; None when it overran, the error's name when it failed."""
    try:
        return await asyncio.wait_for(coro, timeout)
    except TimeoutError:
        note(f"{name}: timed out after {timeout:g} s")
        return None
    except Exception as exc:
        note(f"{name}: failed: {type(exc).__name__}: {exc}")
        return f"failed ({type(exc).__name__})"


async def run_cumulus(args: argparse.Namespace) -> dict[str, Any]:
    from cumulus import AsyncClient
    from services.stack import Stack

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cumulus-peers-") as tmp:
        stack = Stack(
            data_dir=Path(tmp),
            workers=["worker-1", "worker-2"],
            devices="4x16GiB",
            backend="process",
        )
        await stack.start()
        try:
            async with AsyncClient(profile=stack.profile()) as client:
                await client.run(trivial, 0, gpu=0.1, duration=600, logs=None)  # warm up

                async def one() -> float:
                    t0 = time.perf_counter()
                    await client.run(trivial, 0, gpu=0.1, duration=600, logs=None)
                    return (time.perf_counter() - t0) * 1000

                async def serial() -> float:
                    return pct([await one() for _ in range(args.serial)], 0.5)

                async def burst() -> float:
                    t0 = time.perf_counter()
                    jobs = await asyncio.gather(
                        *(
                            client.submit(trivial, i, gpu=0.1, duration=600)
                            for i in range(args.jobs)
                        )
                    )
                    values = await asyncio.gather(*(j.result(timeout=args.timeout) for j in jobs))
                    assert values == list(range(args.jobs))
                    return float(args.jobs) / (time.perf_counter() - t0)

                async def mix() -> float:
                    amounts = mix_amounts(args.mix_jobs)
                    t0 = time.perf_counter()
                    jobs = await asyncio.gather(
                        *(
                            client.submit(
                                compute, args.seconds, gpu=a if a < 1 else int(a), duration=600
                            )
                            for a in amounts
                        )
                    )
                    await asyncio.gather(*(j.result(timeout=args.timeout) for j in jobs))
                    return utilisation(amounts, args.seconds, time.perf_counter() - t0)

                async def warm_map() -> float | str:
                    inputs = list(range(args.inputs))
                    warm: Any = True if args.warm == 0 else args.warm
                    mapper: Any = client.map  # `warm` is new (issue 13): not there, TypeError
                    t0 = time.perf_counter()
                    try:
                        values = await mapper(inc, inputs, gpu=0.1, warm=warm)
                    except TypeError as exc:
                        note(f"warm map: not available ({exc})")
                        return "not available"
                    elapsed = time.perf_counter() - t0
                    assert values == [x + 1 for x in inputs], "warm map: wrong results"
                    return float(args.inputs) / elapsed

                for key, workload, func, arg in (
                    ("serial", serial, trivial, 0),
                    ("burst_fresh", burst, trivial, 0),
                    ("mix", mix, compute, 0.0),
                    ("map", warm_map, inc, 0),
                ):
                    await _settle(client, func, arg)
                    out[key] = await _bounded(key, args.timeout, workload())
            out["cpu_s"] = {n: _cpu_seconds(p.popen.pid) for n, p in stack.procs.items() if p.popen}
        finally:
            stack.stop()
            if any(v is None or str(v).startswith("failed") for v in out.values()):
                _keep_logs(stack)
    return out


async def _settle(client: Any, func: Callable[..., Any], arg: Any, limit: float = 120) -> None:
    """Run the next workload's function once, until it succeeds: its package is uploaded
    before the clock starts, and a backlog the last workload left (a burst's retried
    submissions) is not billed to the next."""
    deadline = time.monotonic() + limit
    while True:
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(client.run(func, arg, gpu=0.1, duration=600, logs=None), 60)
            if time.monotonic() - t0 > 5:
                note(f"settled: a {func.__name__} job took {time.monotonic() - t0:.1f} s")
            return
        except Exception as exc:
            note(f"settling: {func.__name__}: {type(exc).__name__}: {exc}")
            if time.monotonic() > deadline:
                note(f"the stack did not settle in {limit:g} s")
                return
            await asyncio.sleep(2)


def _keep_logs(stack: Any) -> None:
    """Copy the stack's process logs out of its data dir before it is removed."""
    kept = Path(tempfile.mkdtemp(prefix="peers-cumulus-logs-"))
    for name, proc in stack.procs.items():
        with contextlib.suppress(OSError):
            (kept / f"{name}.log").write_bytes(proc.log_path.read_bytes())
    note(f"a workload failed or overran: the stack's logs are in {kept}")


def _cpu_seconds(pid: int) -> float:
    """user + system CPU of a live process and its reaped children, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(f) for f in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


# --- Ray ---------------------------------------------------------------------------------------


def run_ray(args: argparse.Namespace) -> dict[str, Any]:
    ray = importlib.import_module("ray")
    out: dict[str, Any] = {"version": ray.__version__}
    _ray_init(ray)
    try:
        # A GPU task gets max_calls=1 from Ray unless told: a new worker process per task, as
        # Cumulus starts one per job. max_calls=0 reuses workers: Ray's trivial-task rate.
        fresh = ray.remote(num_gpus=0.1)(trivial)
        task = ray.remote(num_gpus=0.1, max_calls=0)(trivial)
        ray.get([task.remote(0), fresh.remote(0)], timeout=args.timeout)  # warm up

        def serial() -> float:
            times = []
            for _ in range(args.serial):
                t0 = time.perf_counter()
                ray.get(task.remote(0), timeout=args.timeout)
                times.append((time.perf_counter() - t0) * 1000)
            return pct(times, 0.5)

        def burst(remote: Any, jobs: int) -> float:
            t0 = time.perf_counter()
            values = ray.get([remote.remote(i) for i in range(jobs)], timeout=args.timeout)
            assert values == list(range(jobs))
            return float(jobs / (time.perf_counter() - t0))

        def mix() -> float:
            amounts = mix_amounts(args.mix_jobs)
            work = ray.remote(compute)
            t0 = time.perf_counter()
            refs = [
                work.options(num_gpus=a if a < 1 else int(a), num_cpus=0).remote(args.seconds)
                for a in amounts
            ]
            ray.get(refs, timeout=args.timeout)
            return utilisation(amounts, args.seconds, time.perf_counter() - t0)

        def tasks_map() -> float:
            job = ray.remote(num_gpus=0.1, max_calls=0)(inc)
            t0 = time.perf_counter()
            values = ray.get([job.remote(x) for x in range(args.inputs)], timeout=args.timeout)
            assert values == [x + 1 for x in range(args.inputs)]
            return float(args.inputs / (time.perf_counter() - t0))

        def actors_map() -> float:
            class Inc:
                def call(self, x: int) -> int:
                    return x + 1

            actor = ray.remote(num_gpus=0.1, num_cpus=0)(Inc)
            pool = [actor.remote() for _ in range(args.actors)]
            ray.get([a.call.remote(0) for a in pool], timeout=args.timeout)  # started
            t0 = time.perf_counter()
            refs = [pool[x % len(pool)].call.remote(x) for x in range(args.inputs)]
            values = ray.get(refs, timeout=args.timeout)
            assert values == [x + 1 for x in range(args.inputs)]
            rate = float(args.inputs / (time.perf_counter() - t0))
            for a in pool:
                ray.kill(a)
            return rate

        for key, fn in (
            ("serial", serial),
            ("burst_fresh", lambda: burst(fresh, args.fresh_jobs)),
            ("burst", lambda: burst(task, args.jobs)),
            ("mix", mix),
            ("map", tasks_map),
            ("map_actors", actors_map),
        ):
            out[key] = _guarded(key, fn, ray.exceptions.GetTimeoutError)
    finally:
        ray.shutdown()
    return out


def _ray_init(ray: Any, tries: int = 3) -> None:
    """A local Ray with 8 fake GPUs. Its node gives the raylet 30 s to register, which a loaded
    machine overruns: try again."""
    for attempt in range(tries):
        try:
            ray.init(num_gpus=8, include_dashboard=False, logging_level="warning")
            return
        except Exception as exc:
            ray.shutdown()
            if attempt == tries - 1:
                raise
            note(f"ray.init failed ({exc}); again")


def _guarded(name: str, fn: Callable[[], float], timeout_error: type[BaseException]) -> Any:
    """As _bounded, for the peers' blocking calls (each given its own timeout)."""
    try:
        return fn()
    except timeout_error:
        note(f"{name}: timed out")
        return None
    except Exception as exc:
        note(f"{name}: failed: {type(exc).__name__}: {exc}")
        return f"failed ({type(exc).__name__})"


# --- Dask --------------------------------------------------------------------------------------


def run_dask(args: argparse.Namespace) -> dict[str, Any]:
    distributed = importlib.import_module("distributed")
    out: dict[str, Any] = {"version": distributed.__version__}
    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=args.threads,
        processes=True,
        resources={"GPU": 4},
        dashboard_address=None,
    )
    client = distributed.Client(cluster)
    gpu = {"GPU": 0.1}
    try:

        def gather(futures: list[Any]) -> list[Any]:
            distributed.wait(futures, timeout=args.timeout)
            return list(client.gather(futures))

        client.submit(trivial, 0, resources=gpu, pure=False).result(timeout=args.timeout)

        def serial() -> float:
            times = []
            for _ in range(args.serial):
                t0 = time.perf_counter()
                client.submit(trivial, 0, resources=gpu, pure=False).result(timeout=args.timeout)
                times.append((time.perf_counter() - t0) * 1000)
            return pct(times, 0.5)

        def burst() -> float:
            t0 = time.perf_counter()
            futures = [
                client.submit(trivial, i, resources=gpu, pure=False) for i in range(args.jobs)
            ]
            assert gather(futures) == list(range(args.jobs))
            return float(args.jobs) / (time.perf_counter() - t0)

        def mix() -> float:
            amounts = mix_amounts(args.mix_jobs)
            t0 = time.perf_counter()
            futures = [
                client.submit(compute, args.seconds, resources={"GPU": a}, pure=False)
                for a in amounts
            ]
            gather(futures)
            return utilisation(amounts, args.seconds, time.perf_counter() - t0)

        def dask_map() -> float:
            inputs = list(range(args.inputs))
            t0 = time.perf_counter()
            futures = client.map(inc, inputs, resources=gpu, pure=False)
            assert gather(futures) == [x + 1 for x in inputs]
            return float(args.inputs) / (time.perf_counter() - t0)

        for key, fn in (("serial", serial), ("burst", burst), ("mix", mix), ("map", dask_map)):
            out[key] = _guarded(key, fn, TimeoutError)
    finally:
        # The workers first: closing the scheduler under them logs failed heartbeats.
        with contextlib.suppress(Exception):
            client.retire_workers(close_workers=True)
        client.close()
        cluster.close()
    return out


# --- the parent: one child per system, then the table ------------------------------------------


def child(args: argparse.Namespace) -> None:
    print(f"== {args.child}", flush=True)
    t0 = time.perf_counter()
    if args.child == "cumulus":
        from shared.main import run_loop  # uvloop where the services use it

        out = run_loop(run_cumulus(args))
    elif args.child == "ray":
        out = run_ray(args)
    else:
        out = run_dask(args)
    out["wall_s"] = time.perf_counter() - t0
    Path(args.result_file).write_text(json.dumps(out))


def run_child(system: str, args: argparse.Namespace, argv: list[str]) -> dict[str, Any] | str:
    module = {"cumulus": "cumulus", "ray": "ray", "dask": "distributed"}[system]
    try:
        importlib.import_module(module)
    except ImportError:
        print(f"== {system}: not installed (pip install -e '.[bench]')", flush=True)
        return "not installed"
    with tempfile.NamedTemporaryFile(prefix=f"peers-{system}-", suffix=".json") as result:
        cmd = [sys.executable, __file__, *argv, "--child", system, "--result-file", result.name]
        proc = subprocess.Popen(cmd, start_new_session=True)
        limit = 7 * args.timeout + 120
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            print(f"== {system}: over {limit:g} s, interrupting it", flush=True)
            proc.send_signal(signal.SIGINT)  # runs its finally: stack.stop / ray.shutdown
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return "timed out"
        if rc != 0:
            return f"failed (exit {rc})"
        text = Path(result.name).read_text()
        return json.loads(text) if text else "no result"


def fmt(value: Any, unit: str) -> str:
    if not isinstance(value, int | float):
        return "n/a" if value is None else str(value)
    if unit == "":
        return f"{value:.3f}"
    return f"{value:,.1f} {unit}" if value < 100 else f"{value:,.0f} {unit}"


def ratio(mine: Any, theirs: Any) -> str:
    numbers = isinstance(mine, int | float) and isinstance(theirs, int | float)
    return f"{mine / theirs:.2f}x" if numbers and theirs else "-"


def report(results: dict[str, dict[str, Any] | str], args: argparse.Namespace) -> None:
    print()
    print(
        f"Cumulus / peer, one run ({args.jobs} burst jobs, {args.mix_jobs} x {args.seconds} s mix, "
        f"{args.serial} serial, {args.inputs} map inputs); load average now "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    for system, r in results.items():
        if isinstance(r, str):
            print(f"  {system}: {r}")
        elif "version" in r:
            print(f"  {system} {r['version']}: {r['wall_s']:.0f} s")
        else:
            print(f"  {system}: {r['wall_s']:.0f} s")
    systems = list(results)
    peers = [s for s in systems if s != "cumulus"]
    header = f"  {'workload':30}" + "".join(f"{s:>16}" for s in systems)
    header += "".join(f"{'cumulus/' + p:>16}" for p in peers)
    print(header)
    cumulus = results.get("cumulus")
    for key, label, unit, versus in WORKLOADS:
        # Cumulus's column holds the figure each peer's is set against (its one-process-per-job
        # burst beside pooled workers, its warm map beside Ray's actor pool).
        row = {
            s: r.get(versus if s == "cumulus" else key) if isinstance(r, dict) else None
            for s, r in results.items()
        }
        if key != versus and all(row[p] is None for p in peers):
            continue
        line = f"  {label:30}" + "".join(f"{fmt(v, unit):>16}" for v in row.values())
        for p in peers:
            line += f"{ratio(row.get('cumulus'), row[p]):>16}"
        print(line)
    if peers:
        print("  Cumulus has no pooled burst: that row sets its one-process-per-job burst against")
        print("  the peers' pooled workers; the actor row sets its warm map against Ray's actors.")
    print("  Round trip: lower is better, so a ratio under 1 favours Cumulus; elsewhere over 1.")
    if isinstance(cumulus, dict) and cumulus.get("cpu_s"):
        cpu = cumulus["cpu_s"]
        print("  Cumulus CPU seconds by process (incl. reaped children):")
        print("    " + ", ".join(f"{n} {c:.1f}" for n, c in cpu.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(SYSTEMS), help="cumulus,ray,dask")
    parser.add_argument("--jobs", type=int, default=1000, help="burst size")
    parser.add_argument(
        "--fresh-jobs", type=int, default=100, help="Ray's burst with a new process per task"
    )
    parser.add_argument("--inputs", type=int, default=10_000, help="warm map inputs")
    parser.add_argument("--serial", type=int, default=50, help="serial round trips")
    parser.add_argument("--mix-jobs", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=0.2, help="each mix job's compute")
    parser.add_argument("--warm", type=int, default=0, help="warm processes (0: the SDK picks)")
    parser.add_argument("--actors", type=int, default=8, help="Ray's actor pool")
    parser.add_argument("--threads", type=int, default=40, help="threads per Dask worker")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per workload")
    parser.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown system(s): {', '.join(sorted(unknown))}")
    print("load average at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    results = {s: run_child(s, args, argv) for s in SYSTEMS if s in only}
    report(results, args)


if __name__ == "__main__":
    main()
