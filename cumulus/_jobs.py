"""Job handles: follow a job's events and logs, wait for its value, ask its status, cancel it.

A handle has the gateway replay the job's history (`jobs.<user>.<job>.>`) into the client's
private inbox, from the first event (services/gateway/watch.py: users get no JetStream API of
their own). It remembers the stream sequence of the last event it handed out, so after a lost
connection, a gap or a silent consumer it starts again right after it: nothing is lost, nothing
is repeated, whatever happened to the gateway or the connection meanwhile.

A value is unpickled only from a JobCompleted of the job's current placement, published under
the placed worker's own subject token, which NATS permissions let only that worker use.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import sys
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, TextIO, TypeVar

import cloudpickle
import msgspec
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from cumulus._transport import Transport
from shared import events as ev
from shared import subjects
from shared.errors import CumulusError, MalformedEvent
from shared.views import JobInfo, JobStatus

T = TypeVar("T")

LogLine = ev.LogLine
"""One line of a job's output: `.stream` ("stdout" or "stderr") and `.text`."""

Logs = bool | TextIO | None
"""Where `run()` prints a job's output: True (this process's stdout and stderr), a text
stream (every line there), or False/None (nowhere)."""

RESUME_WINDOW_S = 300.0
"""How long a handle keeps trying to resubscribe after losing the connection."""
SILENT_S = 7.0
"""A replay that sends neither an event nor a heartbeat (every 2 s) this long is started again."""


class WatchReply(msgspec.Struct, kw_only=True):
    last_seq: int = 0


class _Restart(Exception):
    """The replay lost its place (a gap, or silence): start again after the last event."""


async def watch_messages(
    nc: NatsClient,
    start: Callable[[str, int], Coroutine[Any, Any, WatchReply]],
    end: int | None,
    *,
    follow: bool = True,
) -> AsyncGenerator[tuple[int, Msg], None]:
    """(stream sequence, message) of a replay the gateway pushes into a private inbox:
    `start(inbox, first_seq)` asks for it. Without `follow`, up to the newest message when it
    began. Resumes after a lost connection, a gap or a silent consumer for RESUME_WINDOW_S."""
    last = 0
    resume_by = time.monotonic() + RESUME_WINDOW_S
    while end is None or last < end:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        try:
            reply = await start(inbox, last + 1)
            if not follow and end is None:
                end = reply.last_seq
            async for seq, msg in _pushed(sub, last, end):
                last = seq
                resume_by = time.monotonic() + RESUME_WINDOW_S
                yield seq, msg
        except nats.errors.ConnectionClosedError:
            raise
        except (nats.errors.Error, OSError, _Restart) as exc:
            if time.monotonic() > resume_by:
                raise CumulusError.from_code(
                    "UNAVAILABLE", f"lost the event stream: {exc}"
                ) from None
            await asyncio.sleep(0.25)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


async def _pushed(sub: Any, last: int, end: int | None) -> AsyncGenerator[tuple[int, Msg], None]:
    delivered = 0
    heard = time.monotonic()
    while end is None or last < end:
        try:
            msg = await sub.next_msg(timeout=1.0)
        except nats.errors.TimeoutError:
            if time.monotonic() - heard > SILENT_S:
                raise _Restart("no heartbeat") from None
            continue
        heard = time.monotonic()
        if not (msg.reply or "").startswith("$JS.ACK."):
            continue  # an idle heartbeat
        meta = msg.metadata
        if meta.sequence.consumer != delivered + 1:
            raise _Restart("gap")
        delivered = meta.sequence.consumer
        seq = meta.sequence.stream
        if seq <= last:
            continue
        last = seq
        yield seq, msg


def decode_result(event: ev.JobCompleted | bytes) -> Any:
    """The function's return value from a JobCompleted envelope (or the envelope's bytes)."""
    envelope = msgspec.json.decode(event if isinstance(event, bytes) else event.result)
    if "parts" in envelope:
        raise ValueError("the result came in parts: use AsyncJob.result() or AsyncJob.value()")
    if "stored" in envelope:
        raise ValueError("the result was stored by an older Cumulus and cannot be read")
    if "pickle" in envelope:
        try:
            return cloudpickle.loads(base64.b64decode(envelope["pickle"]))
        except Exception:
            if envelope.get("encoding") == "json":
                return envelope.get("data")
            raise
    return envelope.get("data")


def job_error(event: ev.Terminal) -> CumulusError:
    """The typed error a job's failed, timed-out or cancelled end stands for."""
    if isinstance(event, ev.JobFailed):
        message = event.message
        if event.traceback:
            message = f"{event.message}\n\nRemote traceback:\n{event.traceback}"
        details = {
            "job_id": event.job_id,
            "remote_traceback": event.traceback,
            "worker_id": event.worker_id,  # kept by the errors that declare it (Unavailable)
        }
        return CumulusError.from_code(event.code, message, details)
    if isinstance(event, ev.JobTimedOut):
        return CumulusError.from_code(
            event.code, event.message, {"job_id": event.job_id, "duration_s": event.duration_s}
        )
    if isinstance(event, ev.JobCancelled):
        return CumulusError.from_code(event.code, event.message, {"job_id": event.job_id})
    return CumulusError.from_code("INTERNAL", f"job {event.job_id} ended as {event.status}")


def print_lines(event: ev.JobLog, logs: Logs) -> None:
    if logs is None or logs is False:
        return
    for line in event.lines:
        out = logs if not isinstance(logs, bool) else None
        if out is None:
            out = sys.stderr if line.stream == "stderr" else sys.stdout
        print(line.text, file=out, flush=True)


class AsyncJob:
    """A submitted job (asyncio API). Get one from `submit()` or `client.get_job(job_id)`."""

    def __init__(self, client: Transport, job_id: str, packaging: str = "") -> None:
        self.client = client
        self.job_id = job_id
        self.packaging = packaging
        """How the code travelled, e.g. "cloudpickle (Python 3.11 …)"; empty if unknown."""

    def __repr__(self) -> str:
        return f"AsyncJob({self.job_id!r})"

    async def events(
        self, *, follow: bool = True, until_terminal: bool = True
    ) -> AsyncGenerator[ev.AnyJobEvent, None]:
        """Every event of the job from its first. With `follow`, live until the terminal event
        (or forever, if not `until_terminal`); without, only those published so far."""
        async with contextlib.aclosing(self._stream(follow)) as stream:
            async for _, event in stream:
                yield event
                if until_terminal and isinstance(event, ev.Terminal):
                    return

    async def _stream(self, follow: bool) -> AsyncGenerator[tuple[int, ev.AnyJobEvent], None]:
        """(stream sequence, event) from the first; see `watch_messages`. An event whose
        fields disagree with its subject is skipped, and so is an end (completed, failed, …)
        from a worker other than the job's placement."""

        async def start(deliver: str, first: int) -> WatchReply:
            body = {"job_id": self.job_id, "deliver": deliver, "from_seq": first}
            return await self.client._call("watch", body, WatchReply)

        nc = self.client.nc
        placed = ""
        replay = watch_messages(nc, start, None, follow=follow)
        async with contextlib.aclosing(replay) as messages:
            async for seq, msg in messages:
                try:
                    event = ev.decode(msg.data)
                except MalformedEvent:
                    continue
                if not isinstance(event, ev.JobEvent) or not _agrees(msg.subject, event):
                    continue
                if isinstance(event, ev.WorkerSelected):
                    placed = event.worker_id
                elif isinstance(event, ev.Terminal) and event.worker_id not in ("", placed):
                    continue  # an end not from the job's placement is not believed
                yield seq, event

    async def logs(self, follow: bool = False) -> AsyncGenerator[LogLine, None]:
        """The job's output lines from the first. With `follow`, live until the job ends;
        without, those written so far."""
        async with contextlib.aclosing(self.events(follow=follow)) as events:
            async for event in events:
                if isinstance(event, ev.JobLog):
                    for line in event.lines:
                        yield line

    async def result(self, timeout: float | None = None, logs: Logs = None) -> Any:
        """The function's value, or the job's typed error raised. Prints the job's output as
        it comes if `logs` says where. `timeout` bounds the wait (TimeoutError), not the job."""

        async def follow() -> Any:
            placed: str | None = None
            parts: dict[int, bytes] = {}
            async with contextlib.aclosing(self.events()) as events:
                async for event in events:
                    if isinstance(event, ev.WorkerSelected):
                        placed, parts = event.worker_id, {}
                    elif isinstance(event, ev.JobLog):
                        print_lines(event, logs)
                    elif isinstance(event, ev.JobResultPart) and event.worker_id == placed:
                        parts[event.index] = event.data
                    elif isinstance(event, ev.JobCompleted):
                        if placed is None or placed != event.worker_id:
                            continue  # not from the job's placement: never unpickled
                        return _value(self.job_id, event, parts)
                    elif isinstance(event, ev.Terminal):
                        raise job_error(event)
            raise CumulusError.from_code("INTERNAL", f"job {self.job_id} ended without an outcome")

        try:
            return await asyncio.wait_for(follow(), timeout)
        except TimeoutError:
            raise TimeoutError(
                f"job {self.job_id} did not finish within {timeout} s; it keeps running: "
                "wait again with result(), or cancel()"
            ) from None

    async def wait(self, timeout: float | None = None) -> JobStatus:
        """Until the job ends; its final status (COMPLETED, FAILED, TIMED_OUT, CANCELLED)."""

        async def follow() -> JobStatus:
            async with contextlib.aclosing(self.events()) as events:
                async for event in events:  # ends not from the placement are not among them
                    if isinstance(event, ev.Terminal):
                        return JobStatus(event.status)
            raise CumulusError.from_code("INTERNAL", f"job {self.job_id} ended without an outcome")

        return await asyncio.wait_for(follow(), timeout)

    async def value(self, completed: ev.JobCompleted) -> Any:
        """The value a JobCompleted event of this job carries (gathered from the job's result
        parts when it was too large to travel in the event). For code that follows
        `events()`."""
        parts: dict[int, bytes] = {}
        if "parts" in msgspec.json.decode(completed.result):
            async with contextlib.aclosing(self.events(follow=False)) as events:
                async for event in events:
                    if isinstance(event, ev.WorkerSelected):
                        parts = {}
                    elif (
                        isinstance(event, ev.JobResultPart)
                        and event.worker_id == completed.worker_id
                    ):
                        parts[event.index] = event.data
        return _value(self.job_id, completed, parts)

    async def status(self) -> JobInfo:
        """The gateway's view of the job: status, gpu, worker, devices, queue position and
        reason, times, error code and message."""
        return await self.client._call("status", {"job_id": self.job_id}, JobInfo)

    async def cancel(self) -> JobInfo:
        """Ask for the job to be stopped (a no-op once it ended); returns its status."""
        return await self.client._call("cancel", {"job_id": self.job_id}, JobInfo)


def _value(job_id: str, completed: ev.JobCompleted, parts: dict[int, bytes]) -> Any:
    """The value of a JobCompleted; a large one is joined from its parts (published by the
    same worker under its own subject) and checked against the digest the event carries."""
    envelope = msgspec.json.decode(completed.result)
    if "parts" not in envelope:
        return decode_result(completed)
    data = b"".join(parts.get(i, b"") for i in range(int(envelope["parts"])))
    if len(data) != envelope.get("size") or hashlib.sha256(data).hexdigest() != envelope.get(
        "sha256"
    ):
        raise CumulusError.from_code(
            "INTERNAL",
            f"the result of job {job_id} does not match the digest its worker reported; "
            "it was not decoded",
        )
    return decode_result(data)


def _agrees(subject: str, event: ev.JobEvent) -> bool:
    """The event says of itself what its subject says (user, job, worker)."""
    try:
        user, job_id, worker_id, _ = subjects.parse_job_subject(subject)
    except ValueError:
        return False
    return (user, job_id, worker_id) == (event.user, event.job_id, event.worker_id)


class Runner:
    """A private event loop in a daemon thread, so the blocking API works anywhere."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, daemon=True, name="cumulus-client"
        )
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        async def step() -> T:
            return await agen.__anext__()

        try:
            while True:
                try:
                    yield self.call(step())
                except StopAsyncIteration:
                    return
        finally:
            aclose: Callable[[], Coroutine[Any, Any, None]] | None = getattr(agen, "aclose", None)
            if aclose is not None and not self.loop.is_closed():
                with contextlib.suppress(Exception):
                    self.call(aclose(), timeout=5)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


class Job:
    """A submitted job (blocking API); the same methods as AsyncJob."""

    def __init__(self, inner: AsyncJob, runner: Runner) -> None:
        self._inner = inner
        self._runner = runner
        self.job_id = inner.job_id
        self.packaging = inner.packaging

    def __repr__(self) -> str:
        return f"Job({self.job_id!r})"

    def events(
        self, *, follow: bool = True, until_terminal: bool = True
    ) -> Iterator[ev.AnyJobEvent]:
        """Every event of the job from its first (see AsyncJob.events)."""
        inner = self._inner.events(follow=follow, until_terminal=until_terminal)
        return self._runner.iterate(inner)

    def logs(self, follow: bool = False) -> Iterator[LogLine]:
        """The job's output lines (see AsyncJob.logs)."""
        return self._runner.iterate(self._inner.logs(follow=follow))

    def result(self, timeout: float | None = None, logs: Logs = None) -> Any:
        """The function's value, or the job's typed error raised (see AsyncJob.result)."""
        return self._runner.call(self._inner.result(timeout, logs))

    def wait(self, timeout: float | None = None) -> JobStatus:
        """Until the job ends; its final status (see AsyncJob.wait)."""
        return self._runner.call(self._inner.wait(timeout))

    def value(self, completed: ev.JobCompleted) -> Any:
        """The value a JobCompleted event of this job carries (see AsyncJob.value)."""
        return self._runner.call(self._inner.value(completed))

    def status(self) -> JobInfo:
        """The gateway's view of the job (see AsyncJob.status)."""
        return self._runner.call(self._inner.status())

    def cancel(self) -> JobInfo:
        """Ask for the job to be stopped; returns its status (see AsyncJob.cancel)."""
        return self._runner.call(self._inner.cancel())
