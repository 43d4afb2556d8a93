"""The Python client: run a function on a share of a GPU and get its value back.

    client = CumulusClient("nats://127.0.0.1:4222")
    client.run(train, data, gpu=0.5, duration=600)       # blocks, prints the job's logs

The client uploads the code package to the object store (content addressed: the same code is
uploaded once), submits through the gateway, and follows the job's subjects with an ordered
consumer from the job's first event, so a reconnect resumes where it left off and no event is
lost or repeated.
"""

from __future__ import annotations

import asyncio
import base64
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, TextIO, TypeVar

import cloudpickle
import msgspec
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, DeliverPolicy

from sdk.packaging import code_ref, package_function
from shared import api, bus, subjects
from shared import events as ev
from shared.errors import CumulusError, DeadlineExceeded
from shared.gpu import GpuRequest

T = TypeVar("T")

RETRYABLE = ("RESOURCE_EXHAUSTED", "UNAVAILABLE")


class JobError(CumulusError):
    """The job itself failed; `remote_traceback` is the traceback from the job, if any."""


def _raise_for(event: ev.Terminal) -> None:
    if isinstance(event, ev.JobFailed):
        err = CumulusError.from_code(event.code, event.message)
        err.data["remote_traceback"] = event.traceback
        if event.traceback:
            err.message = f"{event.message}\n\nRemote traceback:\n{event.traceback}"
            err.args = (err.message,)
        raise err
    if isinstance(event, ev.JobTimedOut):
        raise DeadlineExceeded(event.message)
    if isinstance(event, ev.JobCancelled):
        raise CumulusError.from_code("CANCELLED", event.message)


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


class AsyncJob:
    """A submitted job: follow its events, wait for its result, cancel it."""

    def __init__(self, client: AsyncCumulusClient, job_id: str) -> None:
        self.client = client
        self.job_id = job_id

    def __repr__(self) -> str:
        return f"AsyncJob({self.job_id!r})"

    async def events(
        self, until_terminal: bool = True, idle_timeout: float | None = None
    ) -> AsyncIterator[ev.AnyJobEvent]:
        """Every event of the job from its first, live; ends after the terminal event."""
        js = self.client.nc.jetstream()
        sub = await js.subscribe(
            subjects.job_all(self.job_id, self.client.user),
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
        )
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=idle_timeout or 3600 * 24)
                except TimeoutError:
                    return
                try:
                    event = ev.decode(msg.data)
                except ev.MalformedEvent:
                    continue
                yield event  # type: ignore[misc]
                if until_terminal and isinstance(event, ev.Terminal):
                    return
        finally:
            await sub.unsubscribe()

    async def result(self, timeout: float | None = None, logs: TextIO | None = None) -> Any:
        """The function's value; raises the job's error. Prints log lines to `logs` if given."""

        async def follow() -> Any:
            async for event in self.events():
                if isinstance(event, ev.JobLog) and logs is not None:
                    for line in event.lines:
                        print(
                            line.text,
                            file=sys.stderr
                            if line.stream == "stderr" and logs is sys.stdout
                            else logs,
                        )
                elif isinstance(event, ev.JobCompleted):
                    return await self._value(event)
                elif isinstance(event, ev.Terminal):
                    _raise_for(event)
            raise CumulusError.from_code("INTERNAL", f"job {self.job_id} ended without an outcome")

        return await asyncio.wait_for(follow(), timeout)

    async def _value(self, event: ev.JobCompleted) -> Any:
        envelope = msgspec.json.decode(event.result)
        if "stored" not in envelope:
            return decode_result(event)
        bucket, _, name = envelope["stored"].partition("/")
        store = await self.client.nc.jetstream().object_store(bucket)
        stored = await store.get(name)
        return decode_result(bytes(stored.data or b""))

    async def status(self) -> dict[str, Any]:
        return await api.request(
            self.client.nc, "status", api.JobRef(job_id=self.job_id, user=self.client.user), dict
        )

    async def cancel(self) -> dict[str, Any]:
        return await api.request(
            self.client.nc, "cancel", api.JobRef(job_id=self.job_id, user=self.client.user), dict
        )


class AsyncCumulusClient:
    def __init__(
        self,
        nats_url: str = "nats://127.0.0.1:4222",
        user: str = "default",
        max_retries: int = 3,
        backoff_s: float = 1.0,
    ) -> None:
        self.nats_url = nats_url
        self.user = user
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._nc: Client | None = None

    @property
    def nc(self) -> Client:
        if self._nc is None:
            raise RuntimeError("client is not connected: use `async with` or await connect()")
        return self._nc

    async def connect(self) -> AsyncCumulusClient:
        if self._nc is None:
            self._nc = await bus.connect(self.nats_url, "cumulus-sdk")
        return self

    async def close(self) -> None:
        if self._nc is not None:
            await self._nc.drain()
            self._nc = None

    async def __aenter__(self) -> AsyncCumulusClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def upload(self, data: bytes) -> str:
        """Put a code package in the object store (once per content); returns its code_ref."""
        ref = code_ref(data)
        store = await self.nc.jetstream().object_store(subjects.CODE_BUCKET)
        try:
            info = await store.get_info(ref)
            if info.size == len(data):
                return ref
        except (nats.js.errors.ObjectNotFoundError, nats.js.errors.NotFoundError):
            pass
        await store.put(ref, data)
        return ref

    async def submit_package(
        self,
        package: bytes,
        *,
        gpu: float | str = 0.5,
        duration: int = 3600,
        requirements: Sequence[str] = (),
        entrypoint: str = "function",
        priority: int = 0,
        env: dict[str, str] | None = None,
        job_id: str = "",
    ) -> AsyncJob:
        GpuRequest.parse(gpu)  # fail fast, with the gateway's exact message
        ref = await self.upload(package)
        request = api.SubmitRequest(
            code_ref=ref,
            gpu=gpu,
            duration=duration,
            user=self.user,
            job_id=job_id or "j" + uuid.uuid4().hex[:20],
            entrypoint=entrypoint,
            requirements=list(requirements),
            priority=priority,
            env=dict(env or {}),
        )
        delay = self.backoff_s
        for attempt in range(self.max_retries):
            try:
                reply = await api.request(self.nc, "submit", request, api.SubmitReply)
                return AsyncJob(self, reply.job_id)
            except CumulusError as exc:
                if exc.code not in RETRYABLE or attempt == self.max_retries - 1:
                    raise
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    async def submit(
        self,
        func: Callable[..., Any],
        *args: Any,
        gpu: float | str = 0.5,
        duration: int = 3600,
        requirements: Sequence[str] = (),
        priority: int = 0,
        **kwargs: Any,
    ) -> AsyncJob:
        package = package_function(func, args, kwargs, requirements)
        return await self.submit_package(
            package, gpu=gpu, duration=duration, requirements=requirements, priority=priority
        )

    async def run(
        self,
        func: Callable[..., Any],
        *args: Any,
        gpu: float | str = 0.5,
        duration: int = 3600,
        requirements: Sequence[str] = (),
        logs: TextIO | None = sys.stdout,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        job = await self.submit(
            func, *args, gpu=gpu, duration=duration, requirements=requirements, **kwargs
        )
        return await job.result(timeout=timeout, logs=logs)


class _Loop:
    """A private event loop in a daemon thread, so the sync client works anywhere."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, daemon=True, name="cumulus-client"
        )
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


class Job:
    """A submitted job (blocking API)."""

    def __init__(self, inner: AsyncJob, loop: _Loop) -> None:
        self._inner = inner
        self._loop = loop
        self.job_id = inner.job_id

    def __repr__(self) -> str:
        return f"Job({self.job_id!r})"

    def result(self, timeout: float | None = None, logs: TextIO | None = None) -> Any:
        return self._loop.call(self._inner.result(timeout, logs))

    def status(self) -> dict[str, Any]:
        return self._loop.call(self._inner.status())

    def cancel(self) -> dict[str, Any]:
        return self._loop.call(self._inner.cancel())


class CumulusClient:
    """Blocking client; see AsyncCumulusClient for the asyncio one."""

    def __init__(
        self,
        nats_url: str = "nats://127.0.0.1:4222",
        user: str = "default",
        max_retries: int = 3,
        backoff_s: float = 1.0,
    ) -> None:
        self._loop = _Loop()
        self._async = AsyncCumulusClient(nats_url, user, max_retries, backoff_s)
        self._loop.call(self._async.connect())

    def close(self) -> None:
        self._loop.call(self._async.close())
        self._loop.close()

    def __enter__(self) -> CumulusClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(
        self,
        func: Callable[..., Any],
        *args: Any,
        gpu: float | str = 0.5,
        duration: int = 3600,
        requirements: Sequence[str] = (),
        priority: int = 0,
        **kwargs: Any,
    ) -> Job:
        inner = self._loop.call(
            self._async.submit(
                func,
                *args,
                gpu=gpu,
                duration=duration,
                requirements=requirements,
                priority=priority,
                **kwargs,
            )
        )
        return Job(inner, self._loop)

    def run(
        self,
        func: Callable[..., Any],
        *args: Any,
        gpu: float | str = 0.5,
        duration: int = 3600,
        requirements: Sequence[str] = (),
        logs: TextIO | None = sys.stdout,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run `func(*args, **kwargs)` on `gpu` of a GPU and return its value."""
        return self._loop.call(
            self._async.run(
                func,
                *args,
                gpu=gpu,
                duration=duration,
                requirements=requirements,
                logs=logs,
                timeout=timeout,
                **kwargs,
            )
        )
