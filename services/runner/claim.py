"""One live stack per worker id on a Docker engine: the owner id and the engine-side claim.

Every container, service and task a container backend makes carries, besides `cumulus.worker`,
`cumulus.owner`: the id of the stack that made it, random and kept in the runner's directory
(`<data_dir>/runner-<worker>/owner`), so a restart of the same data directory keeps it and
finds its own things again, and a cleanup never touches another stack's (`labels.py`).

The claim: while its runner lives, a worker id is held on the engine by a marker container
`cumulus-worker-<id>` labelled with the owner, the data directory and the host. It runs `cat`
on a stdin the runner holds attached: when the runner ends, however it ends (kill -9
included), the engine closes that stdin, `cat` exits and the marker removes itself (within a
second). So the marker's liveness is the runner's, with no heartbeat to miss or clock to trust.
A runner starting while another owner's marker runs is refused (`ConfigError`: one line,
exit status 2); a marker that is not running is stale and taken over; its own owner's marker
(a crash just now) is waited for, then taken over. If the marker dies while its runner lives
(the engine restarted), the runner takes the claim again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.utils.socket import read as read_socket

from services.runner.labels import LABEL_OWNER
from shared.errors import ConfigError

log = logging.getLogger(__name__)

LABEL_CLAIM = "cumulus.claim"
"""The worker id a marker container holds."""
LABEL_DATA_DIR = "cumulus.data-dir"
LABEL_HOST = "cumulus.host"
LABEL_PROCESS = "cumulus.claim-process"
"""Which runner process made the marker (two processes of one data dir must not fight)."""
WAIT_S = 5.0
"""How long a start waits for its own owner's old marker (or one being started) to go."""
RETRY_S = 5.0
"""How often a runner whose marker died tries to take the claim again."""


def marker_name(worker_id: str) -> str:
    return f"cumulus-worker-{worker_id}"


def owner_id(root: Path) -> str:
    """This stack's owner id for the worker in `root`: made once, kept across restarts."""
    path = root / "owner"
    with contextlib.suppress(FileNotFoundError):
        if found := path.read_text().strip():
            return found
    root.mkdir(parents=True, exist_ok=True)
    made = secrets.token_hex(8)
    draft = root / f".owner-{made}"
    draft.write_text(made + "\n")
    try:
        os.link(draft, path)  # the first writer wins; a concurrent one reads its id
    except FileExistsError:
        if not path.read_text().strip():  # an empty file (a crash while it was written)
            os.replace(draft, path)
    finally:
        draft.unlink(missing_ok=True)
    return path.read_text().strip()


def refusal(worker_id: str, holder: dict[str, Any]) -> ConfigError:
    """What a stack is told when another live stack holds its worker id on the engine."""
    labels = holder.get("Config", {}).get("Labels") or {}
    where = labels.get(LABEL_DATA_DIR, "?")
    host = labels.get(LABEL_HOST, "?")
    return ConfigError(
        f"worker id {worker_id} is in use on this Docker engine by another Cumulus stack "
        f"(data dir {where} on {host}; its marker container {marker_name(worker_id)}); "
        "set worker.id (CUMULUS_WORKER_ID) to an id of this stack's own",
        key="worker.id",
    )


def check_free(client: docker.DockerClient, worker_id: str, owner: str) -> None:
    """Raise the refusal when another owner's marker runs: the partitioner's look at start
    (the runner holds the claim; a refused stack must not register its worker either)."""
    try:
        holder = dict(client.api.inspect_container(marker_name(worker_id)))
    except docker.errors.NotFound:
        return
    labels = holder.get("Config", {}).get("Labels") or {}
    if holder.get("State", {}).get("Running") and labels.get(LABEL_OWNER) != owner:
        raise refusal(worker_id, holder)


class Claim:
    """The worker id's claim on the engine, taken at `take()`, given back at `close()`."""

    def __init__(
        self, client: docker.DockerClient, worker_id: str, owner: str, image: str, data_dir: Path
    ) -> None:
        self.client = client
        self.worker_id = worker_id
        self.owner = owner
        self.image = image
        self.data_dir = os.path.abspath(os.path.expanduser(data_dir))
        self.name = marker_name(worker_id)
        self.process = secrets.token_hex(6)
        self._socket: Any = None
        self._marker = ""
        self._closing = threading.Event()

    def take(self) -> None:
        """Hold the worker id on this engine, or raise ConfigError naming who holds it."""
        deadline = time.monotonic() + WAIT_S
        while True:
            holder = self._inspect()
            if holder is not None:
                verdict = self._judge(holder, time.monotonic() > deadline)
                if verdict == "taken":
                    raise self._refusal(holder)
                if verdict == "wait":
                    time.sleep(0.1)
                    continue
                self._remove(holder["Id"])
            if self._start():
                break
        watcher = threading.Thread(target=self._watch, name="claim-watch", daemon=True)
        watcher.start()
        log.info(
            "worker id claimed on the engine",
            extra={"fields": {"worker_id": self.worker_id, "marker": self.name}},
        )

    def close(self) -> None:
        """Give the claim back (a crash gives it back too: see the module's docstring)."""
        self._closing.set()
        if self._marker:
            self._remove(self._marker)
        self._let_go()

    def _let_go(self) -> None:
        """Close our end of the marker's stdin (the SDK's socket and the one beneath it)."""
        sock, self._socket = self._socket, None
        for end in (sock, getattr(sock, "_sock", None)):
            if end is not None:
                with contextlib.suppress(OSError):
                    end.close()

    def _inspect(self) -> dict[str, Any] | None:
        try:
            return dict(self.client.api.inspect_container(self.name))
        except docker.errors.NotFound:
            return None

    def _judge(self, holder: dict[str, Any], waited: bool) -> str:
        """free (stale: take it over), wait (it may be going, or starting) or taken."""
        labels = holder.get("Config", {}).get("Labels") or {}
        state = holder.get("State", {})
        ours = labels.get(LABEL_OWNER) == self.owner
        if state.get("Running"):
            if not ours:
                return "taken"
            # Our own owner's: the runner that crashed just now; its marker is going.
            return "free" if waited else "wait"
        if state.get("Status") == "created" and not ours and not waited:
            return "wait"  # another runner is starting it this moment
        return "free"

    def _refusal(self, holder: dict[str, Any]) -> ConfigError:
        return refusal(self.worker_id, holder)

    def _start(self) -> bool:
        """Make and start the marker, holding its stdin; False when another got there first."""
        api = self.client.api
        try:
            made = api.create_container(
                self.image,
                entrypoint=["cat"],
                command=[],
                name=self.name,
                stdin_open=True,  # with stdin_once: the engine closes it when we let go
                user="65534:65534",
                labels={
                    LABEL_CLAIM: self.worker_id,
                    LABEL_OWNER: self.owner,
                    LABEL_DATA_DIR: self.data_dir,
                    LABEL_HOST: socket.gethostname(),
                    LABEL_PROCESS: self.process,
                },
                host_config=api.create_host_config(
                    auto_remove=True,
                    network_mode="none",
                    read_only=True,
                    cap_drop=["ALL"],
                    security_opt=["no-new-privileges"],
                    mem_limit="32m",
                    pids_limit=8,
                ),
            )
        except docker.errors.APIError as exc:
            if exc.status_code == 409:  # the name is taken: judge the holder again
                return False
            raise
        marker = str(made["Id"])
        try:
            # Attached before it starts: a marker running with nobody attached would hold
            # the claim for ever.
            sock = api.attach_socket(marker, params={"stdin": 1, "stdout": 1, "stream": 1})
            api.start(marker)
        except docker.errors.NotFound:
            return False  # removed by another runner that judged it stale
        except BaseException:
            self._remove(marker)
            raise
        self._let_go()  # the stdin of a marker that ended before this one
        self._socket, self._marker = sock, marker
        return True

    def _remove(self, ref: str) -> None:
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            self.client.api.remove_container(ref, force=True)

    def _watch(self) -> None:
        """Until the marker ends (its stdout closes); then take the claim again."""
        while not self._closing.is_set():
            with contextlib.suppress(Exception):
                while read_socket(self._socket, 4096):
                    pass  # `cat` writes nothing; a read returns only at the end
            if self._closing.is_set():
                return
            log.warning(
                "the worker id's marker container ended while the runner runs; claiming again",
                extra={"fields": {"worker_id": self.worker_id, "marker": self.name}},
            )
            self._again()

    def _again(self) -> None:
        while not self._closing.is_set():
            try:
                if self._reclaim():
                    return
            except Exception as exc:
                log.warning("claiming the worker id failed", extra={"fields": {"error": str(exc)}})
            self._closing.wait(RETRY_S)

    def _reclaim(self) -> bool:
        """One try at taking the claim again; True when that is settled."""
        holder = self._inspect()
        if holder is None:
            return self._start()
        labels = holder.get("Config", {}).get("Labels") or {}
        running = bool(holder.get("State", {}).get("Running"))
        if running and labels.get(LABEL_OWNER) == self.owner:
            if labels.get(LABEL_PROCESS) != self.process:
                log.error(
                    "another runner of this data directory holds the worker id's claim now",
                    extra={"fields": {"worker_id": self.worker_id}},
                )
                self._closing.set()
                return True
        elif self._judge(holder, waited=True) != "free":
            log.error(self._refusal(holder).message)
            return False
        self._remove(holder["Id"])
        return self._start()
