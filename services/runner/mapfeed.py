"""The worker's side of a warm map: inputs from the bus to the job's warm processes, answers back.

A map job (`JobSpec.map`, docs/map.md) runs as one job process, the host of job_image/warm.py,
which listens on a Unix socket in the job's directory. While the job runs, `MapFeed` connects
to it, pulls the map's inputs from its work queue (the durable consumer `map-<job>` on MAPIN,
made by the gateway), hands every input of a chunk to the host and, once each input of the
chunk has its answer, publishes the chunk's answers (`results.<user>.<job>.<worker>.map`, with
a message id per chunk, so a chunk answered twice is stored once) and only then acknowledges
the chunk. So nothing is lost: an input whose answer was not stored is still in the queue, and
the queue gives it out again (to this runner after a restart, or to the runner of the next
attempt when this worker was lost) once its acknowledgement is overdue (ACK_WAIT_S; chunks in
hand are kept from that with progress notices).

The SDK publishes an end marker after the last chunk (header `Cumulus-End`: the number of
inputs). Holding it, with nothing of its own in hand, the feed asks the queue whether any
input is still out (with a runner gone); when none is, it acknowledges the marker and tells the
host the map is over: the host ends and the job completes, its value `{"inputs": n}`.

Chunks and answers travel as msgpack (`MapChunk`, `MapAnswers`): they carry pickles, not
events, and msgpack keeps them as bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from job_image import warm
from shared import bus, subjects
from shared import events as ev
from shared.telemetry import MAP_INPUTS

log = logging.getLogger(__name__)

ACK_WAIT_S = 10.0
"""How long an input chunk handed out may go without word before the queue gives it out
again (the gateway makes the consumer with it)."""
PROGRESS_S = 3.0
"""How often the feed tells the queue it still works on the chunks in hand."""
WINDOW = 64
"""Most chunks handed out and not yet acknowledged (the consumer's max_ack_pending)."""
CONNECT_S = 120.0
"""How long the feed waits for the host's socket (the job unpacks and loads first)."""
END_POLL_S = 0.5
END_HEADER = ev.MAP_END_HEADER
MapChunk = ev.MapChunk
MapAnswers = ev.MapAnswers


ANSWERS = msgspec.msgpack.Encoder()
CHUNKS = msgspec.msgpack.Decoder(MapChunk)


def socket_of(backend: Any, job_id: str, attempt: int) -> Path:
    """Where the map's job process listens, on this host, for any backend: in the directory
    the job sees as its own (the process backend's `job/`; a container's bind-mounted /job)."""
    if hasattr(backend, "job_dir"):  # the process backend
        path: Path = backend.job_dir(job_id, attempt) / "job" / warm.MAP_SOCKET
        return path
    return Path(backend.jobs.dirs.path(job_id, attempt)) / warm.MAP_SOCKET


async def _open_unix(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the Unix socket at `path`, however long the path: a socket address
    holds at most 107 bytes, so it is reached through a descriptor of its directory."""
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, f"/proc/self/fd/{folder}/{path.name}")
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(folder)
    return await asyncio.open_unix_connection(sock=sock)


@dataclass
class _Chunk:
    msg: Msg
    first: int
    left: set[int]
    answers: list[tuple[int, bool, bytes]] = field(default_factory=list)


class MapFeed:
    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        *,
        user: str,
        job_id: str,
        attempt: int,
        worker_id: str,
        inputs: int,
        socket_path: Path,
    ) -> None:
        self.nc, self.js = nc, js
        self.user, self.job_id, self.attempt = user, job_id, attempt
        self.worker_id = worker_id
        self.inputs = inputs
        self.socket_path = socket_path
        self._chunks: dict[int, _Chunk] = {}
        """By the stream sequence of their message."""
        self._of_index: dict[int, int] = {}
        """Input index -> the stream sequence of its chunk."""
        self._end: Msg | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._publishing: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self.answered = 0

    async def run(self) -> None:
        reader, writer = await self._connect()
        self._writer = writer
        puller = bus.Puller(
            self.nc, subjects.MAPIN_STREAM, subjects.map_consumer(self.job_id), batch=WINDOW
        )
        await puller.start()
        tasks = [
            asyncio.create_task(self._pull(puller)),
            asyncio.create_task(self._answers(reader)),
            asyncio.create_task(self._progress()),
            asyncio.create_task(self._finish()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # an error ends the feed (and is logged by the runner)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await puller.stop()
            if self._publishing:
                await asyncio.gather(*self._publishing, return_exceptions=True)
            writer.close()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        deadline = time.monotonic() + CONNECT_S
        while True:
            try:
                return await _open_unix(self.socket_path)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)

    async def _pull(self, puller: bus.Puller) -> None:
        while True:
            msgs = await puller.next_batch()
            out = bytearray()
            for msg in msgs:
                out += self._take(msg)
            if out:
                assert self._writer is not None
                self._writer.write(bytes(out))
                await self._writer.drain()

    def _take(self, msg: Msg) -> bytes:
        """Frames for the host from one queue message (nothing for a repeat or the end)."""
        seq = bus.stream_seq(msg)
        if seq in self._chunks:
            return b""  # given out again while in hand here
        if msg.headers and END_HEADER in msg.headers:
            self._end = msg
            self._changed.set()
            return b""
        try:
            chunk = CHUNKS.decode(msg.data)
        except msgspec.DecodeError as exc:
            log.warning(
                "map input chunk dropped: not a chunk",
                extra={"fields": {"job_id": self.job_id, "seq": seq, "error": str(exc)}},
            )
            self._ack_later(msg)
            return b""
        indexes = range(chunk.first, chunk.first + len(chunk.inputs))
        if chunk.first < 0 or (self.inputs and indexes.stop > self.inputs):
            log.warning(
                "map input chunk dropped: outside the map's inputs",
                extra={"fields": {"job_id": self.job_id, "first": chunk.first}},
            )
            self._ack_later(msg)
            return b""
        self._chunks[seq] = _Chunk(msg, chunk.first, set(indexes))
        frames = bytearray()
        for index, payload in zip(indexes, chunk.inputs, strict=True):
            self._of_index[index] = seq
            frames += warm.encode_frame(warm.INPUT, index, payload)
        return bytes(frames)

    def _ack_later(self, msg: Msg) -> None:
        self._track(msg.ack())

    def _track(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` in the background; the feed waits for it before it ends."""
        task = asyncio.create_task(coro)
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _answers(self, reader: asyncio.StreamReader) -> None:
        frames = warm.FrameReader()
        while True:
            data = await reader.read(1 << 20)
            if not data:
                raise ConnectionError("the map's job process closed its socket")
            for kind, index, payload in frames.feed(data):
                self._answer(index, kind == warm.ANSWER_OK, payload)

    def _answer(self, index: int, ok: bool, payload: bytes) -> None:
        seq = self._of_index.pop(index, None)
        chunk = self._chunks.get(seq) if seq is not None else None
        if chunk is None or index not in chunk.left:
            return
        chunk.left.discard(index)
        chunk.answers.append((index, ok, payload))
        MAP_INPUTS.labels("ok" if ok else "error").inc()
        if not chunk.left:
            self._track(self._store(seq, chunk))  # type: ignore[arg-type]

    async def _store(self, seq: int, chunk: _Chunk) -> None:
        """Publish a chunk's answers, then acknowledge the chunk; if either fails, the chunk
        stays unacknowledged and comes back (its answers are stored once, by message id)."""
        body = MapAnswers(first=chunk.first, answers=chunk.answers, attempt=self.attempt)
        subject = subjects.map_output(self.user, self.job_id, self.worker_id)
        headers = {"Nats-Msg-Id": f"{self.job_id}-answers-{chunk.first}"}
        try:
            await self.js.publish(subject, ANSWERS.encode(body), headers=headers, timeout=10)
            await chunk.msg.ack()
        except Exception as exc:
            log.warning(
                "map answers not stored; the queue gives their inputs out again",
                extra={"fields": {"job_id": self.job_id, "first": chunk.first, "error": str(exc)}},
            )
            self._chunks.pop(seq, None)
            self._changed.set()
            return
        self.answered += len(chunk.answers)
        self._chunks.pop(seq, None)
        self._changed.set()

    async def _finish(self) -> None:
        """Once the end marker is in hand and every chunk here is answered and stored: ask the
        queue whether any input is still out elsewhere (a lost runner's, due back). When none
        is, acknowledge the marker and tell the host the map is over; the feed ends."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), END_POLL_S)
            self._changed.clear()
            if self._end is None or self._chunks or self._publishing:
                continue
            info = await self.js.consumer_info(
                subjects.MAPIN_STREAM, subjects.map_consumer(self.job_id)
            )
            if self._chunks or info.num_pending or (info.num_ack_pending or 0) > 1:
                continue
            total = int((self._end.headers or {}).get(END_HEADER, "0") or 0)
            await self._end.ack_sync()
            assert self._writer is not None
            done = msgspec.json.encode({"inputs": total})
            self._writer.write(warm.encode_frame(warm.DONE, 0, done))
            await self._writer.drain()
            return

    async def _progress(self) -> None:
        """Keep the chunks in hand (and the end marker) from being given out again."""
        while True:
            await asyncio.sleep(PROGRESS_S)
            held = [chunk.msg for chunk in self._chunks.values()]
            if self._end is not None:
                held.append(self._end)
            for msg in held:
                with contextlib.suppress(Exception):
                    await msg.in_progress()
