"""A real OpenSSH sshd on 127.0.0.1 for tests and benchmarks, with keys made on the spot.

`Sshd` runs `/usr/sbin/sshd -D` with its own config (a free port, `ListenAddress 127.0.0.1`,
its own pid file and host key, `AuthorizedKeysFile` pointing at the generated client key,
`StrictModes no`, `UsePAM no`) and stops it by pid: the listener and every per-connection
sshd it forked (those start their own sessions, so a process group would miss them), which
is what "the worker's sshd went away" means to a client holding a connection.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from services.stack import free_port

SSHD = Path("/usr/sbin/sshd")


@dataclass
class SshKeys:
    dir: Path
    host_key: Path
    client_key: Path
    authorized: Path
    host_public: str


def make_keys(folder: Path) -> SshKeys:
    """Fresh host and client keys (ed25519) under `folder`; the client key is authorized."""
    folder.mkdir(parents=True, exist_ok=True)
    host = asyncssh.generate_private_key("ssh-ed25519")
    client = asyncssh.generate_private_key("ssh-ed25519")
    keys = SshKeys(
        dir=folder,
        host_key=folder / "host_ed25519",
        client_key=folder / "client_ed25519",
        authorized=folder / "authorized_keys",
        host_public=host.export_public_key().decode().strip(),
    )
    keys.host_key.write_bytes(host.export_private_key())
    keys.client_key.write_bytes(client.export_private_key())
    keys.authorized.write_bytes(client.export_public_key())
    for path in (keys.host_key, keys.client_key):
        path.chmod(0o600)
    return keys


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in _children(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


@dataclass
class Sshd:
    """One sshd of our own on 127.0.0.1:`port`; `start` again after `stop` reuses the port."""

    keys: SshKeys
    dir: Path
    port: int = field(default_factory=free_port)
    popen: subprocess.Popen[bytes] | None = None

    @property
    def user(self) -> str:
        return getpass.getuser()

    @property
    def address(self) -> str:
        return f"{self.user}@127.0.0.1:{self.port}"

    @property
    def known_hosts(self) -> Path:
        path = self.dir / "known_hosts"
        path.write_text(f"[127.0.0.1]:{self.port} {self.keys.host_public}\n")
        return path

    def start(self, timeout: float = 10.0) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation dir
        config = self.dir / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {self.keys.host_key}",
                    f"PidFile {self.dir / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.keys.authorized}",
                    "StrictModes no",
                    "UsePAM no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin prohibit-password",
                    "MaxStartups 100",
                    "LogLevel VERBOSE",
                    "",
                ]
            )
        )
        with open(self.dir / "sshd.log", "ab") as log:
            self.popen = subprocess.Popen(
                [str(SSHD), "-D", "-e", "-f", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.popen.poll() is not None:
                raise RuntimeError(f"sshd exited; see {self.dir / 'sshd.log'}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"sshd did not listen on {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the listener and every connection it serves, by pid."""
        if self.popen is None:
            return
        pids = [self.popen.pid, *_descendants(self.popen.pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.popen.wait(timeout=10)
        self.popen = None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None
