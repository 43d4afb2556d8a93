"""What the Docker engine and Swarm backends share: the job's hardened container, its labels,
the environment cache, and reading a multiplexed log stream into lines.

Every container runs the job image's in-job runner as a non-root user on a read-only root
filesystem; `/job` (the job's directory, bind-mounted) and `/tmp` (tmpfs) are the only writable
places; all capabilities are dropped, no new privileges, memory and pids limited, and no network
unless the job asks for it. Everything made for a job carries the labels `cumulus.job`,
`cumulus.attempt` and `cumulus.worker`, so a restarted runner finds and removes what it left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import re
import shutil
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.types import Mount

from services.runner.backend import END, FRAME, MAX_FRAME, MAX_LINE, Launch
from services.runner.process import requirements_key
from shared.config import Config

log = logging.getLogger(__name__)

LABEL_JOB = "cumulus.job"
LABEL_ATTEMPT = "cumulus.attempt"
LABEL_WORKER = "cumulus.worker"
LABEL_ENV = "cumulus.env"
JOB_USER = "65534:65534"
"""nobody:nogroup; the job's files in its bind-mounted directory belong to it."""
QUIET_S = 0.5
"""After the job ended, a log stream silent this long is taken as complete (killed jobs)."""
NETWORK_ENV = "CUMULUS_NETWORK"
"""A job that sets this (to 1) in its env gets the default network; others get none."""
_HOST_ONLY = ("PATH", "LANG", "LC_ALL", "PYTHONPATH")


def container_name(job_id: str, attempt: int) -> str:
    return f"cumulus-{job_id}-{attempt}"


def labels(worker_id: str, job_id: str, attempt: int) -> dict[str, str]:
    return {LABEL_JOB: job_id, LABEL_ATTEMPT: str(attempt), LABEL_WORKER: worker_id}


def parse_labels(found: dict[str, str] | None) -> tuple[str, int] | None:
    found = found or {}
    attempt = found.get(LABEL_ATTEMPT, "")
    if LABEL_JOB in found and attempt.isdigit():
        return found[LABEL_JOB], int(attempt)
    return None


def wants_network(launch: Launch) -> bool:
    return launch.network or launch.env.get(NETWORK_ENV, "") not in ("", "0")


def job_env(launch: Launch) -> dict[str, str]:
    """The job's environment inside the image: the host's paths stay outside."""
    env = {k: v for k, v in launch.env.items() if k not in _HOST_ONLY}
    env.update({"HOME": "/tmp", "CUMULUS_JOB_DIR": "/job"})
    if launch.requirements:
        env["CUMULUS_DEPS_DIR"] = "/env/site"
    return env


def nvidia_devices(env: dict[str, str]) -> list[str]:
    """The partition's real NVIDIA devices (UUIDs), or none for virtual devices."""
    if "nvidia" not in env.get("CHRONOS_DEVICE_KIND", ""):
        return []
    return [d for d in env.get("NVIDIA_VISIBLE_DEVICES", "").split(",") if d]


def engine(timeout: int = 60) -> docker.DockerClient:
    return docker.from_env(timeout=timeout)


def reachable(timeout: float = 2.0) -> bool:
    try:
        client = docker.from_env(timeout=max(1, int(timeout)))
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def memory_bytes(text: str) -> int:
    """'512m', '8g', '1073741824' → bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not match:
        raise ValueError(f"not a memory size: {text!r} (use e.g. 512m or 8g)")
    power: int = " kmgt".index(match[2] or " ")
    return int(match[1]) * int(1024**power)


@dataclass
class Prepared:
    """The job's directory on this host and what the container mounts."""

    job_dir: Path
    mounts: list[Mount]


class Jobs:
    """The job directories and the environment cache, shared by both container backends."""

    def __init__(self, config: Config, root: Path, worker_id: str) -> None:
        self.config = config
        self.root = root
        self.worker_id = worker_id
        self._env_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._image_id = ""

    def job_dir(self, job_id: str, attempt: int) -> Path:
        return self.root / "jobs" / f"{job_id}.{attempt}"

    def image_id(self, client: docker.DockerClient) -> str:
        """The job image's ID: Swarm then runs it without asking a registry first."""
        if not self._image_id:
            name = self.config.container.image
            try:
                self._image_id = str(client.images.get(name).id)
            except docker.errors.ImageNotFound:
                raise RuntimeError(
                    f"the job image {name} is not on this engine; build it with "
                    "infra/images/build-images.sh (every node needs it: see docs/runner.md)"
                ) from None
        return self._image_id

    def prepare(self, client: docker.DockerClient, launch: Launch) -> Prepared:
        """Write the job's directory and get its environment ready; return the mounts."""
        job_dir = self.job_dir(launch.job_id, launch.attempt)
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "package.zip").write_bytes(launch.package)
        (job_dir / ".nonce").write_text(launch.nonce)
        for path in (job_dir, job_dir / "package.zip", job_dir / ".nonce"):
            _give_to_job(path)
        mounts = [Mount("/job", str(job_dir), type="bind")]
        mounts += self._wheelhouse()
        if launch.requirements:
            volume = self.ensure_env(client, launch)
            mounts.append(Mount("/env", volume, type="volume", read_only=True))
        return Prepared(job_dir, mounts)

    def _wheelhouse(self) -> list[Mount]:
        path = self.config.container.wheelhouse
        if not path:
            return []
        return [Mount("/wheelhouse", str(Path(path).resolve()), type="bind", read_only=True)]

    def ensure_env(self, client: docker.DockerClient, launch: Launch) -> str:
        """The volume holding the job's requirements installed, prepared on first use.

        Keyed by the requirements' hash, so jobs with the same requirements share it. A
        short-lived container installs into it (from the mounted wheelhouse, or from the
        index with the default network, which the job itself never gets), then the job
        mounts it read-only: no job can change what the next one imports.
        """
        key = requirements_key(launch)
        name = f"cumulus-env-{key}"
        with self._lock:
            lock = self._env_locks.setdefault(key, threading.Lock())
        with lock:
            marker = self.root / "envs" / f"{key}.ready"
            try:
                client.volumes.get(name)
                if marker.exists():
                    return name
            except docker.errors.NotFound:
                client.volumes.create(name, labels={LABEL_ENV: key, LABEL_WORKER: self.worker_id})
            self._install(client, launch, name)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("\n".join(launch.requirements))
            return name

    def _install(self, client: docker.DockerClient, launch: Launch, volume: str) -> None:
        env = {"CUMULUS_REQUIREMENTS": _json_list(launch.requirements), "HOME": "/tmp"}
        if self.config.container.wheelhouse:
            env["CUMULUS_WHEELHOUSE"] = "/wheelhouse"
        started = time.monotonic()
        container = client.containers.run(
            self.image_id(client),
            ["--prepare", "/env/site"],
            detach=True,
            environment=env,
            mounts=[Mount("/env", volume, type="volume"), *self._wheelhouse()],
            labels={LABEL_ENV: requirements_key(launch), LABEL_WORKER: self.worker_id},
            network_mode="none" if self.config.container.wheelhouse else "bridge",
            **hardening(self.config),
        )
        try:
            code = int(container.wait(timeout=600)["StatusCode"])
            if code != 0:
                out = container.logs(stdout=True, stderr=True, tail=20).decode(errors="replace")
                raise RuntimeError(f"requirements could not be installed: {out.strip()}")
        finally:
            with contextlib.suppress(docker.errors.APIError):
                container.remove(force=True)
        log.info(
            "environment prepared",
            extra={"fields": {"volume": volume, "seconds": round(time.monotonic() - started, 2)}},
        )

    def remove_dir(self, job_id: str, attempt: int) -> None:
        shutil.rmtree(self.job_dir(job_id, attempt), ignore_errors=True)

    def dirs(self) -> list[tuple[str, int]]:
        out = []
        for path in (self.root / "jobs").glob("*.*"):
            job_id, _, attempt = path.name.rpartition(".")
            if attempt.isdigit():
                out.append((job_id, int(attempt)))
        return out


def hardening(config: Config) -> dict[str, Any]:
    """`containers.run` arguments for the isolation every job gets (see the module doc)."""
    limit = memory_bytes(config.container.memory)
    return {
        "user": JOB_USER,
        "read_only": True,
        "tmpfs": {"/tmp": f"rw,nosuid,nodev,size={config.container.tmp_size}"},
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "pids_limit": config.container.pids_limit,
        "mem_limit": limit,
        "memswap_limit": limit,
        "log_config": docker.types.LogConfig(type="json-file", config=log_options(config)),
    }


def log_options(config: Config) -> dict[str, str]:
    """The engine keeps at most about twice what the runner will deliver of a job's output."""
    return {"max-size": str(max(config.worker.max_log_bytes, 1 << 20)), "max-file": "2"}


def _give_to_job(path: Path) -> None:
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
    else:
        path.chmod(0o777 if path.is_dir() else 0o666)


def _json_list(items: list[str]) -> str:
    import json

    return json.dumps(items)


# -- reading a log stream ------------------------------------------------------------------

_B64 = re.compile(rb"[A-Za-z0-9+/=]+")
STREAMS = {1: "stdout", 2: "stderr"}


class _Splitter:
    """Bytes of one stream → complete lines, cut at MAX_LINE, with byte offsets.

    `offset` is where the lines returned so far end.
    """

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.buf = bytearray()

    def feed(self, data: bytes) -> None:
        self.buf += data

    def lines(self, final: bool) -> list[tuple[bytes, int]]:
        """(line, offset after it) for every complete line; with `final`, the rest too."""
        out: list[tuple[bytes, int]] = []
        buf = self.buf
        start = 0
        while True:
            nl = buf.find(b"\n", start, start + MAX_LINE + 1)
            if nl >= 0:
                out.append((bytes(buf[start:nl]), self.offset + nl + 1))
                start = nl + 1
            elif len(buf) - start >= MAX_LINE:
                out.append((bytes(buf[start : start + MAX_LINE]), self.offset + start + MAX_LINE))
                start += MAX_LINE
            else:
                break
        if final and start < len(buf):
            out.append((bytes(buf[start:]), self.offset + len(buf)))
            start = len(buf)
        del buf[:start]
        self.offset += start
        return out


Item = tuple[int, str, bytes] | tuple[int, None, None]


class LogStream:
    """A container's or service's multiplexed log stream, read by a thread, as an `Output`.

    The thread puts frames in a bounded queue (a job printing faster than the bus takes its
    lines waits on the engine, not in the runner's memory). Lines come out in order; the
    result frame is kept whole even where Swarm cut it into 16 KiB pieces (its continuation
    pieces are pure base64, rejoined). The output is complete when both streams carried the
    in-job runner's end marker. Otherwise, once the job has ended and the stream ended or
    stayed quiet for QUIET_S (a Swarm service's stream may stop early or never end), one more
    read of the whole log, without following, skipping the bytes already seen, collects the
    rest; its end is the end.
    """

    def __init__(
        self,
        client: docker.DockerClient,
        path: str,
        nonce: str,
        cursor: dict[str, int],
        max_queue: int = 256,
    ) -> None:
        self.client = client
        self.path = path
        self.end = f"{END} {nonce}".encode() if nonce else b"\x00"
        start = {name: cursor.get(name, 0) for name in STREAMS.values()}
        self.split = {name: _Splitter(at) for name, at in start.items()}
        self._cursor = dict(start)
        self._fed = dict(start)
        """Bytes of each stream consumed (from the log's start): where a catch-up resumes."""
        self._queue: queue.Queue[Item] = queue.Queue(max_queue)
        self._gen = 0
        self._eof = False
        self._catching_up = False
        self._ended: set[str] = set()
        self._pending: tuple[bytearray, int] | None = None
        """A result frame being rejoined: its bytes and the offset after its last piece."""
        self._final_since = 0.0
        self._last_data = time.monotonic()
        self._done = False
        self._stop = threading.Event()
        self._responses: dict[int, Any] = {}
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._spawn(follow=True)

    # -- the reader threads ------------------------------------------------------------------

    def _spawn(self, follow: bool) -> None:
        gen = self._gen
        skip = dict(self._fed)
        thread = threading.Thread(
            target=self._run, args=(gen, follow, skip), name=f"logs {self.path}", daemon=True
        )
        thread.start()

    def _run(self, gen: int, follow: bool, skip: dict[str, int]) -> None:
        seen = dict.fromkeys(skip, 0)
        try:
            api = self.client.api
            params = {"follow": int(follow), "stdout": 1, "stderr": 1}
            response = api._get(api._url(self.path), params=params, stream=True, timeout=None)
            self._responses[gen] = response
            api._raise_for_status(response)
            raw = response.raw
            while not self._stop.is_set() and gen == self._gen:
                header = raw.read(8)
                if len(header) < 8:
                    break
                kind, length = struct.unpack(">BxxxL", header)
                data = raw.read(length) if length else b""
                if length and len(data) < length:
                    break
                name = STREAMS.get(kind, "stdout")
                drop = max(0, min(len(data), skip[name] - seen[name]))
                seen[name] += len(data)
                if drop < len(data):
                    self._put((gen, name, data[drop:]))
        except Exception as exc:
            if not self._stop.is_set():
                fields = {"path": self.path, "error": repr(exc)}
                log.info("log stream ended", extra={"fields": fields})
        finally:
            self._put((gen, None, None))

    def _put(self, item: Item) -> None:
        while not self._stop.is_set() and item[0] == self._gen:
            try:
                self._queue.put(item, timeout=0.2)
                break
            except queue.Full:
                continue
        if self._loop is not None and self._wake is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._wake.set)

    def _catch_up(self) -> None:
        """Stop following; read the whole log once more from where we are."""
        self._close_responses()
        self._gen += 1
        self._eof = False
        self._catching_up = True
        self._spawn(follow=False)

    # -- Output ------------------------------------------------------------------------------

    async def read(self, final: bool) -> list[tuple[str, str]]:
        budget = 1 << 20
        while budget > 0:
            try:
                gen, name, data = self._queue.get_nowait()
            except queue.Empty:
                break
            if gen != self._gen:
                continue
            if name is None or data is None:
                self._eof = True
                break
            self.split[name].feed(data)
            self._fed[name] += len(data)
            budget -= len(data) + 8
            self._last_data = time.monotonic()
        now = time.monotonic()
        if final and not self._final_since:
            self._final_since = now
        quiet = final and now - max(self._final_since, self._last_data) >= QUIET_S
        if (
            final
            and not self.complete
            and not self._catching_up
            and (self._eof or quiet)
            and self._queue.empty()
        ):
            self._catch_up()
        ended = self.complete or (self._catching_up and self._eof)
        flush = final and ended and self._queue.empty()
        lines: list[tuple[str, str]] = []
        for name, splitter in self.split.items():
            for raw, offset in splitter.lines(flush):
                if raw.rstrip(b"\r") == self.end:
                    self._ended.add(name)
                if name == "stdout":
                    lines.extend(self._join(raw, offset))
                else:
                    lines.append((name, _text(raw)))
                    self._cursor[name] = offset
        if flush and self._pending is not None:
            lines.append(("stdout", self._flush_pending()))
        self._done = flush and not lines
        return lines

    def _join(self, raw: bytes, offset: int) -> list[tuple[str, str]]:
        """Stdout lines, with a result frame's pieces put back together."""
        out: list[tuple[str, str]] = []
        if self._pending is not None:
            body, _ = self._pending
            if _B64.fullmatch(raw) and len(body) < MAX_FRAME:
                body += raw
                self._pending = (body, offset)
                return out
            out.append(("stdout", self._flush_pending()))
        if FRAME in raw:
            self._pending = (bytearray(raw), offset)
            return out
        out.append(("stdout", _text(raw)))
        self._cursor["stdout"] = offset
        return out

    def _flush_pending(self) -> str:
        assert self._pending is not None
        body, offset = self._pending
        self._pending = None
        self._cursor["stdout"] = offset
        return _text(bytes(body))

    @property
    def done(self) -> bool:
        return self._done

    @property
    def complete(self) -> bool:
        return self._ended >= {"stdout", "stderr"}

    def cursor(self) -> dict[str, int]:
        return dict(self._cursor)

    async def wait(self, timeout: float) -> None:
        if self._wake is None:
            self._loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
        if not self._queue.empty():
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)
        self._wake.clear()

    def close(self) -> None:
        self._stop.set()
        self._close_responses()

    def _close_responses(self) -> None:
        for response in list(self._responses.values()):
            with contextlib.suppress(Exception):
                sock = self.client.api._get_raw_response_socket(response)
                sock._sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(Exception):
                response.close()
        self._responses.clear()


def _text(raw: bytes) -> str:
    return raw.decode(errors="replace").removesuffix("\r")
