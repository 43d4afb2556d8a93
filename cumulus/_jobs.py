"""Job handles: follow a job's events and logs, wait for its value, ask its status, cancel it.

A handle of a job this client submits follows it through the client's feed (`Feed`): ONE watch
per stream for the client, over every job of its user (`jobs.<user>.>`, `logs.<user>.>`), begun
before the client's first submit, so every event of a job submitted after it comes through it,
in stream order, with the same gap, heartbeat and resume checks as a job's own replay (below).
The feed hands each job's messages to its handle (a `Route`), which keeps them for every reader
of the handle. Per job that is no round trip and no consumer on the server. Where the route
cannot be trusted to hold the job's whole history (its first message is not the job's
`submitted`: the job id was submitted before; nothing came for FEED_WAIT_S; it overflowed
ROUTE_BYTES; the feed stopped), the handle goes on with the job's own replay from the gateway
from right after the last message it handed out, per stream; so does a handle for an existing
job (`client.get_job`), from the first.

A job's own replay: the handle has the gateway replay the job's history
(`jobs.<user>.<job>.>`) and its output (`logs.<user>.<job>.>`, a stream of its own) into the
client's private inbox, from the first event (services/gateway/watch.py: users get no
JetStream API of their own; the feed is such a replay too, of every job). It remembers, per
stream, the sequence of the last message it handed out, so after a lost connection, a gap or a
silent consumer it starts again right after it: nothing is lost, nothing is repeated, whatever
happened to the gateway or the connection meanwhile. The end of a job is handed out after the
output lines its worker reported (they may arrive later: another stream). A large result's
parts are replayed from the RESULTS stream when its completed event comes, joined in order into
a temporary file as they arrive and unpickled from it: the value is in memory once.

A value is unpickled only from a JobCompleted of the job's current placement, published under
the placed worker's own subject token, which NATS permissions let only that worker use.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar, cast

import cloudpickle
import msgspec
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from cumulus._transport import Transport
from shared import events as ev
from shared import subjects
from shared.errors import CumulusError, Internal, MalformedEvent
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


LOG_WAIT_S = 5.0
"""How long a job's end waits for output lines still on their way (they travel in a stream of
their own: the end says how many there are)."""
PART_WAIT_S = 10.0
"""How long a large result's reader waits for a part that does not come before it says the
result is no longer kept."""
FEED_WAIT_S = 10.0
"""How long a handle of a job submitted through the feed waits for the job's first event there
before it asks the gateway for the job's own replay instead."""
ROUTE_BYTES = 8 * 1024 * 1024
"""Bytes of one job's messages its route keeps; past them the route gives up and its readers
go on with the job's own replay (a job printing much output that nobody reads yet)."""
ROUTE_QUIET_S = 30.0
"""A route with nothing new this long hands its handle over to the job's own replay."""
QUEUED_QUIET_S = 300.0
"""The same bound while the job's newest event says it waits in the queue (`submitted`,
`queued`): a queue may rightly hold a job for minutes, and a burst of queued handles each
taking a replay of its own was what the feed is there to spare."""
WAITING = (f".{ev.JobSubmitted.name}", f".{ev.JobQueued.name}")


class WatchReply(msgspec.Struct, kw_only=True):
    last_seq: int = 0
    stream: str = subjects.JOBS_STREAM
    last_log_seq: int = 0


Cursor = dict[str, int]
"""Per stream, a stream sequence: the last message handed out, or where a replay ends."""


class _Restart(Exception):
    """The replay lost its place (a gap, or silence): start again after the last event."""


def deliver_to(inbox: str, stream: str) -> str:
    """Where a replay's consumer over `stream` pushes: a subject of its own under the replay's
    inbox. A replay of two streams (a job with its output, the feed) then tells whose heartbeat
    it hears: one consumer lost with a server (an R1 watch consumer lives on one) is silence,
    even while the other still beats."""
    return f"{inbox}.{stream}"


class _Inbox:
    """A replay's subscriptions, one per stream's deliver subject (the server pushes a
    consumer's messages to a subscriber of its exact deliver subject, not to a wildcard over
    it), read as one queue."""

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        self.inbox = nc.new_inbox()
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._subs: list[Any] = []

    async def open(self, streams: Sequence[str]) -> None:
        for stream in streams:
            self._subs.append(
                await self.nc.subscribe(deliver_to(self.inbox, stream), cb=self._queue.put)
            )

    async def next_msg(self, timeout: float) -> Msg:
        return await asyncio.wait_for(self._queue.get(), timeout)

    def caught_up(self) -> bool:
        """Nothing received is left unread."""
        return self._queue.empty() and all(s.pending_msgs == 0 for s in self._subs)

    async def close(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


async def replay(
    nc: NatsClient,
    start: Callable[[str, Cursor], Coroutine[Any, Any, Cursor]],
    streams: Sequence[str],
    *,
    follow: bool = True,
    ticks: bool = False,
    after: Cursor | None = None,
) -> AsyncGenerator[tuple[str, int, Msg] | None, None]:
    """(stream, stream sequence, message) of a replay the gateway pushes into a private inbox,
    from one stream or several (`streams`): `start(inbox, last)` asks for it from after `last`
    (per stream; at first `after`, or nothing: from the first), each stream's consumer
    delivering to `deliver_to(inbox, stream)`, and returns, per stream, the newest sequence
    when it began. Without `follow`, up to those. With `ticks`, None about every
    second while nothing arrives, for a reader with deadlines of its own. Resumes after a lost
    connection, a gap or a silent consumer for RESUME_WINDOW_S: nothing is lost, nothing is
    repeated."""
    last: Cursor = dict(after or {})
    ends: Cursor | None = None

    def done() -> bool:
        return ends is not None and all(last.get(s, 0) >= e for s, e in ends.items())

    resume_by = time.monotonic() + RESUME_WINDOW_S
    while not done():
        inbox = _Inbox(nc)
        try:
            await inbox.open(streams)
            began = await start(inbox.inbox, dict(last))
            if not follow and ends is None:
                ends = began
            async for item in _pushed(inbox, streams, last, done, ticks):
                if item is not None:
                    resume_by = time.monotonic() + RESUME_WINDOW_S
                yield item
        except nats.errors.ConnectionClosedError:
            raise
        except (nats.errors.Error, OSError, _Restart) as exc:
            if time.monotonic() > resume_by:
                raise CumulusError.from_code(
                    "UNAVAILABLE", f"lost the event stream: {exc}"
                ) from None
            await asyncio.sleep(0.25)
        finally:
            await inbox.close()


async def watch_messages(
    nc: NatsClient,
    stream: str,
    start: Callable[[str, int], Coroutine[Any, Any, WatchReply]],
    end: int | None,
    *,
    follow: bool = True,
) -> AsyncGenerator[tuple[int, Msg], None]:
    """(stream sequence, message) of a replay of one stream (see `replay`): `start(deliver,
    first_seq)` asks for it. Without `follow`, up to the newest message when it began; with
    `end`, up to that sequence."""

    async def begin(inbox: str, last: Cursor) -> Cursor:
        reply = await start(deliver_to(inbox, stream), max(last.values(), default=0) + 1)
        return {reply.stream: reply.last_seq if end is None else end}

    items = replay(nc, begin, [stream], follow=follow and end is None)
    async with contextlib.aclosing(items) as messages:
        async for item in messages:
            if item is not None:
                yield item[1], item[2]


async def _pushed(
    inbox: _Inbox,
    streams: Sequence[str],
    last: Cursor,
    done: Callable[[], bool],
    ticks: bool,
) -> AsyncGenerator[tuple[str, int, Msg] | None, None]:
    """The messages of a replay's consumers (one per stream in `streams`); _Restart on a gap,
    or when any one of them is silent (neither a message nor a heartbeat) for SILENT_S."""
    delivered: Cursor = {}  # per stream (one consumer each), the consumer sequence
    heard: dict[str, float] = dict.fromkeys(streams, time.monotonic())
    while not done():
        try:
            msg = await inbox.next_msg(timeout=1.0)
        except TimeoutError:
            if quiet := _silent(heard):  # a second with nothing at all: all was read
                raise _Restart(f"no heartbeat from the {quiet} consumer") from None
            if ticks:
                yield None
            continue
        meta = msg.metadata if (msg.reply or "").startswith("$JS.ACK.") else None
        # a status message comes on its consumer's deliver subject; a message, on its own
        stream = msg.subject.rsplit(".", 1)[-1] if meta is None else meta.stream
        heard[stream] = time.monotonic()
        if inbox.caught_up() and _silent(heard):
            # One consumer busy, the other silent? First read what the server sent up to
            # now (a round trip: a heartbeat still unread comes before its answer).
            await inbox.nc.flush(timeout=int(SILENT_S))
            if inbox.caught_up() and (quiet := _silent(heard)):
                raise _Restart(f"no heartbeat from the {quiet} consumer")
        if meta is None:
            await _control(inbox.nc, msg, stream, delivered)
            if ticks:
                yield None
            continue
        if meta.sequence.consumer != delivered.get(stream, 0) + 1:
            raise _Restart("gap")
        delivered[stream] = meta.sequence.consumer
        seq = meta.sequence.stream
        if seq <= last.get(stream, 0):
            continue
        last[stream] = seq
        yield stream, seq, msg


def _silent(heard: dict[str, float]) -> str:
    """A stream whose consumer has sent neither a message nor a heartbeat for SILENT_S (its
    server is gone, or it was removed: what it would have sent never comes); "" if none."""
    now = time.monotonic()
    return next((stream for stream, at in heard.items() if now - at > SILENT_S), "")


async def _control(nc: NatsClient, msg: Msg, stream: str, delivered: Cursor) -> None:
    """A status message of the replay's consumers. A flow-control request is answered (where
    the gateway asks for flow control, the server sends no more until then: a large result's
    parts come no faster than this client takes them), and so is a heartbeat saying the
    consumer stalled on a lost answer. A heartbeat also names the consumer's last delivered
    sequence: one dropped on the way (this client fell behind a burst) is a gap, even with
    nothing after it to show it."""
    headers = msg.headers or {}
    if msg.reply:
        await msg.respond(b"")
        return
    stalled = headers.get("Nats-Consumer-Stalled", "")
    if stalled:
        await nc.publish(stalled, b"")
    sent = headers.get("Nats-Last-Consumer", "")
    if sent.isdigit() and int(sent) > delivered.get(stream, 0):
        raise _Restart("gap before a heartbeat")


class Route:
    """The messages of one job that its client's feed delivered, in stream order: what the
    job's handle reads (every reader from the first). `lost` once it no longer holds all of
    them (too many bytes kept, or the feed stopped)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.items: list[tuple[str, int, Msg]] = []
        self.size = 0
        self.lost = False
        self._arrived = asyncio.Event()

    def add(self, stream: str, seq: int, msg: Msg) -> None:
        if self.lost:
            return
        self.size += len(msg.data)
        if self.size > ROUTE_BYTES:
            self.drop()
            return
        self.items.append((stream, seq, msg))
        self._wake()

    def drop(self) -> None:
        """Give up: the readers go on with the job's own replay."""
        self.lost, self.items = True, []
        self._wake()

    def _wake(self) -> None:
        self._arrived.set()
        self._arrived = asyncio.Event()


class Feed:
    """A client's one watch over every job of its user (`jobs.<user>.>`, `logs.<user>.>`),
    begun at its first submit from the newest message then (the gateway's `after_last`), and
    resumed from its last message after a lost connection, a gap or silence (`replay`). Each
    message goes to the route of its job, if this client has one; the others are dropped (the
    user's jobs submitted elsewhere)."""

    def __init__(self, client: Transport) -> None:
        self.client = client
        self.routes: dict[str, Route] = {}
        self._ready: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(), name="cumulus-feed")

    @classmethod
    async def route(cls, client: Transport, job_id: str) -> Route | None:
        """A route for `job_id`, which the client is about to submit (None: the client has no
        feed; the handle follows the job's own replay). Registered before the submit, so it
        gets every event of the job."""
        feed = client._feed
        if feed is None or feed._ready.done() and not feed._ready.result():
            feed = client._feed = cls(client)
        if not await asyncio.shield(feed._ready):
            return None
        return feed.routes.setdefault(job_id, Route(job_id))

    def forget(self, route: Route) -> None:
        """The route's handle is gone: its job's messages are dropped from now on."""
        if self.routes.get(route.job_id) is route:
            del self.routes[route.job_id]

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.wait([self._task], timeout=5.0)  # bounded: closing never hangs on it

    def _drop_routes(self) -> None:
        """A resume (a lost connection, a gap, silence, a stream electing a leader): what the
        feed held is not trusted to be whole; each handle it carried goes on with its job's
        own replay from its cursor."""
        for route in list(self.routes.values()):
            route.drop()
        self.routes.clear()

    async def _run(self) -> None:
        user = self.client.user
        filters = {subjects.JOBS_STREAM: f"jobs.{user}.>", subjects.LOGS_STREAM: f"logs.{user}.>"}
        began: Cursor = {}
        """Per stream, its newest message when the feed began: it resumes after it at least."""

        async def watch(inbox: str, stream: str, last: Cursor) -> int:
            body: dict[str, Any] = {"filter": filters[stream], "deliver": deliver_to(inbox, stream)}
            if stream in began:
                body["from_seq"] = max(last.get(stream, 0), began[stream]) + 1
            else:
                body["after_last"] = True
            reply = await self.client._call("watch", body, WatchReply)
            began.setdefault(stream, reply.last_seq)
            return reply.last_seq

        async def start(inbox: str, last: Cursor) -> Cursor:
            if self._ready.done():
                self._drop_routes()
            newest = await asyncio.gather(*(watch(inbox, stream, last) for stream in filters))
            if not self._ready.done():
                self._ready.set_result(True)
            return dict(zip(filters, newest, strict=True))

        try:
            feed = replay(self.client.nc, start, list(filters))
            async with contextlib.aclosing(feed) as items:
                async for item in items:
                    if item is None:
                        continue
                    stream, seq, msg = item
                    route = self.routes.get(_job_of(msg.subject))
                    if route is not None:
                        route.add(stream, seq, msg)
        except Exception as exc:  # the feed stops; handles go on with their jobs' own replay
            logging.getLogger("cumulus").debug("the job feed stopped: %r", exc)
        finally:
            if not self._ready.done():
                self._ready.set_result(False)
            for route in self.routes.values():
                route.drop()
            self.routes.clear()


def _job_of(subject: str) -> str:
    """The job id of a message under `jobs.<user>.<job>.…` or `logs.<user>.<job>.…`."""
    tokens = subject.split(".", 3)
    return tokens[2] if len(tokens) > 2 else ""


async def _routed(
    route: Route, last: Cursor, logs: bool
) -> AsyncGenerator[tuple[str, int, Msg] | None, None]:
    """(stream, stream sequence, message) of the job from its route (with `logs`, its output
    too, and None about every second while nothing comes, for the end's deadline), after
    `last` (per stream, updated as they go). Ends where the route cannot go on: the job's own
    replay goes on from `last`."""
    index, first, quiet = 0, True, ROUTE_QUIET_S
    since = time.monotonic()
    while not route.lost:
        arrived = route._arrived
        while index < len(route.items):
            stream, seq, msg = route.items[index]
            index += 1
            if stream == subjects.JOBS_STREAM and first:
                first = False
                if not msg.subject.endswith("." + ev.JobSubmitted.name):
                    return  # the job was submitted before: the route lacks its beginning
            if stream == subjects.JOBS_STREAM:
                quiet = QUEUED_QUIET_S if msg.subject.endswith(WAITING) else ROUTE_QUIET_S
            if stream == subjects.LOGS_STREAM and not logs or seq <= last.get(stream, 0):
                continue
            last[stream] = seq
            yield stream, seq, msg
        if not route.items and time.monotonic() - since > FEED_WAIT_S:
            return
        if route.items and not logs:
            # No deadline to keep, but a bound: a route quiet for ROUTE_QUIET_S (QUEUED_QUIET_S
            # while the job waits in the queue) hands over to the job's own replay (a long job
            # costs one consumer then; a burst of short ones none), so no fault of the feed can
            # leave a handle waiting for ever.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(arrived.wait(), quiet)
            if not arrived.is_set():
                return
            continue
        try:
            await asyncio.wait_for(arrived.wait(), 1.0)
        except TimeoutError:
            if logs:
                yield None


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


_REMOTE_CLASSES: dict[type[Exception], type[Internal] | None] = {}
"""Per exception class a job raised, the class its error is raised as here (None: none can
be made): made once, so that two failures of one type raise errors of one class."""


def remote_error_class(error_type: str) -> type[Internal] | None:
    """A subclass of both `Internal` (a job that raised) and the class a job raised
    (`module:QualName`, a JobFailed's `error_type`), so that `except ValueError` catches a
    remote ValueError. Only a class of a module this process has imported already (nothing is
    imported on a job's word); None where there is none, or it cannot be subclassed."""
    module_name, _, qualname = error_type.partition(":")
    found: Any = sys.modules.get(module_name) if qualname else None
    for part in qualname.split(".") if found is not None else []:
        found = getattr(found, part, None)
    if not (isinstance(found, type) and issubclass(found, Exception)):
        return None
    if issubclass(found, CumulusError):
        return None  # one of ours: its code says what it is
    if found not in _REMOTE_CLASSES:
        made: type[Internal] | None = None
        with contextlib.suppress(TypeError):  # a layout conflict, a final class
            made = cast(
                "type[Internal]",
                type(
                    f"Remote{found.__name__}",
                    (Internal, found),
                    {
                        "__module__": "cumulus",
                        "__doc__": f"A job raised {error_type}.",
                        "__str__": BaseException.__str__,  # the message (KeyError's quotes it)
                    },
                ),
            )
        _REMOTE_CLASSES[found] = made
    return _REMOTE_CLASSES[found]


def job_error(event: ev.Terminal) -> CumulusError:
    """The typed error a job's failed, timed-out or cancelled end stands for. A job whose code
    raised gives an `Internal` that is also an instance of the raised class where this process
    knows it (`remote_error_class`)."""
    if isinstance(event, ev.JobFailed):
        message = event.message
        if event.traceback:
            message = f"{event.message}\n\nRemote traceback:\n{event.traceback}"
        details = {
            "job_id": event.job_id,
            "remote_traceback": event.traceback,
            "worker_id": event.worker_id,  # kept by the errors that declare it (Unavailable)
            "permanent": event.permanent,  # kept by ResourceExhausted: never retried
        }
        cls = remote_error_class(event.error_type) if event.code == "INTERNAL" else None
        if cls is not None:
            with contextlib.suppress(Exception):  # its __init__ wants other arguments
                return cls(message, job_id=event.job_id, remote_traceback=event.traceback)
        return CumulusError.from_code(event.code, message, details)
    if isinstance(event, ev.JobTimedOut):
        return CumulusError.from_code(
            event.code, event.message, {"job_id": event.job_id, "duration_s": event.duration_s}
        )
    if isinstance(event, ev.JobCancelled):
        return CumulusError.from_code(event.code, event.message, {"job_id": event.job_id})
    return CumulusError.from_code("INTERNAL", f"job {event.job_id} ended as {event.status}")


def print_lines(event: ev.JobLog, logs: Logs) -> None:
    if logs is None or logs is False or event.partial:
        return  # a partial line's complete text comes in a later line
    for line in event.lines:
        out = logs if not isinstance(logs, bool) else None
        if out is None:
            out = sys.stderr if line.stream == "stderr" else sys.stdout
        print(line.text, file=out, flush=True)


class AsyncJob:
    """A submitted job (asyncio API). Get one from `submit()` or `client.get_job(job_id)`."""

    def __init__(
        self, client: Transport, job_id: str, packaging: str = "", route: Route | None = None
    ) -> None:
        self.client = client
        self.job_id = job_id
        self.packaging = packaging
        """How the code travelled, e.g. "cloudpickle (Python 3.11 …)"; empty if unknown."""
        self._route = route
        """The job's messages from the client's feed (`Feed.route`, for a job this client
        submitted); None: the job's own replay from the gateway."""
        feed = client._feed
        if route is not None and feed is not None:
            weakref.finalize(self, feed.forget, route)

    def __repr__(self) -> str:
        return f"AsyncJob({self.job_id!r})"

    async def events(
        self, *, follow: bool = True, until_terminal: bool = True
    ) -> AsyncGenerator[ev.AnyJobEvent, None]:
        """Every event of the job from its first, its output (`JobLog`) among them. With
        `follow`, live until the terminal event (or forever, if not `until_terminal`); without,
        only those published so far. The end comes after every output line its worker
        reported (waiting up to LOG_WAIT_S for lines still on their way)."""
        async with contextlib.aclosing(self._stream(follow, logs=True)) as stream:
            async for event in stream:
                yield event
                if until_terminal and isinstance(event, ev.Terminal):
                    return

    async def _stream(self, follow: bool, logs: bool) -> AsyncGenerator[ev.AnyJobEvent, None]:
        """The job's events (with `logs`, its output lines too, from the LOGS stream) from the
        first; see `replay` and `_Ordered`."""

        async def start(inbox: str, last: Cursor) -> Cursor:
            body: dict[str, Any] = {
                "job_id": self.job_id,
                "deliver": deliver_to(inbox, subjects.JOBS_STREAM),
                "from_seq": last.get(subjects.JOBS_STREAM, 0) + 1,
            }
            if logs:
                body.update(
                    logs=True,
                    log_deliver=deliver_to(inbox, subjects.LOGS_STREAM),
                    from_log_seq=last.get(subjects.LOGS_STREAM, 0) + 1,
                )
            reply = await self.client._call("watch", body, WatchReply)
            ends = {subjects.JOBS_STREAM: reply.last_seq}
            if logs:
                ends[subjects.LOGS_STREAM] = reply.last_log_seq
            return ends

        order = _Ordered(wait_for_lines=logs)
        last: Cursor = {}
        if follow and self._route is not None:
            async with contextlib.aclosing(_routed(self._route, last, logs)) as routed:
                async for item in routed:
                    event = None if item is None else order.believe(item[2])
                    for out in order.take(event, time.monotonic()):
                        yield out
            # the route cannot go on: the job's own replay goes on right after `last`
        streams = [subjects.JOBS_STREAM, subjects.LOGS_STREAM] if logs else [subjects.JOBS_STREAM]
        items = replay(self.client.nc, start, streams, follow=follow, ticks=logs, after=last)
        async with contextlib.aclosing(items) as messages:
            async for item in messages:
                event = None if item is None else order.believe(item[2])
                for out in order.take(event, time.monotonic()):
                    yield out
        for out in order.release():
            yield out

    async def _ended(self, logs: bool) -> AsyncGenerator[ev.AnyJobEvent, None]:
        """The job's events (with `logs`, its output too) until its end."""
        async with contextlib.aclosing(self._stream(True, logs=logs)) as stream:
            async for event in stream:
                yield event
                if isinstance(event, ev.Terminal):
                    return

    async def logs(self, follow: bool = False) -> AsyncGenerator[LogLine, None]:
        """The job's output lines from the first. With `follow`, live until the job ends;
        without, those written so far. Complete lines only: a progress bar's partial states
        (`JobLog.partial`, shown live by `cumulus run`) are skipped."""
        async with contextlib.aclosing(self.events(follow=follow)) as events:
            async for event in events:
                if isinstance(event, ev.JobLog) and not event.partial:
                    for line in event.lines:
                        yield line

    async def result(self, timeout: float | None = None, logs: Logs = None) -> Any:
        """The function's value, or the job's typed error raised. Prints the job's output as
        it comes if `logs` says where (every line before the value is returned). `timeout`
        bounds the wait (TimeoutError), not the job."""

        async def follow() -> Any:
            placed, attempt = "", 0
            # the output only where it is printed (the end waits for it): else no LOGS at all
            shown = logs is not None and logs is not False
            async with contextlib.aclosing(self._ended(shown)) as events:
                async for event in events:
                    if isinstance(event, ev.WorkerSelected):
                        placed, attempt = event.worker_id, event.attempt
                    elif isinstance(event, ev.JobLog):
                        print_lines(event, logs)
                    elif isinstance(event, ev.JobCompleted):
                        if not placed or placed != event.worker_id:
                            continue  # not from the job's placement: never unpickled
                        return await self._value(event, attempt)
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
            async with contextlib.aclosing(self._stream(True, logs=False)) as events:
                async for event in events:  # ends not from the placement are not among them
                    if isinstance(event, ev.Terminal):
                        return JobStatus(event.status)
            raise CumulusError.from_code("INTERNAL", f"job {self.job_id} ended without an outcome")

        return await asyncio.wait_for(follow(), timeout)

    async def value(self, completed: ev.JobCompleted) -> Any:
        """The value a JobCompleted event of this job carries (gathered from the job's result
        parts when it was too large to travel in the event). For code that follows
        `events()`."""
        attempt = 0
        if "parts" in msgspec.json.decode(completed.result):
            # the parts are the attempt's of the placement the completed event ended
            async with contextlib.aclosing(self._stream(False, logs=False)) as events:
                async for event in events:
                    if isinstance(event, ev.WorkerSelected):
                        attempt = event.attempt
                    elif event.event_id == completed.event_id:
                        break
        return await self._value(completed, attempt)

    async def _value(self, completed: ev.JobCompleted, attempt: int) -> Any:
        """The value of a JobCompleted; a large one is joined from its parts (published by the
        same worker under its own subject, in the RESULTS stream) and checked against the
        digest the event carries."""
        envelope = msgspec.json.decode(completed.result)
        if "parts" not in envelope:
            return decode_result(completed)
        count = int(envelope["parts"])
        with contextlib.closing(_Gathered(count)) as parts:
            await self._parts(completed, attempt, parts)
            if parts.size != envelope.get("size") or parts.sha256() != envelope.get("sha256"):
                raise CumulusError.from_code(
                    "INTERNAL",
                    f"the result of job {self.job_id} does not match the digest its worker "
                    "reported; it was not decoded",
                )
            parts.file.seek(0)
            if envelope.get("payload") == "pickle":  # the value's pickle (the result file's)
                return await asyncio.to_thread(cloudpickle.load, parts.file)
            return decode_result(parts.file.read())  # an envelope's JSON

    async def _parts(self, completed: ev.JobCompleted, attempt: int, parts: _Gathered) -> None:
        """Gather `attempt`'s result parts, replayed from the RESULTS stream (waiting for parts
        still on their way); NOT_FOUND once they are no longer kept."""
        count = parts.count
        worker = completed.worker_id
        subject = subjects.result(completed.user, self.job_id, worker, attempt)
        await gather_parts(self, subject, lambda msg: _part(msg, worker, attempt, count), parts)
        if parts.complete:
            return
        raise CumulusError.from_code(
            "NOT_FOUND",
            f"The result of job {self.job_id} is no longer kept ({parts.have} of {count} "
            "parts left): large results are kept for retention.results_ttl_s; run the job "
            "again",
            {"job_id": self.job_id},
        )

    async def status(self) -> JobInfo:
        """The gateway's view of the job: status, gpu, worker, devices, queue position and
        reason, times, error code and message. A handle made from a unique prefix of the
        id (`get_job("j3f9")`) takes the whole id from here on."""
        return self._named(await self.client._call("status", {"job_id": self.job_id}, JobInfo))

    async def cancel(self) -> JobInfo:
        """Ask for the job to be stopped (a no-op once it ended); returns its status."""
        return self._named(await self.client._call("cancel", {"job_id": self.job_id}, JobInfo))

    async def download(self, path: str | None = None, to: str | Path = ".") -> list[Path]:
        """Unpack the job's kept `outputs/` folder (or the file or folder `path` in it) under
        `to`; the files written. NOT_FOUND while the job runs, when it kept no outputs, or
        once they are no longer kept (retention.results_ttl_s)."""
        from cumulus._download import download

        return await download(self, path, to)

    def _named(self, info: JobInfo) -> JobInfo:
        """Keep the whole id the gateway resolved a prefix to."""
        if info.job_id != self.job_id and info.job_id.startswith(self.job_id):
            self.job_id = info.job_id
        return info


SPOOL_BYTES = 16 * 1024 * 1024
"""A large result's parts are gathered in memory up to this size, in a temporary file beyond."""


async def gather_parts(
    job: AsyncJob,
    subject: str,
    take: Callable[[Msg], ev.JobResultPart | ev.JobOutputsPart | None],
    into: _Gathered,
) -> None:
    """The parts on `subject` (RESULTS, replayed through the gateway's watch) added to `into`:
    each message `take` accepts, until `into` is complete or none came for PART_WAIT_S (parts
    still on their way are waited for; the caller checks `into.complete`)."""

    async def start(inbox: str, last: Cursor) -> Cursor:
        first = last.get(subjects.RESULTS_STREAM, 0) + 1
        deliver = deliver_to(inbox, subjects.RESULTS_STREAM)
        body = {"filter": subject, "deliver": deliver, "from_seq": first}
        reply = await job.client._call("watch", body, WatchReply)
        return {reply.stream: reply.last_seq}

    heard = time.monotonic()
    items = replay(job.client.nc, start, [subjects.RESULTS_STREAM], ticks=True)
    async with contextlib.aclosing(items) as messages:
        async for item in messages:
            part = None if item is None else take(item[2])
            if part is not None:
                into.add(part.index, part.data)
                heard = time.monotonic()
            if into.complete or time.monotonic() - heard > PART_WAIT_S:
                return


class _Gathered:
    """A large result's parts joined in order as they come, hashed as they go, into a
    temporary file (in memory while small): the client never holds the parts and the joined
    result at once, and unpickles from the file. A part that comes again is dropped."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.file = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115
        self.size = 0
        self._next = 0
        self._early: dict[int, bytes] = {}
        """Parts that came before one in front of them (out of order: rare)."""
        self._digest = hashlib.sha256()

    def add(self, index: int, data: bytes) -> None:
        if index < self._next or index in self._early:
            return
        self._early[index] = data
        while self._next in self._early:
            piece = self._early.pop(self._next)
            self.file.write(piece)
            self._digest.update(piece)
            self.size += len(piece)
            self._next += 1

    @property
    def have(self) -> int:
        return self._next + len(self._early)

    @property
    def complete(self) -> bool:
        return self._next >= self.count

    def sha256(self) -> str:
        return self._digest.hexdigest()

    def close(self) -> None:
        self.file.close()


_End = ev.JobCompleted | ev.JobFailed | ev.JobTimedOut | ev.JobCancelled


class _Ordered:
    """A job's events and output lines, from two streams, in the order they happened.

    An event whose fields disagree with its subject is dropped, and so is an end (completed,
    failed, …) from a worker other than the job's placement, and a decision stamped with an
    older scheduler epoch than one of the job's decisions already seen (the election marker
    itself is no user's to read). A worker's output lines come
    after its `started` (a replay may deliver them first: they are kept back until it came).
    With `wait_for_lines`, an end is held back until the output lines its worker reported
    (`log_lines`) came, or LOG_WAIT_S passed; events that come meanwhile follow the end."""

    def __init__(self, wait_for_lines: bool) -> None:
        self.wait_for_lines = wait_for_lines
        self.placed = ""
        self.started: set[str] = set()
        """Workers whose `started` was handed out: their lines go out as they come."""
        self.early: list[ev.JobLog] = []
        """Lines of a worker whose `started` has not come yet."""
        self.lines: dict[tuple[str, int], int] = {}
        """Per worker and attempt, the number of lines up to the newest of its `log` events
        (attempt 0: lines of an older runner, which did not say)."""
        self.held: _End | None = None
        self.until = 0.0
        self.after: list[ev.AnyJobEvent] = []
        self.epoch = 0
        """The newest scheduler epoch among this job's decisions: an older one's decision
        (a superseded scheduler's, published late) is not believed (shared/events.py)."""

    def believe(self, msg: Msg) -> ev.AnyJobEvent | None:
        try:
            event = ev.decode(msg.data)
        except MalformedEvent:
            return None
        if not isinstance(event, ev.JobEvent) or not _agrees(msg.subject, event):
            return None
        if ev.stale(event, self.epoch):
            return None
        self.epoch = ev.epoch_after(self.epoch, event)
        if isinstance(event, ev.WorkerSelected):
            self.placed = event.worker_id
        elif isinstance(event, ev.Terminal) and event.worker_id not in ("", self.placed):
            return None  # an end not from the job's placement is not believed
        return event

    def _complete(self, end: ev.Terminal) -> bool:
        if not self.wait_for_lines:
            return True
        have = self.lines.get((end.worker_id, end.attempt), 0)
        return (have or self.lines.get((end.worker_id, 0), 0)) >= end.log_lines

    def take(self, event: ev.AnyJobEvent | None, now: float) -> list[ev.AnyJobEvent]:
        """What to hand out now that `event` came (None: time passed)."""
        out: list[ev.AnyJobEvent] = []
        if isinstance(event, ev.JobLog):
            ended = event.seq + len(event.lines)
            key = (event.worker_id, event.attempt)
            self.lines[key] = max(self.lines.get(key, 0), ended)
            if event.worker_id in self.started:
                out.append(event)
            else:
                self.early.append(event)
        elif event is not None and self.held is not None:
            self.after.append(event)
        elif isinstance(event, ev.Terminal) and not self._complete(event):
            self.held, self.until = event, now + LOG_WAIT_S
        elif event is not None:
            out += self._next(event)
        if self.held is not None and (self._complete(self.held) or now >= self.until):
            out += self.release()
        return out

    def _next(self, event: ev.AnyJobEvent) -> list[ev.AnyJobEvent]:
        """`event`, with the lines kept back that go before or right after it."""
        if isinstance(event, ev.JobStarted):
            self.started.add(event.worker_id)
            return [event, *self._early(event.worker_id)]
        if isinstance(event, ev.Terminal):  # its worker's lines, even without a `started`
            return [*self._early(event.worker_id), event]
        return [event]

    def _early(self, worker: str) -> list[ev.AnyJobEvent]:
        mine = [e for e in self.early if e.worker_id == worker]
        self.early = [e for e in self.early if e.worker_id != worker]
        return list(mine)

    def release(self) -> list[ev.AnyJobEvent]:
        """Everything kept back: lines, the end held back, what came after it."""
        out: list[ev.AnyJobEvent] = list(self.early)
        if self.held is not None:
            out.append(self.held)
        out += self.after
        self.early, self.held, self.after = [], None, []
        return out


def _part(msg: Msg, worker: str, attempt: int, count: int) -> ev.JobResultPart | None:
    """A result part of `worker`'s `attempt` that says of itself what its subject says."""
    try:
        event = ev.decode(msg.data)
    except MalformedEvent:
        return None
    if not isinstance(event, ev.JobResultPart) or not _agrees(msg.subject, event):
        return None
    if (event.worker_id, event.attempt) != (worker, attempt) or not 0 <= event.index < count:
        return None
    if msg.subject.rsplit(".", 1)[-1] != str(attempt):
        return None
    return event


def _agrees(subject: str, event: ev.JobEvent) -> bool:
    """The event says of itself what its subject says (user, job, worker, kind)."""
    try:
        user, job_id, worker_id, name = subjects.parse_job_subject(subject)
    except ValueError:
        return False
    return (user, job_id, worker_id, name) == (
        event.user,
        event.job_id,
        event.worker_id,
        event.name,
    )


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
        info = self._runner.call(self._inner.status())
        self.job_id = self._inner.job_id
        return info

    def cancel(self) -> JobInfo:
        """Ask for the job to be stopped; returns its status (see AsyncJob.cancel)."""
        info = self._runner.call(self._inner.cancel())
        self.job_id = self._inner.job_id
        return info

    def download(self, path: str | None = None, to: str | Path = ".") -> list[Path]:
        """Unpack the job's kept `outputs/` folder under `to` (see AsyncJob.download)."""
        return self._runner.call(self._inner.download(path, to))
