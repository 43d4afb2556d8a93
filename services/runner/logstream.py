"""A container's or Swarm service's multiplexed log stream, read as a job's `Output`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import re
import socket
import struct
import threading
import time
from typing import Any

import docker
import docker.utils.socket

from services.runner.backend import DROPPED, END, FRAME, MAX_FRAME
from services.runner.lines import MAX_LINE, LineSplitter, text

log = logging.getLogger(__name__)

QUIET_S = 0.5
"""After the job ended, a log stream silent this long is taken as complete (killed jobs)."""

_B64 = re.compile(rb"[A-Za-z0-9+/=]+")
STREAMS = {1: "stdout", 2: "stderr"}


Item = tuple[int, str, bytes] | tuple[int, None, None]


class LiveTail:
    """What a running container writes, straight from the engine (attach, not its log): each
    stream's bytes after its last newline, for partial lines (a progress bar). The engine's
    log driver holds a line back until its newline (or 16 KiB), so they cannot come from the
    log. Display only: the lines themselves, their order and cursor, come from the log."""

    def __init__(self, client: docker.DockerClient, container: str) -> None:
        self.client = client
        self.container = container
        self.rest = dict.fromkeys(STREAMS.values(), b"")
        self._sock: Any = None
        self._stop = threading.Event()
        threading.Thread(target=self._run, name=f"attach {container}", daemon=True).start()

    def _run(self) -> None:
        try:
            params = {"stdout": 1, "stderr": 1, "stream": 1, "logs": 0}
            self._sock = self.client.api.attach_socket(self.container, params=params)
            if self._stop.is_set():
                return
            for kind, data in docker.utils.socket.frames_iter(self._sock, tty=False):
                if self._stop.is_set():
                    break
                name = STREAMS.get(kind, "stdout")
                got = self.rest[name] + data
                self.rest[name] = got[got.rfind(b"\n") + 1 :][-MAX_LINE:]
        except Exception as exc:
            if not self._stop.is_set():
                fields = {"container": self.container, "error": repr(exc)}
                log.info("attach ended; no partial lines", extra={"fields": fields})
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        sock, self._sock = self._sock, None
        if sock is not None:
            raw = getattr(sock, "_sock", sock)  # a SocketIO around the socket, over plain HTTP
            with contextlib.suppress(Exception):
                raw.shutdown(socket.SHUT_RDWR)
            for each in (sock, raw):
                with contextlib.suppress(Exception):
                    each.close()


class LogStream:
    """A container's or service's multiplexed log stream, read by a thread, as an `Output`.

    The thread puts frames in a bounded queue (a job printing faster than the bus takes its
    lines waits on the engine, not in the runner's memory). Lines come out in order; the
    result frame is kept whole even where Swarm cut it into 16 KiB pieces (its continuation
    pieces are pure base64, rejoined), up to MAX_FRAME (a longer one is dropped). The output
    is complete when both streams carried the in-job runner's end marker. Otherwise, once the
    job has ended and the stream ended or stayed quiet for QUIET_S (a Swarm service's stream
    may stop early or never end), one more read of the whole log, without following, skipping
    the bytes already seen, collects the rest; its end is the end.
    """

    def __init__(
        self,
        client: docker.DockerClient,
        path: str,
        nonce: str,
        cursor: dict[str, int],
        max_queue: int = 256,
        attach: str = "",
    ) -> None:
        """`attach`: a container to attach to for partial lines (`LiveTail`; "": none)."""
        self.client = client
        self.path = path
        self.live = LiveTail(client, attach) if attach else None
        self.end = f"{END} {nonce}".encode() if nonce else b"\x00"
        start = {name: cursor.get(name, 0) for name in STREAMS.values()}
        self.split = {name: LineSplitter(at) for name, at in start.items()}
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
        self._oversize = False
        """The frame being rejoined outgrew MAX_FRAME: its pieces are dropped."""
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
                    lines.append((name, text(raw)))
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
            if _B64.fullmatch(raw):
                if len(body) + len(raw) > MAX_FRAME:
                    body.clear()
                    self._oversize = True
                if not self._oversize:
                    body += raw
                self._pending = (body, offset)
                return out
            out.append(("stdout", self._flush_pending()))
        if FRAME in raw:
            self._pending = (bytearray(raw), offset)
            return out
        out.append(("stdout", text(raw)))
        self._cursor["stdout"] = offset
        return out

    def _flush_pending(self) -> str:
        assert self._pending is not None
        body, offset = self._pending
        self._pending = None
        self._cursor["stdout"] = offset
        if self._oversize:
            self._oversize = False
            return DROPPED
        return text(bytes(body))

    def partial(self) -> dict[str, bytes]:
        """Each stream's unterminated rest (none on stdout while a result frame is rejoined)."""
        rest = self.live.rest if self.live is not None else {}
        return {
            name: b""
            if name == "stdout" and self._pending is not None
            else rest.get(name, split.pending())
            for name, split in self.split.items()
        }

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
        if self.live is not None:
            self.live.close()

    def _close_responses(self) -> None:
        for response in list(self._responses.values()):
            with contextlib.suppress(Exception):
                # Unblocks the reader thread: response.close() alone would wait for it (the
                # buffered reader's lock). Over TLS (https) docker-py hands the SSLSocket
                # itself, over plain HTTP a SocketIO around the socket.
                sock = self.client.api._get_raw_response_socket(response)
                getattr(sock, "_sock", sock).shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(Exception):
                response.close()
        self._responses.clear()
