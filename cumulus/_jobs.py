"""Job handles: follow a job's events and logs, wait for its value, ask its status, cancel it.

A handle reads the job's history straight from JetStream (`jobs.<user>.<job>.>`), from the
first event, with an ordered consumer. It remembers the stream sequence of the last event it
handed out, so after a lost connection it resumes right after it: nothing is lost, nothing is
repeated, whatever happened to the gateway or the connection meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import sys
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

import cloudpickle
import msgspec
import nats.errors
import nats.js.errors
from nats.js.api import ConsumerConfig, DeliverPolicy

from cumulus._transport import Transport
from shared import events as ev
from shared import subjects
from shared.errors import CumulusError, MalformedEvent, NotFound
from shared.views import JobInfo, JobStatus

if TYPE_CHECKING:
    from nats.js import JetStreamContext


T = TypeVar("T")

LogLine = ev.LogLine
"""One line of a job's output: `.stream` ("stdout" or "stderr") and `.text`."""

Logs = bool | TextIO | None
"""Where `run()` prints a job's output: True (this process's stdout and stderr), a text
stream (every line there), or False/None (nowhere)."""

RESUME_WINDOW_S = 300.0
"""How long a handle keeps trying to resubscribe after losing the connection."""


def decode_result(event: ev.JobCompleted | bytes) -> Any:
    """The function's return value from a JobCompleted envelope (or the envelope's bytes)."""
    envelope = msgspec.json.decode(event if isinstance(event, bytes) else event.result)
    if "stored" in envelope:
        raise ValueError("the result is in the object store: use AsyncJob.result()")
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
        """(stream sequence, event) from the first event; after a lost connection it
        resubscribes right after the last one handed out, for up to RESUME_WINDOW_S."""
        js = self.client._jetstream()
        subject = subjects.job_all(self.job_id, self.client.user)
        end = None if follow else await self._last_sequence(js, subject)
        last = 0
        resume_by = time.monotonic() + RESUME_WINDOW_S
        while end is None or last < end:
            try:
                sub = await js.subscribe(
                    subject, ordered_consumer=True, config=_from_sequence(last + 1)
                )
            except nats.errors.ConnectionClosedError:
                raise
            except (nats.errors.Error, OSError) as exc:
                if time.monotonic() > resume_by:
                    raise CumulusError.from_code(
                        "UNAVAILABLE", f"lost the event stream of job {self.job_id}: {exc}"
                    ) from None
                await asyncio.sleep(0.5)
                continue
            try:
                async with contextlib.aclosing(_read(sub, last, end)) as messages:
                    async for seq, event in messages:
                        last = seq
                        resume_by = time.monotonic() + RESUME_WINDOW_S
                        if event is not None:
                            yield seq, event
            except nats.errors.ConnectionClosedError:
                raise
            except (nats.errors.Error, OSError):
                if time.monotonic() > resume_by:
                    raise
                await asyncio.sleep(0.5)  # resubscribe right after the last event handed out
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _last_sequence(self, js: JetStreamContext, subject: str) -> int:
        """The stream sequence of the job's newest event (NOT_FOUND: the job has none)."""
        try:
            return (await js.get_last_msg(subjects.JOBS_STREAM, subject)).seq or 0
        except nats.js.errors.NotFoundError:
            raise NotFound(f"Job {self.job_id} not found") from None

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
            async with contextlib.aclosing(self.events()) as events:
                async for event in events:
                    if isinstance(event, ev.JobLog):
                        print_lines(event, logs)
                    elif isinstance(event, ev.JobCompleted):
                        return await self.value(event)
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
                async for event in events:
                    if isinstance(event, ev.Terminal):
                        return JobStatus(event.status)
            raise CumulusError.from_code("INTERNAL", f"job {self.job_id} ended without an outcome")

        return await asyncio.wait_for(follow(), timeout)

    async def value(self, completed: ev.JobCompleted) -> Any:
        """The value a JobCompleted event of this job carries (fetched from the object store
        when it was too large to travel in the event). For code that follows `events()`."""
        envelope = msgspec.json.decode(completed.result)
        if "stored" not in envelope:
            return decode_result(completed)
        bucket, _, name = envelope["stored"].partition("/")
        store = await self.client._jetstream().object_store(bucket)
        stored = await store.get(name)
        return decode_result(bytes(stored.data or b""))

    async def status(self) -> JobInfo:
        """The gateway's view of the job: status, gpu, worker, devices, queue position and
        reason, times, error code and message."""
        return await self.client._call("status", {"job_id": self.job_id}, JobInfo)

    async def cancel(self) -> JobInfo:
        """Ask for the job to be stopped (a no-op once it ended); returns its status."""
        return await self.client._call("cancel", {"job_id": self.job_id}, JobInfo)


def _from_sequence(first: int) -> ConsumerConfig:
    """Deliver from stream sequence `first` (1: from the beginning)."""
    if first <= 1:
        return ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    return ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=first)


async def _read(
    sub: Any, last: int, end: int | None
) -> AsyncGenerator[tuple[int, ev.AnyJobEvent | None], None]:
    """(sequence, event) after `last` until `end` (forever if None); a message that is not
    an event comes as (sequence, None), so the caller still moves past it."""
    while end is None or last < end:
        try:
            msg = await sub.next_msg(timeout=1.0)
        except nats.errors.TimeoutError:
            continue
        seq = msg.metadata.sequence.stream
        if seq <= last:
            continue  # a redelivery after a consumer reset: already handed out
        last = seq
        try:
            event = ev.decode(msg.data)
        except MalformedEvent:
            yield seq, None
            continue
        yield seq, event  # type: ignore[misc]


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
