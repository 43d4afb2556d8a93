"""The short chaos run (CI size): jobs flow while every fault kind is injected at least once,
and no job is lost, none runs twice, and nothing outlives the stack.

Runs `bench/chaos.py --short --json` as a subprocess (it mounts a tmpfs for the stack's data,
so it needs root: skipped without, except in CI, where that is a failure). Select or leave
it out with the `chaos` marker (`-m chaos`, `-m "not chaos"`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


@pytest.mark.timeout(1200)
def test_short_chaos_run_loses_nothing_runs_nothing_twice_and_leaks_nothing(
    tmp_path: Path,
) -> None:
    if os.geteuid() != 0 and os.environ.get("CI") != "true":
        pytest.skip("the chaos run mounts a tmpfs for the stack's data disk: run as root")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench/chaos.py"), "--short", "--json"]
        + ["--out", str(tmp_path / "chaos")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1100,
    )
    assert done.stdout.strip(), f"no report (exit {done.returncode}):\n{done.stderr[-4000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    where = f"seed {report['seed']}, logs in {report['out']}"
    assert report["submitted"] >= 50, where
    assert report["lost"] == 0, (report["lost_jobs"], where)
    assert report["run_twice"] == 0, (report["run_twice_jobs"], where)
    assert report["leaked"] == dict.fromkeys(report["leaked"], 0), (report["leaked_detail"], where)
    never = [k for k in report["fault_kinds"] if report["faults"].get(k, 0) == 0]
    assert never == [], (never, report["unavailable"], where)
    assert done.returncode == 0, done.stderr[-4000:]
