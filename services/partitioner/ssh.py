"""Reaching agentless workers over SSH (asyncssh), as the seed's orchestrator does.

`SshPool` keeps one connection per worker, opened on first use with key authentication and
a connect timeout, reused by every later command, and dropped when it breaks so the next
command reconnects. `SshRunner` is the `CommandRunner` that runs one worker's `chronos_cli`
through the pool, so `Chronos` drives a remote worker exactly as it drives a local one.

A command that may have started on the worker is never re-run here: when the connection
breaks mid-command the caller sees `ChronosUnreachable`, and the partitioner's own retry
looks for the labelled partition before creating again.

Failures are typed (`shared.errors`): no connection, or one lost, is `ChronosUnreachable` (an
`Unavailable`); a command that timed out or was killed by a signal, or a chronos_cli the
worker's shell cannot find, is a plain `Unavailable`. `Chronos` adds the worker's id.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

import asyncssh

from services.partitioner.chronos import EXIT_CANNOT_RUN, ChronosUnreachable
from shared.config import SshConfig
from shared.errors import Unavailable

log = logging.getLogger(__name__)

KEEPALIVE_COUNT = 3
"""Unanswered keepalives before a connection counts as dead."""


@dataclass(frozen=True)
class SshTarget:
    """Where one worker's sshd listens and whom to log in as."""

    host: str
    port: int = 22
    user: str = "root"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}"


def parse_address(address: str, user: str = "root", port: int = 22) -> SshTarget:
    """`[user@]host[:port]` (IPv6 as `[addr]:port`) with defaults for what is left out."""
    text = address.strip()
    if "@" in text:
        user, text = text.rsplit("@", 1)
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest.startswith(":"):
            port = _port(rest[1:], address)
    elif text.count(":") == 1:
        host, _, number = text.partition(":")
        port = _port(number, address)
    else:
        host = text
    if not host or not user:
        raise ValueError(f"invalid SSH address {address!r}: expected [user@]host[:port]")
    return SshTarget(host=host, port=port, user=user)


def _port(text: str, address: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise ValueError(f"invalid port in SSH address {address!r}")
    return port


def parse_workers(spec: str | dict[str, str]) -> dict[str, str]:
    """Worker id -> address from the config's mapping or its `id=addr,id=addr` string."""
    if isinstance(spec, dict):
        pairs = list(spec.items())
    else:
        pairs = []
        for item in spec.split(","):
            if not item.strip():
                continue
            worker_id, sep, address = item.partition("=")
            if not sep:
                raise ValueError(f"invalid SSH worker {item.strip()!r}: expected id=[user@]host")
            pairs.append((worker_id, address))
    return {worker_id.strip(): address.strip() for worker_id, address in pairs}


class SshPool:
    """SSH connections to agentless workers: one per worker, reused, reopened when lost."""

    def __init__(self, config: SshConfig) -> None:
        self.config = config
        self._conns: dict[SshTarget, asyncssh.SSHClientConnection] = {}
        self._locks: dict[SshTarget, asyncio.Lock] = {}
        self._sessions: dict[SshTarget, asyncio.Semaphore] = {}
        self.connects = 0
        """Connections opened so far (a reused connection is not counted again)."""

    def _options(self) -> dict[str, object]:
        known: object = ()  # asyncssh's default: ~/.ssh/known_hosts
        if self.config.known_hosts == "none":
            known = None
        elif self.config.known_hosts:
            known = os.path.expanduser(self.config.known_hosts)
        return {
            "client_keys": [os.path.expanduser(self.config.key_path)],
            "known_hosts": known,
            "agent_path": None,
            "connect_timeout": self.config.timeout,
            "keepalive_interval": max(1.0, self.config.timeout),
            "keepalive_count_max": KEEPALIVE_COUNT,
        }

    def connected(self, target: SshTarget) -> bool:
        conn = self._conns.get(target)
        return conn is not None and not conn.is_closed()

    async def connection(self, target: SshTarget) -> asyncssh.SSHClientConnection:
        """The worker's open connection, opening one if there is none (or it broke)."""
        async with self._locks.setdefault(target, asyncio.Lock()):
            conn = self._conns.get(target)
            if conn is not None and not conn.is_closed():
                return conn
            try:
                async with asyncio.timeout(self.config.timeout + 1.0):
                    conn = await asyncssh.connect(
                        target.host,
                        target.port,
                        username=target.user,
                        **self._options(),
                    )
            except (OSError, asyncssh.Error, TimeoutError, ValueError) as exc:
                raise _unreachable("connection", target, exc) from None
            self._conns[target] = conn
            self.connects += 1
            log.info("ssh connected", extra={"fields": {"target": str(target)}})
            return conn

    def _drop(self, target: SshTarget, conn: asyncssh.SSHClientConnection) -> None:
        if self._conns.get(target) is conn:
            del self._conns[target]
        conn.abort()

    async def run(
        self, target: SshTarget, argv: Sequence[str], timeout: float
    ) -> tuple[int, str, str]:
        """Run `argv` on the worker; (exit code, stdout, stderr)."""
        command = shlex.join(argv)
        sessions = self._sessions.setdefault(
            target, asyncio.Semaphore(max(1, self.config.max_sessions))
        )
        async with sessions:
            for reused in (True, False):
                conn = await self.connection(target)
                try:
                    process = await conn.create_process(command, encoding="utf-8", errors="replace")
                except asyncssh.ChannelOpenError as exc:
                    # The command never started: the connection was stale. Reconnect once.
                    self._drop(target, conn)
                    if reused:
                        continue
                    raise _unreachable("session", target, exc) from None
                except (OSError, asyncssh.Error) as exc:
                    self._drop(target, conn)
                    raise _unreachable("session", target, exc) from None
                return await self._finish(target, conn, process, argv, timeout)
        raise AssertionError("unreachable")

    async def _finish(
        self,
        target: SshTarget,
        conn: asyncssh.SSHClientConnection,
        process: asyncssh.SSHClientProcess[str],
        argv: Sequence[str],
        timeout: float,
    ) -> tuple[int, str, str]:
        try:
            result = await process.wait(timeout=timeout)
        except asyncssh.TimeoutError:
            process.close()
            raise Unavailable(
                f"{shlex.join(argv[:3])} … timed out after {timeout:.0f} s on {target}"
            ) from None
        except (OSError, asyncssh.Error) as exc:
            self._drop(target, conn)
            raise ChronosUnreachable(f"SSH connection to {target} lost: {_why(exc)}") from None
        if result.exit_status is None or result.exit_status < 0:
            if conn.is_closed():
                self._drop(target, conn)
                raise ChronosUnreachable(f"SSH connection to {target} lost during a command")
            signal = result.exit_signal[0] if result.exit_signal else "unknown"
            raise Unavailable(f"chronos_cli on {target} was killed by signal {signal}")
        out = result.stdout if isinstance(result.stdout, str) else ""
        err = result.stderr if isinstance(result.stderr, str) else ""
        if result.exit_status in EXIT_CANNOT_RUN:
            what = "not found" if result.exit_status == 127 else "cannot be run"
            raise Unavailable(
                f"chronos_cli {what} on {target} (exit {result.exit_status}): {err.strip()[-200:]}"
            )
        return result.exit_status, out, err

    async def close(self) -> None:
        conns = list(self._conns.values())
        self._conns.clear()
        for conn in conns:
            conn.close()
        for conn in conns:
            try:
                async with asyncio.timeout(2.0):
                    await conn.wait_closed()
            except (TimeoutError, OSError, asyncssh.Error):
                conn.abort()


@dataclass
class SshRunner:
    """The `CommandRunner` of one agentless worker: its commands go through `pool`."""

    pool: SshPool
    target: SshTarget

    async def __call__(self, argv: Sequence[str], timeout: float) -> tuple[int, str, str]:
        return await self.pool.run(self.target, argv, timeout)


def _unreachable(what: str, target: SshTarget, exc: BaseException) -> ChronosUnreachable:
    return ChronosUnreachable(f"SSH {what} to {target} failed: {_why(exc)}")


def _why(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())
