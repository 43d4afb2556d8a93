"""bench/fleet_scale.py at a tiny size, so the 1,000-worker bench cannot rot unnoticed.

Runs the bench as a subprocess (real nats-server, the real scheduler process, 20 simulated
workers with 8 virtual devices each in two agent processes) with a short heartbeat, and checks
what its report says a user of the figures relies on: every worker registered with two
consumers each, heartbeats flowed at the configured rate, every job of the burst was placed
and completed, and the silenced worker was declared lost near heartbeat_s x misses.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow]

WORKERS = 20
JOBS = 200
HEARTBEAT_S = 1.0
MISSES = 3


@pytest.mark.timeout(240)
def test_fleet_bench_places_every_job_and_detects_the_lost_worker(tmp_path: Path) -> None:
    argv = [sys.executable, str(ROOT / "bench/fleet_scale.py"), "--json", "--out", str(tmp_path)]
    argv += ["--workers", str(WORKERS), "--agents", "2", "--jobs", str(JOBS), "--hold-s", "0.2"]
    argv += ["--heartbeat-s", str(HEARTBEAT_S), "--misses", str(MISSES), "--idle-s", "3"]
    argv += ["--timeout", "120"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=220)
    assert done.stdout.strip(), f"no report (exit {done.returncode}):\n{done.stderr[-4000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    where = f"logs in {tmp_path}"

    register = report["register"]
    assert (register["registered"], register["failed"]) == (WORKERS, 0), (register, where)
    assert register["consumers"] >= 2 * WORKERS, (register, where)

    idle = report["idle"]
    assert idle["heartbeat_failures"] == 0, (idle, where)
    assert 0.7 * WORKERS <= idle["heartbeats_per_s"] <= 1.3 * WORKERS, (idle, where)
    assert idle["scheduler_rss_mib"] > 0, (idle, where)

    burst = report["burst"]
    assert (burst["placed"], burst["failed"]) == (JOBS, 0), (burst, where)
    assert burst["completed"] == JOBS, (burst, where)
    assert burst["agent_placements"] == JOBS, (burst, where)
    assert burst["placements_per_s"] > 0, (burst, where)

    lost = report["lost"]
    bound = HEARTBEAT_S * MISSES
    assert lost["detected"], (lost, where)
    # Declared once silent for more than the bound, by a liveness tick of at most 1 s after it.
    assert bound - 0.5 <= lost["detect_s"] <= bound + 2.5, (lost, where)
    assert lost["others_lost"] == [], (lost, where)
    assert done.returncode == 0, done.stderr[-4000:]
