"""Debian's Prometheus scrapes what `cumulus up --metrics-port` serves, and every panel of the
provisioned Grafana dashboards has data.

`cumulus up` runs as an operator starts it (its own $CUMULUS_HOME, stopped by pid); the test
reads the metrics URLs it prints, starts `prometheus` on a free port with its own storage and a
1 s scrape interval, runs jobs that succeed and jobs that fail, then evaluates every PromQL
expression of infra/observability/grafana/dashboards/*.json through Prometheus's HTTP API. A
query that returns nothing (or only NaN) fails the test, and the job counters must equal what
the test ran, by status. The job-latency exemplars (trace ids) must reach Prometheus too.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cumulus import AsyncClient, CumulusError

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("prometheus") is None,
        reason="needs Debian's prometheus (infra/ci/setup-observability.sh)",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "infra/observability/grafana/dashboards").glob("*.json"))
CUMULUS = str(Path(sys.executable).parent / "cumulus")
SUCCEED, FAIL = 4, 2
"""Jobs the test runs that complete, and that fail (they raise)."""
GRAFANA_VARIABLES = {"$__rate_interval": "2m", "$__interval": "5s", "$worker": ".*"}
"""What Grafana would put in place of the dashboards' variables, for these queries."""
URL_LINE = re.compile(r"^\s+(\S+)\s+http://127\.0\.0\.1:(\d+)/metrics$")


def chatty(n: int) -> int:
    print(f"job {n} says hello")
    print(f"job {n} says goodbye")
    return n * n


def broken() -> None:
    raise ValueError("this job fails on purpose")


def _free_ports(count: int) -> int:
    """The first of `count` consecutive free ports on loopback (`cumulus up` counts up)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + count > 65535:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {count} consecutive free ports")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[tuple[Path, dict[str, int]]]:
    """`cumulus up --metrics-port BASE`: its $CUMULUS_HOME and the metrics ports it printed."""
    home, data, log = tmp_path / "home", tmp_path / "data", tmp_path / "up.log"
    env = {**os.environ, "CUMULUS_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    for name in ("CUMULUS_NATS_URL", "CUMULUS_PROFILE", "CUMULUS_CONFIG", "CUMULUS_METRICS_PORT"):
        env.pop(name, None)
    base = _free_ports(8)
    argv = [CUMULUS, "up", "--port", "0", "--data-dir", str(data), "--backend", "process"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*argv, "--metrics-port", str(base)],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        while "press Ctrl-C" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        ports = {
            m[1]: int(m[2]) for line in log.read_text().splitlines() if (m := URL_LINE.match(line))
        }
        yield home, ports
    finally:
        _stop(proc, signal.SIGINT)


class Prometheus:
    """Debian's `prometheus`, on a free port with its own storage; stopped by pid."""

    def __init__(self, workdir: Path, targets: dict[str, int]) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "cumulus",
                    "static_configs": [
                        {"targets": [f"127.0.0.1:{port}"], "labels": {"process": name}}
                        for name, port in targets.items()
                    ],
                }
            ],
        }
        self.config = workdir / "prometheus.yml"
        self.config.write_text(json.dumps(config))  # JSON is YAML
        self.log = workdir / "prometheus.log"
        self.argv = [
            "prometheus",
            f"--config.file={self.config}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--enable-feature=exemplar-storage",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.2)

    def wait_scraped(self, count: int, timeout: float = 30) -> None:
        """Until each of `count` targets was scraped and is up: a rate needs a first sample
        from before the jobs."""
        deadline = time.monotonic() + timeout
        while True:
            targets = self.api("targets")["activeTargets"]
            if len(targets) == count and all(t["health"] == "up" for t in targets):
                return
            assert time.monotonic() < deadline, json.dumps(targets)[:3000]
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    def values(self, expr: str, label: str = "") -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(expr)}


@pytest.fixture
def prometheus(tmp_path: Path, up: tuple[Path, dict[str, int]]) -> Iterator[Prometheus]:
    _, ports = up
    prom = Prometheus(tmp_path, ports)
    prom.start()
    try:
        prom.wait_scraped(len(ports))
        yield prom
    finally:
        prom.stop()


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel, expr) of every target of every provisioned dashboard, with
    Grafana's variables put in as Grafana would."""
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        panels = [p for top in board["panels"] for p in (top, *top.get("panels", []))]
        for panel in panels:
            for target in panel.get("targets", []):
                expr = target["expr"]
                for variable, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(variable, value)
                assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
                out.append((board["title"], panel["title"], expr))
    return out


async def _run_jobs(profile: Path) -> tuple[int, int]:
    async with AsyncClient(profile=str(profile)) as client:

        async def one_that_fails() -> bool:
            try:
                await client.run(broken, gpu=0.3, duration=600, logs=None, timeout=60)
            except CumulusError:
                return True
            return False

        good = [
            client.run(chatty, n, gpu=0.2, duration=600, logs=None, timeout=60)
            for n in range(SUCCEED)
        ]
        results = await asyncio.gather(*good, *(one_that_fails() for _ in range(FAIL)))
    assert results[:SUCCEED] == [n * n for n in range(SUCCEED)]
    assert all(results[SUCCEED:])
    return SUCCEED, FAIL


def _wait_for(
    prom: Prometheus, expr: str, want: dict[str, float], label: str = "", timeout: float = 30
) -> None:
    """Until `expr` gives `want` (by the value of `label`): each process is scraped on its
    own schedule, so one may show a job's end before another shows its output."""
    deadline = time.monotonic() + timeout
    while True:
        got = prom.values(expr, label)
        if all(got.get(key) == value for key, value in want.items()):
            return
        assert time.monotonic() < deadline, f"{expr}: {got}, wanted {want}"
        time.sleep(0.5)


def _has_data(result: list[dict[str, Any]]) -> bool:
    return any(not math.isnan(float(r["value"][1])) for r in result)


async def test_every_dashboard_query_has_data_and_the_counters_match(
    up: tuple[Path, dict[str, int]], prometheus: Prometheus
) -> None:
    home, ports = up
    assert set(ports) == {"scheduler", "gateway", "partitioner-worker-1", "runner-worker-1", "up"}
    started = time.time()
    succeeded, failed = await _run_jobs(home / "profiles" / "default.json")

    # The counters, by status, equal what the test ran (each gateway counts every job).
    _wait_for(prometheus, "max(cumulus_jobs_submitted_total)", {"": succeeded + failed})
    _wait_for(
        prometheus,
        "max by (status) (cumulus_jobs_finished_total)",
        {"completed": succeeded, "failed": failed, "timed_out": 0, "cancelled": 0},
        label="status",
    )
    states = prometheus.values("max by (state) (cumulus_jobs)", "state")
    assert states["completed"] == succeeded
    assert states["failed"] == failed
    lines = "sum by (stream) (cumulus_job_log_lines_total)"
    _wait_for(prometheus, lines, {"stdout": 2 * succeeded}, label="stream")
    await asyncio.sleep(3)  # a few more scrapes: every rate has two samples after the last job

    empty = [
        f"{board} / {panel}: {expr}"
        for board, panel, expr in dashboard_queries()
        if not _has_data(prometheus.query(expr))
    ]
    assert not empty, "panels whose query returns no data:\n" + "\n".join(empty)

    # Exemplars: a slow job in Grafana links to its trace by the id Prometheus kept.
    exemplars = prometheus.api(
        "query_exemplars",
        query="cumulus_job_run_seconds_bucket",
        start=str(started - 5),
        end=str(time.time() + 5),
    )
    trace_ids = {e["labels"]["trace_id"] for series in exemplars for e in series["exemplars"]}
    assert trace_ids
    assert all(re.fullmatch(r"[0-9a-f]{32}", t) for t in trace_ids)
