"""Many real chronos_cli processes racing for one device never over-commit it."""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

from cumulus_core import parse_amount

from .conftest import CLI, cli_env

PROCESSES = 50
DEADLINE_S = 60


def test_fifty_processes_never_over_commit_one_device(tmp_path: Path) -> None:
    state = tmp_path / "state"
    rng = random.Random(7)
    amounts = [rng.choice(["0.1", "0.2", "0.3"]) for _ in range(PROCESSES)]
    env = cli_env()
    procs = [
        subprocess.Popen(
            [*CLI, "--state-dir", str(state), "--json", "create", "0", amount, "300"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for amount in amounts
    ]
    deadline = time.monotonic() + DEADLINE_S
    granted: dict[str, int] = {}
    refused: list[int] = []
    for amount, proc in zip(amounts, procs, strict=True):
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        if proc.returncode == 0:
            created = json.loads(out)
            assert created["tenths"] == parse_amount(amount)
            granted[created["partition_id"]] = created["tenths"]
        else:
            refused.append(parse_amount(amount))
            assert proc.returncode == 1, err
            assert err.startswith("chronos_cli: error: Not enough available capacity on device 0")
            assert len(err.splitlines()) == 1

    assert sum(granted.values()) <= 10
    assert refused, "50 requests of at least 0.1 cannot all fit in one device"
    assert len(granted) == len(set(granted))

    listed = subprocess.run(
        [*CLI, "--state-dir", str(state), "--json", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    held = {p["partition_id"]: p["tenths"] for p in json.loads(listed.stdout)["partitions"]}
    assert held == granted
    # Nothing is ever released here, so free only shrinks: every refusal was deserved.
    assert 10 - sum(held.values()) < min(refused)
