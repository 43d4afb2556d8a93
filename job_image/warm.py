"""The job side of a warm map: one host process and N warm processes that call the function.

`job_image.runner` hands a package of kind "map" here. The host loads the function once,
forks `warm` processes that inherit it, and listens on the Unix socket MAP_SOCKET in the job
directory. The worker's runner (services/runner/mapfeed.py) connects and sends inputs; the
host hands each to an idle warm process and sends its answer back. No job code reaches the bus:
the runner pulls the inputs and publishes the answers.

Per input: `(args, kwargs)` cloudpickled by the SDK in; out, the value cloudpickled, or the
error as the in-job runner reports a job's (type, message, traceback). An input whose call
raised is tried `retries` more times; one whose warm process died (a crash, the OOM killer)
is tried again in a fresh process up to MAP_CRASH_TRIES times in all. Lines an input prints
are prefixed `[input N] `, so a map's logs say which input printed them.

The runner restarting (or its worker being declared lost) drops the connection: the inputs in
hand are given up (the work queue gives them out again, and an answer published twice is
stored once), and the host waits RECONNECT_S for a runner to connect again before it ends.

Frames, both ways: a 13-byte header (kind: 1 byte, index: 8-byte signed, length: 4 bytes, big
endian) then `length` bytes. Runner to host: INPUT (index, payload), DONE (length 0: no more
inputs, the payload of the last is the job's value as JSON). Host to runner: ANSWER_OK (index,
cloudpickle of the value), ANSWER_ERROR (index, JSON error). Standard library only, apart
from cloudpickle.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAP_SOCKET = ".cumulus-map.sock"
"""The host's socket in the job directory (the runner connects to it)."""
HEADER = struct.Struct(">BqI")
INPUT, DONE, ANSWER_OK, ANSWER_ERROR = b"I"[0], b"D"[0], b"R"[0], b"E"[0]
MAX_FRAME = 256 * 1024 * 1024
MAP_CRASH_TRIES = 3
"""Must equal shared.events.MAP_CRASH_TRIES (the in-job runner imports nothing of shared)."""
RECONNECT_S = 30.0
"""How long the host waits for a runner (at first, and after losing one) before it ends."""
MAX_ERROR = 16 * 1024
MAX_TRACEBACK = 64 * 1024


def encode_frame(kind: int, index: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, index, len(payload)) + payload


class FrameReader:
    """Frames out of a byte stream, as whole frames arrive."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        self._buf += data
        out = []
        while len(self._buf) >= HEADER.size:
            kind, index, length = HEADER.unpack_from(self._buf)
            if length > MAX_FRAME:
                raise ValueError(f"a map frame of {length} bytes is over {MAX_FRAME}")
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            out.append((kind, index, bytes(self._buf[HEADER.size : end])))
            del self._buf[:end]
        return out


def error_answer(exc: BaseException) -> bytes:
    """An input's error as the SDK reads it (the in-job runner's error envelope)."""
    message = str(exc)
    if len(message) > MAX_ERROR:
        message = "…" + message[-MAX_ERROR:]
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if len(tb) > MAX_TRACEBACK:
        tb = "…" + tb[-MAX_TRACEBACK:]
    return json.dumps(
        {"code": "INTERNAL", "type": type(exc).__name__, "message": message, "traceback": tb}
    ).encode()


def lost_answer(index: int, how: str) -> bytes:
    return json.dumps(
        {
            "code": "INTERNAL",
            "type": "WorkerCrashed",
            "message": f"the process running input {index} died ({how}) "
            f"{MAP_CRASH_TRIES} times; giving up on this input",
            "traceback": "",
        }
    ).encode()


# -- a warm process ------------------------------------------------------------------------


class _Tagged:
    """A text stream that writes whole lines to `fd`, each prefixed with the current input."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pending = ""
        self.index = -1
        self.encoding = "utf-8"
        self.errors = "replace"

    def write(self, text: str) -> int:
        self._pending += text
        if "\n" in self._pending:
            *lines, self._pending = self._pending.split("\n")
            self._out(lines)
        return len(text)

    def flush(self) -> None:
        if self._pending:
            lines, self._pending = [self._pending], ""
            self._out(lines)

    def _out(self, lines: list[str]) -> None:
        prefix = f"[input {self.index}] " if self.index >= 0 else ""
        data = "".join(f"{prefix}{line}\n" for line in lines).encode("utf-8", "replace")
        while data:
            data = data[os.write(self._fd, data) :]

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._fd


def _serve(func: Callable[..., Any], conn: socket.socket) -> None:
    """A warm process: call `func` on every input the host sends, answer each, until EOF."""
    import cloudpickle

    out, err = _Tagged(1), _Tagged(2)
    sys.stdout, sys.stderr = out, err
    reader = FrameReader()
    while True:
        data = conn.recv(1 << 20)
        if not data:
            return
        for _kind, index, payload in reader.feed(data):
            out.index = err.index = index
            try:
                args, kwargs = cloudpickle.loads(payload)
                value = func(*args, **kwargs)
                answer = encode_frame(ANSWER_OK, index, cloudpickle.dumps(value))
            except Exception as exc:
                answer = encode_frame(ANSWER_ERROR, index, error_answer(exc))
            out.flush()
            err.flush()
            out.index = err.index = -1
            conn.sendall(answer)


# -- the host --------------------------------------------------------------------------------


@dataclass
class _Warm:
    pid: int
    conn: socket.socket
    reader: FrameReader = field(default_factory=FrameReader)
    index: int | None = None
    """The input it is calling the function on, if any."""


@dataclass
class _Input:
    index: int
    payload: bytes
    raised: int = 0
    crashed: int = 0


class Host:
    def __init__(self, func: Callable[..., Any], warm: int, retries: int, path: Path) -> None:
        self.func = func
        self.warm = warm
        self.retries = retries
        self.path = path
        self.sel = selectors.DefaultSelector()
        self.procs: list[_Warm] = []
        self.queue: deque[_Input] = deque()
        self.inputs: dict[int, _Input] = {}
        self.runner: socket.socket | None = None
        self.runner_reader = FrameReader()
        self.out = bytearray()
        """Answers not yet written to the runner."""
        self.lost_at = time.monotonic()
        self.value: bytes | None = None
        """The DONE frame's payload: the map is over."""

    def run(self) -> bytes:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # A socket address holds at most 107 bytes: bound through a descriptor of its folder.
        folder = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            listener.bind(f"/proc/self/fd/{folder}/{self.path.name}")
        finally:
            os.close(folder)
        os.chmod(self.path, 0o600)
        listener.listen(4)
        listener.setblocking(False)
        self.sel.register(listener, selectors.EVENT_READ, "listen")
        for _ in range(self.warm):
            self._spawn()
        try:
            while self.value is None:
                if self.runner is None and time.monotonic() - self.lost_at > RECONNECT_S:
                    raise RuntimeError(
                        f"no runner connected to the map for {RECONNECT_S:.0f} s; ending"
                    )
                for key, _mask in self.sel.select(timeout=1.0):
                    self._ready(key.data, key.fileobj)
                self._dispatch()
                self._flush()
        finally:
            self._stop()
            with contextlib.suppress(OSError):
                listener.close()
                self.path.unlink()
        return self.value

    def _spawn(self) -> None:
        mine, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the warm process
            try:
                mine.close()
                if self.runner is not None:
                    self.runner.close()
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                _serve(self.func, theirs)
            finally:
                os._exit(0)
        theirs.close()
        proc = _Warm(pid, mine)
        self.procs.append(proc)
        self.sel.register(mine, selectors.EVENT_READ, proc)

    def _ready(self, what: Any, sock: Any) -> None:
        if what == "listen":
            conn, _ = sock.accept()
            if self.runner is not None:  # a restarted runner: the old connection is gone
                self._drop_runner()
            conn.setblocking(True)
            self.runner = conn
            self.sel.register(conn, selectors.EVENT_READ, "runner")
        elif what == "runner":
            data = b""
            with contextlib.suppress(OSError):
                data = sock.recv(1 << 20)
            if not data:
                self._drop_runner()
                return
            for kind, index, payload in self.runner_reader.feed(data):
                if kind == DONE:
                    self.value = payload
                elif kind == INPUT and index not in self.inputs:
                    item = _Input(index, payload)
                    self.inputs[index] = item
                    self.queue.append(item)
        else:
            self._from_warm(what)

    def _from_warm(self, proc: _Warm) -> None:
        data = b""
        with contextlib.suppress(OSError):
            data = proc.conn.recv(1 << 20)
        if not data:
            self._crashed(proc)
            return
        for kind, index, payload in proc.reader.feed(data):
            proc.index = None
            item = self.inputs.get(index)
            if item is None:
                continue  # an input of a runner that went away
            if kind == ANSWER_ERROR and item.raised < self.retries:
                item.raised += 1
                self.queue.appendleft(item)
                continue
            del self.inputs[index]
            self.out += encode_frame(kind, index, payload)

    def _crashed(self, proc: _Warm) -> None:
        """A warm process died: its input is tried again (or answered), a new one takes over."""
        self.sel.unregister(proc.conn)
        proc.conn.close()
        self.procs.remove(proc)
        how = "it exited"
        with contextlib.suppress(ChildProcessError):
            _, status = os.waitpid(proc.pid, 0)
            if os.WIFSIGNALED(status):
                how = f"killed by signal {os.WTERMSIG(status)}"
            else:
                how = f"exit status {os.WEXITSTATUS(status)}"
        item = self.inputs.get(proc.index) if proc.index is not None else None
        if item is not None:
            item.crashed += 1
            if item.crashed >= MAP_CRASH_TRIES:
                del self.inputs[item.index]
                self.out += encode_frame(ANSWER_ERROR, item.index, lost_answer(item.index, how))
            else:
                self.queue.appendleft(item)
        print(f"[cumulus] a warm process died ({how}); starting another", file=sys.stderr)
        self._spawn()

    def _dispatch(self) -> None:
        for proc in self.procs:
            if proc.index is not None:
                continue
            while self.queue:
                item = self.queue.popleft()
                if self.inputs.get(item.index) is item:
                    break
            else:
                return
            proc.index = item.index
            # If it died, its EOF comes through the selector, and the input with it.
            with contextlib.suppress(OSError):
                proc.conn.sendall(encode_frame(INPUT, item.index, item.payload))

    def _flush(self) -> None:
        if self.out and self.runner is not None:
            try:
                self.runner.sendall(self.out)
            except OSError:
                self._drop_runner()
                return
        self.out.clear()

    def _drop_runner(self) -> None:
        """The runner went away: what it gave is given up (its queue gives it out again)."""
        if self.runner is not None:
            with contextlib.suppress(Exception):
                self.sel.unregister(self.runner)
            self.runner.close()
        self.runner = None
        self.runner_reader = FrameReader()
        self.inputs.clear()
        self.queue.clear()
        self.out.clear()
        self.lost_at = time.monotonic()

    def _stop(self) -> None:
        for proc in self.procs:
            proc.conn.close()
        deadline = time.monotonic() + 5.0
        for proc in self.procs:
            while time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(proc.pid, os.WNOHANG)[0]:
                        break
                    time.sleep(0.01)
                    continue
                break
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
        self.procs.clear()


def run_map(func: Callable[..., Any], manifest: dict[str, Any], job_dir: Path) -> Any:
    """Serve the map until the runner says it is over; the job's value (JSON from DONE)."""
    warm = max(1, min(int(manifest.get("warm", 1)), 64))
    retries = max(0, min(int(manifest.get("retries", 0)), 10))
    value = Host(func, warm, retries, job_dir / MAP_SOCKET).run()
    return json.loads(value) if value else None
