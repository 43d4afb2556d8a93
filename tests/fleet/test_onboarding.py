"""Onboarding a worker host: infra/setup-worker.sh for real (against a running stack of central
services and this machine's Docker engine, a Swarm manager), its dry run, the Vast.ai scripts'
dry runs, the systemd units and the Swarm stack file."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml

from cumulus import AsyncClient
from services.stack import Stack
from tests.fleet.conftest import need

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
SETUP = INFRA / "setup-worker.sh"
VASTAI = INFRA / "vastai"
UNITS = INFRA / "systemd"
WORKER = "onboard-w1"


def add(a: int, b: int) -> int:
    return a + b


def sh(*argv: str, timeout: float = 30) -> str:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=True
    ).stdout.strip()


def swarm_manager() -> tuple[str, str, str] | None:
    """(manager address, worker join token, node id) of this engine, a Swarm manager; None
    when there is no engine or it manages no swarm."""
    if shutil.which("docker") is None:
        return None
    try:
        state = sh("docker", "info", "--format", "{{.Swarm.ControlAvailable}} {{.Swarm.NodeID}}")
        control, node = state.split()
        if control != "true":
            return None
        addr = sh("docker", "info", "--format", "{{range .Swarm.RemoteManagers}}{{.Addr}}{{end}}")
        token = sh("docker", "swarm", "join-token", "worker", "-q")
    except (subprocess.SubprocessError, ValueError):
        return None
    return addr, token, node


def node_labels(node: str) -> dict[str, str]:
    out = sh(
        "docker",
        "node",
        "inspect",
        node,
        "--format",
        '{{range $k, $v := .Spec.Labels}}{{$k}}={{$v}}{{"\\n"}}{{end}}',
    )
    return dict(line.split("=", 1) for line in out.splitlines() if line)


def node_version(node: str) -> int:
    return int(sh("docker", "node", "inspect", node, "--format", "{{.Version.Index}}"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Cumulus wheel, built from a copy of the working tree (the tree itself is left
    alone). Debian's python3 builds it: it has setuptools' bdist_wheel."""
    python = "/usr/bin/python3"
    probe = subprocess.run(
        [python, "-c", "import setuptools, wheel"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        need("no python3 with setuptools and wheel to build the package (python3-wheel)")
    src = tmp_path_factory.mktemp("src")
    out = tmp_path_factory.mktemp("wheel")
    files = sh("git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard").splitlines()
    for name in files:
        if name.startswith("tests/") or not (ROOT / name).is_file():
            continue
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    build = (
        "from setuptools import build_meta as b; print(b.build_wheel(__import__('sys').argv[1]))"
    )
    done = subprocess.run(
        [python, "-c", build, str(out)], cwd=src, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return out / done.stdout.strip().splitlines()[-1]


def venv_with_dependencies(venv: Path) -> None:
    """A venv whose own site-packages is empty but whose imports find the test venv's
    packages (a `.pth`): the package's dependencies are there, the package itself is what
    setup-worker.sh installs (from the wheel, no index). A real host gets them from its index
    or a wheelhouse (`--pip-args`)."""
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60
    )
    purelib = subprocess.run(
        [
            str(venv / "bin/python"),
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "cumulus-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")


def setup(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=clean_env(), capture_output=True, text=True, timeout=240)


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CUMULUS_")}


def agent_pids(config: Path) -> list[int]:
    """Every running `cumulus worker --config CONFIG` process."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker" in argv and str(config).encode() in argv:
            found.append(int(entry.name))
    return found


def stop_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or "Z" in _state(pid):
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (OSError, IndexError):
        return ""


def snapshot(root: Path) -> dict[str, tuple[str, int, float]]:
    """Every file under root/etc: (sha256, mode, mtime)."""
    out = {}
    for path in sorted((root / "etc").rglob("*")):
        if path.is_file():
            st = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[str(path.relative_to(root))] = (digest, stat.S_IMODE(st.st_mode), st.st_mtime)
    return out


@pytest.fixture
async def central(tmp_path: Path) -> AsyncIterator[Stack]:
    """The central services only (nats-server, gateway, scheduler; nkey identities and mTLS):
    no local worker."""
    stack = Stack(data_dir=tmp_path / "central", workers=[], secure=True, tls=True)
    try:
        await stack.start()
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def manager() -> Iterator[tuple[str, str, str]]:
    """This engine as the Swarm manager; the labels the test adds to its node are removed (and
    any it changed put back) afterwards."""
    found = swarm_manager()
    if found is None:
        need("no Docker engine managing a Swarm here (infra/ci/setup-docker.sh)")
    assert found is not None
    before = node_labels(found[2])
    try:
        yield found
    finally:
        after = node_labels(found[2])
        args: list[str] = []
        for key in after:
            if key not in before:
                args += ["--label-rm", key]
            elif after[key] != before[key]:
                args += ["--label-add", f"{key}={before[key]}"]
        if args:
            sh("docker", "node", "update", *args, found[2])


async def test_setup_worker_onboards_a_host_and_a_rerun_changes_nothing(
    central: Stack, manager: tuple[str, str, str], wheel: Path, tmp_path: Path
) -> None:
    address, token, node = manager
    root = tmp_path / "host"
    venv = root / "opt/cumulus/venv"
    venv_with_dependencies(venv)
    creds = central.credentials("worker", WORKER, (WORKER,))
    central.reload()
    observer = central.credentials("observer", "observer")
    argv = [
        "bash", str(SETUP), "--manager", address, "--token", token,
        "--nats-url", central.url, "--worker-id", WORKER, "--credentials", creds,
        "--package", str(wheel), "--pip-args", "--no-deps --no-index",
        "--devices", "2x16GiB", "--backend", "process",
        "--verify-profile", observer, "--timeout", "60",
        "--root", str(root), "--no-systemd",
    ]  # fmt: skip
    config = root / "etc/cumulus/config.yaml"
    try:
        began = time.monotonic()
        first = await asyncio.to_thread(setup, argv)
        took = time.monotonic() - began
        assert first.returncode == 0, first.stderr
        assert f"the scheduler lists worker {WORKER} as ready" in first.stderr
        print(f"setup-worker.sh first run {took:.1f} s")

        # The node carries the seed's GPU labels, from chronos_cli's virtual devices.
        labels = node_labels(node)
        assert labels["gpu.count"] == "2"
        assert labels["gpu.0.name"] == labels["gpu.1.name"] == "Virtual GPU 16GiB"
        assert labels["gpu.0.memory"] == "16384"
        assert labels["chronos.installed"] == "true"
        assert labels["cumulus.worker"] == WORKER

        # Files where they belong, credentials for root's eyes only.
        etc = root / "etc/cumulus"
        assert stat.S_IMODE((etc / "credentials.json").stat().st_mode) == 0o600
        assert stat.S_IMODE(config.stat().st_mode) == 0o644
        tls = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (etc / "tls").iterdir()}
        assert tls == {
            "ca.crt": 0o644, f"worker-{WORKER}.crt": 0o644, f"worker-{WORKER}.key": 0o600
        }  # fmt: skip
        installed = json.loads((etc / "credentials.json").read_text())
        assert installed["tls"]["key"] == f"tls/worker-{WORKER}.key"  # beside it, relative
        loaded = yaml.safe_load(config.read_text())
        assert loaded["nats"]["url"] == central.url
        assert loaded["worker"] == {
            "id": WORKER, "backend": "process", "device_source": "virtual", "devices": "2x16GiB"
        }  # fmt: skip
        unit = (root / "etc/systemd/system/cumulus-worker.service").read_text()
        assert f"ExecStart={venv}/bin/cumulus worker --config {config}" in unit
        pid = int((root / "run/cumulus-worker.pid").read_text())
        assert agent_pids(config) == [pid]

        # A job runs on it (the only worker there is).
        async with AsyncClient(profile=central.profile()) as client:
            job = await client.submit(add, 20, 22, gpu=0.5, duration=600)
            assert await job.result(timeout=60) == 42
            assert (await job.status()).worker_id == WORKER

        # A rerun: exit 0, the same files untouched, the same one agent, no node update.
        files, version = snapshot(root), node_version(node)
        again = await asyncio.to_thread(setup, argv)
        assert again.returncode == 0, again.stderr
        assert snapshot(root) == files
        assert node_version(node) == version
        assert agent_pids(config) == [pid]
        assert "+ docker swarm join" not in again.stderr
        assert "pip install" not in again.stderr
    finally:
        for running in agent_pids(config):
            stop_pid(running)
    assert agent_pids(config) == []


# -- dry runs: every command printed, none run -----------------------------------------------

TRAPPED = ("docker", "apt-get", "systemctl", "vastai", "ssh", "scp", "python3", "pip", "jq")


@pytest.fixture
def bare_path(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment whose PATH has the shell's helpers and, for every command a script
    could run for real (docker, apt-get, systemctl, vastai, ssh, ...), a trap that records the
    call: a dry run must leave the record empty."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    for tool in ("sed", "tr", "cat", "dirname", "basename", "printf", "env"):
        found = shutil.which(tool)
        if found:
            (bindir / tool).symlink_to(found)
    for tool in TRAPPED + ("install", "setsid", "kill", "rm", "chmod", "mkdir"):
        trap = bindir / tool
        trap.write_text(f'#!/bin/bash\necho "{tool} $*" >> {calls}\nexit 97\n')
        trap.chmod(0o755)
    env = clean_env()
    env["PATH"] = str(bindir)
    return env, calls


def dry(argv: list[str], env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run(
        ["/bin/bash", *argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stderr + done.stdout


def test_setup_worker_dry_run_prints_a_fresh_hosts_commands_and_runs_none(
    bare_path: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    env, calls = bare_path
    out = dry(
        [str(SETUP), "10.0.0.1:2377", "SWMTKN-1-abc", "--dry-run",
         "--nats-url", "tls://n1:4222,tls://n2:4222,tls://n3:4222", "--worker-id", "gpu-7",
         "--credentials", "/bundle/credentials.json", "--package", "/x/cumulus.whl",
         "--backend", "swarm", "--manager-engine", "ssh://root@10.0.0.1"],
        env, tmp_path,
    )  # fmt: skip
    expected = [
        "+ env DEBIAN_FRONTEND=noninteractive apt-get update",
        "+ env DEBIAN_FRONTEND=noninteractive apt-get install -y docker.io",
        "+ systemctl enable --now docker",
        "+ docker swarm join --token SWMTKN-1-abc 10.0.0.1:2377",
        "+ /opt/cumulus/venv/bin/python -m pip install /x/cumulus.whl",
        "+ /opt/cumulus/venv/bin/chronos_cli --json --state-dir /var/lib/cumulus/chronos-gpu-7 "
        "--backend auto stats",
        "+ docker -H ssh://root@10.0.0.1 node update --label-add gpu.count=\\<devices\\>",
        "+ install -D -m 0600 /bundle/credentials.json /etc/cumulus/credentials.json",
        "+ install -D -m 0644 /dev/stdin /etc/cumulus/config.yaml",
        '    |   url: "tls://n1:4222,tls://n2:4222,tls://n3:4222"',
        '    |   backend: "swarm"',
        "+ install -D -m 0644 /dev/stdin /etc/systemd/system/cumulus-worker.service",
        "    | ExecStart=/opt/cumulus/venv/bin/cumulus worker --config /etc/cumulus/config.yaml",
        "+ systemctl enable cumulus-worker.service",
        "+ systemctl restart cumulus-worker.service",
    ]
    at = 0
    for line in expected:  # in this order
        found = out.find(line, at)
        assert found >= 0, f"{line!r} not printed (in order) in:\n{out}"
        at = found
    assert "--label-add chronos.installed=true --label-add cumulus.worker=gpu-7" in out
    assert not calls.exists(), calls.read_text()


def test_setup_worker_refuses_bad_usage(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", str(SETUP), "--dry-run", "--worker-id", "gpu 7"],
        capture_output=True, text=True, timeout=30, env=clean_env(),
    )  # fmt: skip
    assert done.returncode == 2
    assert "missing --manager --token --nats-url --credentials --package" in done.stderr


def test_vastai_scripts_dry_run_print_their_commands_and_run_none(
    bare_path: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    env, calls = bare_path
    state = str(tmp_path / "dev.state")
    out = dry(
        [str(VASTAI / "create.sh"), "--dry-run", "--name", "lab", "--state", state,
         "--image", "debian:12", "--disk", "40"],
        env, tmp_path,
    )  # fmt: skip
    assert "+ vastai search offers cpu_cores\\>=2\\ cpu_ram\\>=4" in out
    assert (
        "+ vastai create instance \\<offer-id\\> --image debian:12 --disk 40 --ssh --direct "
        "--label lab --env -p\\ 2377:2377\\ -p\\ 7946:7946" in out
    )
    assert "+ vastai show instance \\<instance-id\\> --raw" in out
    assert not Path(state).exists()

    out = dry(
        [str(VASTAI / "create.sh"), "--dry-run", "--offer", "4242", "--state", state],
        env, tmp_path,
    )  # fmt: skip
    assert "+ vastai create instance 4242 " in out
    assert "vastai search" not in out

    where = ["--instance", "77", "--ssh-host", "ssh5.vast.ai", "--ssh-port", "31022"]
    where += ["--state", state, "--name", "lab"]
    out = dry([str(VASTAI / "context.sh"), "--dry-run", *where, "--use"], env, tmp_path)
    assert "+ docker context create vast-lab --docker host=ssh://root@ssh5.vast.ai:31022" in out
    assert "+ docker context use vast-lab" in out

    out = dry([str(VASTAI / "ports.sh"), "--dry-run", *where], env, tmp_path)
    assert "+ ssh -o StrictHostKeyChecking=accept-new -o ConnectTimeout=10 -p 31022 " in out
    assert "ufw\\ allow" in out
    assert "+ vastai show instance 77 --raw" in out

    out = dry(
        [str(VASTAI / "onboard.sh"), "--dry-run", *where, "--package", "/w/cumulus.whl",
         "--credentials", "/b/credentials.json", "--",
         "--manager", "10.0.0.1:2377", "--token", "SWMTKN-1-x", "--worker-id", "gpu-7",
         "--pip-args", "--no-index --find-links /w"],
        env, tmp_path,
    )  # fmt: skip
    assert "+ scp -o StrictHostKeyChecking=accept-new -o ConnectTimeout=10 -P 31022 " in out
    assert "/w/cumulus.whl root@ssh5.vast.ai:/root/cumulus-onboard/" in out
    assert "bash\\ /root/cumulus-onboard/setup-worker.sh\\ --package" in out
    assert "--worker-id\\ gpu-7" in out
    # an argument with spaces reaches setup-worker.sh as one argument
    assert "--pip-args\\ --no-index\\\\\\ --find-links\\\\\\ /w" in out

    out = dry([str(VASTAI / "destroy.sh"), "--dry-run", *where, "--swarm", "node-9"], env, tmp_path)
    assert "+ docker node rm --force node-9" in out
    assert "+ vastai destroy instance 77" in out
    assert "+ docker context rm --force vast-lab" in out
    assert not calls.exists(), calls.read_text()


def test_vastai_scripts_without_dry_run_need_the_vastai_cli(
    bare_path: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    env, calls = bare_path
    (Path(env["PATH"]) / "vastai").unlink()
    done = subprocess.run(
        ["/bin/bash", str(VASTAI / "destroy.sh"), "--instance", "77"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 1
    assert "vastai not found" in done.stderr


# -- units and the stack file -----------------------------------------------------------------


def unit_sections(path: Path) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, eq, value = line.partition("=")
        assert eq, f"{path.name}: not a key=value line: {raw!r}"
        assert key, f"{path.name}: not a key=value line: {raw!r}"
        current[key] = value
    return sections


EXPECTED_UNITS = {
    "cumulus-worker.service": ["cumulus", "worker", "--config", "/etc/cumulus/config.yaml"],
    "cumulus-gateway.service": ["cumulus", "gateway", "--config", "/etc/cumulus/config.yaml"],
    "cumulus-scheduler.service": ["cumulus", "scheduler", "--config", "/etc/cumulus/config.yaml"],
    "cumulus-nats.service": ["nats-server", "-c", "/etc/cumulus/nats.conf"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED_UNITS))
def test_systemd_units_are_valid(name: str, tmp_path: Path) -> None:
    unit = UNITS / name
    sections = unit_sections(unit)
    assert set(sections) == {"Unit", "Service", "Install"}
    argv = sections["Service"]["ExecStart"].split()
    assert argv[0].startswith("/opt/cumulus/venv/bin/")
    assert [Path(argv[0]).name, *argv[1:]] == EXPECTED_UNITS[name]
    # The command exists in this form: our venv has the same programs.
    here = Path(sys.executable).parent / Path(argv[0]).name
    assert here.exists(), here
    if Path(argv[0]).name == "cumulus":
        usage = subprocess.run(
            [str(here), argv[1], "--help"], capture_output=True, text=True, timeout=60
        )
        assert usage.returncode == 0, usage.stderr
        assert "--config" in usage.stdout
    if "scheduler" in name:
        assert sections["Service"]["Restart"] == "always"  # superseded: back as the standby
        assert "CUMULUS_INSTANCE=%H" in sections["Service"]["Environment"]
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    local = tmp_path / name  # the same unit, pointing at this machine's venv
    local.write_text(unit.read_text().replace("/opt/cumulus/venv/bin/", f"{here.parent}/"))
    done = subprocess.run(
        [analyze, "verify", str(local)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def test_stack_file_has_the_central_services() -> None:
    stack = yaml.safe_load((INFRA / "stack/cumulus.yml").read_text())
    services = stack["services"]
    assert set(services) == {"nats-1", "nats-2", "nats-3", "gateway", "scheduler"}
    for n in (1, 2, 3):
        nats = services[f"nats-{n}"]
        assert nats["entrypoint"] == ["nats-server", "-c", "/etc/cumulus/nats.conf"]
        assert nats["deploy"]["placement"]["constraints"] == [f"node.labels.cumulus.nats == {n}"]
    scheduler = services["scheduler"]
    assert scheduler["deploy"]["replicas"] == 2
    assert scheduler["deploy"]["placement"]["max_replicas_per_node"] == 1
    assert (
        scheduler["environment"]["CUMULUS_INSTANCE"]
        != services["gateway"]["environment"]["CUMULUS_INSTANCE"]
    )
    assert services["gateway"]["command"][:2] == ["cumulus", "gateway"]
    docker = shutil.which("docker")
    if docker is None:
        return
    done = subprocess.run(  # the Compose schema, checked by the docker CLI (deploys nothing)
        [docker, "stack", "config", "-c", str(INFRA / "stack/cumulus.yml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if "unknown command" in done.stderr or "is not a docker command" in done.stderr:
        return
    assert done.returncode == 0, done.stderr
