"""`cumulus doctor` on a deployment with agentless workers (`ssh.workers`): a worker whose sshd
accepts the configured key is ok; one nobody listens for, and one whose sshd refuses the key,
are each named with the fix. OpenSSH's sshd on 127.0.0.1 (tests/partitioner/sshd.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.stack import free_port
from tests.partitioner.conftest import Sshd

pytestmark = pytest.mark.ssh

CUMULUS = str(Path(sys.executable).parent / "cumulus")


def doctor(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CUMULUS, "doctor", "--json", "--timeout", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )


def test_doctor_names_the_agentless_workers_it_cannot_reach(sshd: Sshd, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger_key"  # a key the sshd has never seen
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    nobody = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "CUMULUS_HOME": str(tmp_path / "home"),  # no profile: no identity
        "CUMULUS_NATS_URL": f"nats://127.0.0.1:{free_port()}",  # no bus either: beside the point
        "CUMULUS_DATA_DIR": str(tmp_path / "data"),
        "CUMULUS_SSH_WORKERS": f"good={sshd.address},away={sshd.user}@{nobody}",
        "CUMULUS_SSH_KEY_PATH": str(sshd.keys.client_key),
        "CUMULUS_SSH_KNOWN_HOSTS": str(sshd.known_hosts),
        "CUMULUS_SSH_TIMEOUT": "3",
    }
    out = doctor(env)
    checks = {c["check"]: c for c in json.loads(out.stdout)["checks"]}
    assert out.returncode == 1
    assert checks["ssh good"]["status"] == "ok", checks["ssh good"]
    away = checks["ssh away"]
    assert away["status"] == "FAIL"
    assert nobody.split(":")[1] in away["detail"] + away["fix"]
    assert "sshd" in away["fix"]

    env["CUMULUS_SSH_KEY_PATH"] = str(stranger)
    env["CUMULUS_SSH_WORKERS"] = f"good={sshd.address}"
    out = doctor(env)
    refused = {c["check"]: c for c in json.loads(out.stdout)["checks"]}["ssh good"]
    assert refused["status"] == "FAIL"
    assert "authorized_keys" in refused["fix"]
