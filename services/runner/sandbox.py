"""The process backend's sandbox: every job in bubblewrap, as a user of its own.

With `worker.sandbox: bwrap` (the default) the in-job runner is started by Debian's
bubblewrap (`bwrap`), a small, well-kept sandbox tool, rather than forked from the runner's
side:

- **its own user**: a uid/gid `UID_BASE + n` leased for the job's life (a lock file under
  `LEASES`, held by the job's launcher), so no two running jobs share a user; a runner that
  is not root cannot switch users, and its jobs run as nobody inside a user namespace;
- **its own namespaces**: PID, IPC, UTS, cgroup and network (`--share-net` only when the launch
  allows the network), a new session, and killed with its launcher (`--die-with-parent`);
- **its own filesystem**: the system directories, /etc and the Python installation read-only,
  its directory read-write at /job, a private /tmp, /dev and /proc; the services' data
  directory, other jobs' directories and the bus's store are not there at all;
- **its own environment**: the job's variables only (never the bus URL, the data directory or
  credentials), passed to bwrap through a memfd so they are on no command line.

The launcher (services/runner/launcher.py) stays outside as the runner's user: it leases the
uid, opens the output files the runner reads (the job writes them through its inherited
descriptors and cannot reopen them), prepares a shared requirements environment in a sandbox
of its own, then execs bwrap. At start the runner checks that all this works (`Sandbox.
detect`, `Sandbox.self_test`) and refuses to start otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

log = logging.getLogger(__name__)

UID_BASE = 200_000
UID_COUNT = 65_536
"""Jobs run as uids (and gids) UID_BASE … UID_BASE + UID_COUNT - 1, one per running job."""
LEASES = Path("/run/cumulus/sandbox-uids")
"""Lock files of the leased uids, shared by every runner on the host."""
JOB_DIR = "/job"
DEPS_DIR = "/env/site"
BUILD_DIR = "/env/build"
WHEELHOUSE_DIR = "/wheelhouse"
READY = ".cumulus-ready"
"""Marks a prepared requirements environment (job_image/runner.py writes it)."""
SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
HIDDEN_ENV = ("CUMULUS_NATS_", "CUMULUS_DATA_DIR", "CUMULUS_CONFIG", "NATS_")
"""Prefixes of variables that never reach a job, whatever its launch says."""
NVIDIA_CONTROL = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset", "nvidia-caps")
FIX = (
    "install bubblewrap (apt-get install bubblewrap, or infra/ci/setup-sandbox.sh), or set "
    "worker.sandbox: none (CUMULUS_WORKER_SANDBOX=none) to run jobs unsandboxed"
)


@dataclass(frozen=True)
class Sandbox:
    """How this runner sandboxes jobs: found once at start, written into each launch.json."""

    bwrap: str
    python: str
    """The interpreter that runs the in-job runner inside (the runner's own)."""
    readonly: tuple[str, ...]
    """Host directories bound read-only at the same place: the Python installation."""
    hide: tuple[str, ...]
    """Directories covered by an empty tmpfs when a read-only bind would expose them."""
    own_users: bool
    """Each job gets a uid of its own (the runner is root); else nobody in a user namespace."""
    setpriv: str = ""
    """util-linux's setpriv, which drops to the job's uid inside (own_users only)."""

    @classmethod
    def detect(cls, hide: Sequence[Path] = ()) -> Sandbox:
        """This host's sandbox; ConfigError when bwrap (or setpriv, as root) is missing."""
        from shared.errors import ConfigError

        bwrap = shutil.which("bwrap")
        if bwrap is None:
            raise ConfigError(
                f"worker.sandbox is bwrap but bubblewrap (bwrap) is not on PATH: {FIX}",
                key="worker.sandbox",
            )
        own_users = os.geteuid() == 0
        setpriv = (shutil.which("setpriv") or "") if own_users else ""
        if own_users and not setpriv:
            raise ConfigError(
                "worker.sandbox is bwrap but util-linux's setpriv is missing (apt-get install "
                "util-linux), or set worker.sandbox: none (CUMULUS_WORKER_SANDBOX=none)",
                key="worker.sandbox",
            )
        return cls(
            bwrap=bwrap,
            python=sys.executable,
            readonly=tuple(python_paths()),
            hide=tuple(str(Path(p).resolve()) for p in hide),
            own_users=own_users,
            setpriv=setpriv,
        )

    def self_test(self) -> None:
        """Start one sandboxed interpreter; ConfigError saying why it failed, if it does."""
        from shared.errors import ConfigError

        if self in _TESTED:
            return
        probe = "import os, cloudpickle, job_image.runner; assert os.getuid() != 0, 'root'"
        lease = Lease.take(self.own_users, "self-test")
        fds: list[int] = []
        try:
            argv, fds = self.command(
                lease, [self.python, "-c", probe], warm_env(os.environ), job=None
            )
            done = subprocess.run(
                argv,
                pass_fds=fds,
                env=_outer_env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=60,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            done = subprocess.CompletedProcess([], 1, b"", str(exc).encode())
        finally:
            lease.release()
            for fd in fds:
                os.close(fd)
        if done.returncode != 0:
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            tail = " / ".join(lines[-3:]) or "no output"
            raise ConfigError(
                f"worker.sandbox is bwrap but a sandboxed job cannot start ({tail}, exit "
                f"{done.returncode}): the Python installation must be readable by every user; "
                "or set worker.sandbox: none (CUMULUS_WORKER_SANDBOX=none) to run jobs "
                "unsandboxed",
                key="worker.sandbox",
            )
        _TESTED.add(self)

    def spec(self, *, network: bool, deps: str | None) -> dict[str, Any]:
        """What a job's launcher needs (launch.json's `sandbox`)."""
        return {
            "bwrap": self.bwrap,
            "python": self.python,
            "readonly": list(self.readonly),
            "hide": list(self.hide),
            "own_users": self.own_users,
            "setpriv": self.setpriv,
            "network": network,
            "deps": deps,
        }

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Sandbox:
        return cls(
            bwrap=spec["bwrap"],
            python=spec["python"],
            readonly=tuple(spec["readonly"]),
            hide=tuple(spec["hide"]),
            own_users=bool(spec["own_users"]),
            setpriv=spec.get("setpriv", ""),
        )

    def command(
        self,
        lease: Lease,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        job: Path | None,
        network: bool = False,
        binds: Sequence[tuple[str, str, bool]] = (),
        devices: Sequence[str] = (),
    ) -> tuple[list[str], list[int]]:
        """bwrap's command line running `argv` as the lease's user, and the fds it inherits.

        `job` is bound read-write at /job; `binds` are extra (host path, path inside,
        writable) mounts; `devices` are device nodes (a GPU partition's) bound where they are.
        """
        box = _Options()
        box.add("--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-cgroup-try")
        if not network:
            box.add("--unshare-net")
        if self.own_users:
            # Real root cannot map a user namespace to another uid: bwrap runs privileged,
            # without one, and setpriv drops to the job's own uid before anything else runs.
            box.add("--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID")
        else:
            box.add("--unshare-user", "--disable-userns", "--uid", "65534", "--gid", "65534")
        box.add("--die-with-parent", "--new-session", "--hostname", "cumulus-job", "--clearenv")
        for key, value in env.items():
            box.add("--setenv", key, value)
        _filesystem(box, self.readonly, lease)
        if job is not None:
            box.bind(str(job), JOB_DIR, writable=True)
        for source, inside, writable in binds:
            box.bind(source, inside, writable=writable)
        for device in devices:
            box.add("--dev-bind", device, device)
        if devices:
            box.bind("/sys", "/sys", writable=False)
        bound = [*SYSTEM, *self.readonly]
        for path in self.hide:
            if any(_under(path, b) for b in bound):
                box.add("--tmpfs", path)
        box.add("--chdir", JOB_DIR if job is not None else "/")
        args = box.memfd()
        head = [self.bwrap, "--args", str(args)]
        if self.own_users:
            head += [
                self.setpriv,
                f"--reuid={lease.uid}",
                f"--regid={lease.gid}",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
                "--no-new-privs",
                "--",
            ]
        return [*head, *argv], [args, *box.fds]


_TESTED: set[Sandbox] = set()
"""Sandboxes that passed their self-test in this process (each runner tests once)."""


class _Options:
    """bwrap options, written to a memfd for `--args` (the environment stays off `ps`)."""

    def __init__(self) -> None:
        self.args: list[str] = []
        self.fds: list[int] = []
        self._dirs: set[str] = {"/"}

    def add(self, *args: str) -> None:
        self.args.extend(args)

    def dirs(self, path: str) -> None:
        """Create `path`'s parents, world-searchable (bwrap would copy the host's modes)."""
        parent = os.path.dirname(path)
        if parent in self._dirs:
            return
        self.dirs(parent)
        self.add("--perms", "0755", "--dir", parent)
        self._dirs.add(parent)

    def made(self, *paths: str) -> None:
        self._dirs.update(paths)

    def bind(self, source: str, inside: str, *, writable: bool) -> None:
        self.dirs(inside)
        self.add("--bind" if writable else "--ro-bind", source, inside)
        self._dirs.add(inside)

    def data(self, content: bytes, inside: str) -> None:
        fd = _memfd(content)
        self.fds.append(fd)
        self.add("--perms", "0644", "--ro-bind-data", str(fd), inside)

    def memfd(self) -> int:
        return _memfd(b"".join(a.encode() + b"\0" for a in self.args))


def _memfd(content: bytes) -> int:
    fd = os.memfd_create("cumulus-sandbox", 0)
    os.set_inheritable(fd, True)
    os.write(fd, content)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _filesystem(box: _Options, readonly: Iterable[str], lease: Lease) -> None:
    """System directories and the Python installation read-only; private /dev, /proc, /tmp."""
    for path in SYSTEM:
        if os.path.islink(path):
            box.add("--symlink", os.readlink(path), path)
        elif os.path.isdir(path):
            box.bind(path, path, writable=False)
    if lease.uid is not None:
        # Libraries that look their user up (getpass.getuser) find the job's.
        for name, line in (
            ("passwd", f"cumulus-job:x:{lease.uid}:{lease.gid}:Cumulus job:/tmp:/sbin/nologin"),
            ("group", f"cumulus-job:x:{lease.gid}:"),
        ):
            with contextlib.suppress(OSError), open(f"/etc/{name}", "rb") as f:
                box.data(f.read().rstrip(b"\n") + f"\n{line}\n".encode(), f"/etc/{name}")
    box.add("--dev", "/dev", "--proc", "/proc", "--perms", "1777", "--tmpfs", "/tmp")
    # Shared memory of its own (multiprocessing's locks, DataLoader workers).
    box.add("--perms", "1777", "--tmpfs", "/dev/shm")
    box.made("/dev", "/proc", "/tmp", "/dev/shm")
    for path in readonly:  # after /tmp: an installation there stays visible
        box.bind(path, path, writable=False)


def python_paths() -> list[str]:
    """The Python installation a job needs: prefixes, sys.path, the in-job runner's package
    and the SDK's (a job's `import cumulus`, as in the job image; an editable install finds
    them outside sys.path).

    Not sys.path[0] (the working directory under `python -m`, a script's directory) nor the
    working directory: that is wherever the runner was started, perhaps a checkout with the
    data directory inside.
    """
    import job_image

    cwd = os.path.realpath(os.getcwd())
    start = os.path.realpath(sys.path[0]) if sys.path and sys.path[0] else cwd
    found = [
        sys.base_prefix,
        sys.prefix,
        sys.exec_prefix,
        os.path.dirname(sys.executable),
        os.path.dirname(os.path.realpath(sys.executable)),
        os.path.dirname(os.path.abspath(job_image.__file__)),
    ]
    for name in ("cumulus", "shared", "cumulus_core"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            found += list(spec.submodule_search_locations)
    found += [p for p in sys.path if p and os.path.realpath(p) not in (cwd, start)]
    paths = sorted({os.path.abspath(p) for p in found if os.path.isdir(p)})
    kept: list[str] = []
    for path in paths:  # sorted: a parent comes before what it holds
        if any(_under(path, k) for k in [*kept, *SYSTEM]):
            continue
        kept.append(path)
    return kept


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _outer_env() -> dict[str, str]:
    """bwrap's own environment: nothing of the job's (a job's LD_PRELOAD must not reach it)."""
    return {"PATH": os.defpath}


@dataclass
class Lease:
    """A uid (and gid) held for a job's life: the flock goes when its launcher does."""

    uid: int | None
    gid: int | None
    fd: int = -1

    @classmethod
    def take(cls, own_users: bool, hint: str) -> Lease:
        if not own_users:
            return cls(None, None)
        leases = LEASES
        try:
            leases.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError:
            leases = Path(tempfile.gettempdir()) / "cumulus-sandbox-uids"
            leases.mkdir(mode=0o700, parents=True, exist_ok=True)
        start = zlib.crc32(hint.encode()) % UID_COUNT
        for i in range(UID_COUNT):
            uid = UID_BASE + (start + i) % UID_COUNT
            fd = os.open(leases / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return cls(uid, uid, fd)
        raise OSError(f"all {UID_COUNT} sandbox uids are in use")

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# -- in the launcher -----------------------------------------------------------------------


def job_env(env: Mapping[str, str], deps: str | None) -> dict[str, str]:
    """The job's environment inside: its own variables, paths as the sandbox has them."""
    out = {k: v for k, v in env.items() if not k.startswith(HIDDEN_ENV)}
    out.update({"HOME": "/tmp", "TMPDIR": "/tmp", "CUMULUS_JOB_DIR": JOB_DIR})
    out.pop("CUMULUS_DEPS_DIR", None)
    if deps is not None:
        out["CUMULUS_DEPS_DIR"] = deps
    if out.get("CUMULUS_WHEELHOUSE"):
        out["CUMULUS_WHEELHOUSE"] = WHEELHOUSE_DIR
    return out


STARTUP_ENV = ("LANG", "LC_ALL", "LC_CTYPE", "TZ")
"""Read when an interpreter starts (with PYTHON* and LD_*): a warm spare has them already."""


def warm_env(host: Mapping[str, str]) -> dict[str, str]:
    """A spare sandbox's environment until its job's arrives: the runner's paths and locale."""
    env = {k: v for k, v in host.items() if k in ("PATH", "PYTHONPATH", *STARTUP_ENV)}
    env["PYTHONUNBUFFERED"] = "1"
    return job_env(env, None)


def fits_spare(spec: Mapping[str, Any], warm: Mapping[str, str]) -> bool:
    """Can a warm spare run this launch? Not with network, requirements or GPU device nodes
    (a spare has none of them), nor when a variable its interpreter read at start differs."""
    box = spec.get("sandbox")
    if not box or box.get("network") or box.get("deps"):
        return False
    env: Mapping[str, str] = spec["env"]
    if gpu_devices(env):
        return False
    keys = {
        k
        for k in [*env, *warm]
        if (k.startswith(("PYTHON", "LD_")) or k in STARTUP_ENV) and k != "PYTHONUNBUFFERED"
    }
    return all(env.get(k) == warm.get(k) for k in keys)


def gpu_devices(env: Mapping[str, str]) -> list[str]:
    """The device nodes of the partition's NVIDIA GPUs (and the driver's control nodes).

    GPUs are matched by the UUIDs in NVIDIA_VISIBLE_DEVICES against the driver's
    /proc/driver/nvidia/gpus/*/information; where that cannot be read, every GPU's node is
    bound and CUDA_VISIBLE_DEVICES alone narrows what the job uses.
    """
    if "nvidia" not in env.get("CHRONOS_DEVICE_KIND", ""):
        return []
    wanted = {d.strip() for d in env.get("NVIDIA_VISIBLE_DEVICES", "").split(",") if d.strip()}
    minors: list[str] = []
    for info in glob.glob("/proc/driver/nvidia/gpus/*/information"):
        with contextlib.suppress(OSError):
            fields = dict(
                line.split(":", 1) for line in Path(info).read_text().splitlines() if ":" in line
            )
            if fields.get("GPU UUID", "").strip() in wanted:
                minors.append(f"/dev/nvidia{fields.get('Device Minor', '').strip()}")
    if not minors:
        minors = sorted(p for p in glob.glob("/dev/nvidia[0-9]*"))
    control = [f"/dev/{name}" for name in NVIDIA_CONTROL]
    return [d for d in [*control, *minors] if os.path.exists(d)]


def _mps_pipes(env: Mapping[str, str]) -> list[tuple[str, str, bool]]:
    """The MPS daemon's pipe directory, shared by design, for fractional GPU partitions."""
    pipes = env.get("CUDA_MPS_PIPE_DIRECTORY") or "/tmp/nvidia-mps"
    return [(pipes, pipes, True)] if os.path.isdir(pipes) else []


def start(job_dir: Path, spec: Mapping[str, Any], lease: Lease) -> NoReturn:
    """Become the sandboxed job (in the launcher's child, output already redirected)."""
    box = spec["sandbox"]
    sandbox = Sandbox.from_spec(box)
    own = job_dir / "job"
    if lease.uid is not None and lease.gid is not None:
        _chown_tree(own, lease.uid, lease.gid)
        os.chmod(own, 0o700)
    env: dict[str, str] = dict(spec["env"])
    binds: list[tuple[str, str, bool]] = []
    wheelhouse = env.get("CUMULUS_WHEELHOUSE", "")
    if wheelhouse and os.path.isdir(wheelhouse):
        binds.append((wheelhouse, WHEELHOUSE_DIR, False))
        _check_readable(wheelhouse)
    deps: str | None = None
    if box.get("deps"):
        ready = prepare(sandbox, lease, job_dir, Path(box["deps"]), env, binds)
        deps = DEPS_DIR if ready else f"{JOB_DIR}/deps"
        if ready:
            binds.append((box["deps"], DEPS_DIR, False))
    devices = gpu_devices(env)
    if devices:
        binds += _mps_pipes(env)
    argv, _ = sandbox.command(
        lease,
        [sandbox.python, "-m", "job_image.runner", "--job-dir", JOB_DIR],
        job_env(env, deps),
        job=own,
        network=bool(box.get("network")),
        binds=binds,
        devices=devices,
    )
    os.execve(sandbox.bwrap, argv, _outer_env())


def _check_readable(wheelhouse: str) -> None:
    """Say why pip will fail when jobs' users cannot read the operator's wheelhouse."""
    mode = os.stat(wheelhouse).st_mode
    if mode & 0o005 != 0o005:
        print(
            f"[cumulus] the wheelhouse {wheelhouse} (container.wheelhouse) is not readable by "
            f"sandboxed jobs (mode {mode & 0o777:o}); make it world-readable: "
            f"chmod -R a+rX {wheelhouse}",
            file=sys.stderr,
            flush=True,
        )


def prepare(
    sandbox: Sandbox,
    lease: Lease,
    job_dir: Path,
    deps: Path,
    env: Mapping[str, str],
    binds: Sequence[tuple[str, str, bool]],
) -> bool:
    """Install the job's requirements into the shared environment `deps`, if not there yet.

    pip runs in a sandbox of its own, before and apart from any user code, into a build
    directory only it can write; the result is then made root's (read-only to every job) and
    renamed into place. False when the install failed: the job then tries again in its own
    directory and reports the error as it would have.
    """
    if (deps / READY).exists():
        return True
    deps.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{deps.name}.build-", dir=deps.parent))
    try:
        if lease.uid is not None and lease.gid is not None:
            os.chown(build, lease.uid, lease.gid)
        inside = {k: v for k, v in env.items() if k in ("PATH", "LANG", "LC_ALL", "PYTHONPATH")}
        inside.update(
            {"HOME": "/tmp", "CUMULUS_REQUIREMENTS": env.get("CUMULUS_REQUIREMENTS", "[]")}
        )
        wheelhouse = any(b[1] == WHEELHOUSE_DIR for b in binds)
        if wheelhouse:
            inside["CUMULUS_WHEELHOUSE"] = WHEELHOUSE_DIR
        argv, fds = sandbox.command(
            lease,
            [sandbox.python, "-m", "job_image.runner", "--prepare", f"{BUILD_DIR}/site"],
            inside,
            job=None,
            network=not wheelhouse,  # as the container backends: only this step, no job code
            binds=[*binds, (str(build), BUILD_DIR, True)],
        )
        with open(job_dir / "prepare.log", "wb") as out:
            done = subprocess.run(
                argv,
                pass_fds=fds,
                env=_outer_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        for fd in fds:
            os.close(fd)
        site = build / "site"
        if done.returncode != 0 or not (site / READY).exists():
            return False
        if lease.uid is not None:
            _chown_tree(site, 0, 0)
        try:
            os.rename(site, deps)
        except OSError:  # another job prepared it first
            if not (deps / READY).exists():
                return False
        with contextlib.suppress(OSError):
            sys.stderr.buffer.write((job_dir / "prepare.log").read_bytes())
            sys.stderr.flush()
        return True
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    """chown -R without following links; a build made root's loses group/other write."""
    os.chown(root, uid, gid, follow_symlinks=False)
    for parent, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = os.path.join(parent, name)
            os.chown(path, uid, gid, follow_symlinks=False)
            if uid == 0 and not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode & 0o755)
