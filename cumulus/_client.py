"""The Python client: run a function or a script on a share of a GPU.

    client = cumulus.Client()                        # the `default` profile `cumulus up` wrote
    client.run(train, data, gpu=0.5, duration=600)   # blocks, prints the job's logs, returns
    job = client.submit(train, data, gpu=0.5)        # a handle: status, logs, events, result
    client.map(score, [1, 2, 3], gpu=0.1)            # many jobs, results in input order

The client connects as the identity its profile holds (cumulus/_profiles.py), uploads the code
package through the gateway (content addressed: the same code is uploaded once), submits with a
job id it chose (so a retried submit is never a second job), and follows the job's events from
its first, which the gateway replays into the client's private inbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, Unpack

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient

from cumulus import _profiles
from cumulus._jobs import AsyncJob, Feed, Job, Logs, Runner, WatchReply, watch_messages
from cumulus._map import run_map
from cumulus._options import JobOptionArgs, JobOptions, MapOptionArgs, Packaging
from cumulus._packaging import (
    choose_packaging,
    code_ref,
    package_function,
    package_script,
    script_entry,
)
from cumulus._retry import RetryPolicy
from shared import api, auth, labels, subjects, tracing
from shared import events as ev
from shared.errors import CumulusError, InvalidArgument, PermissionDenied, Unauthenticated
from shared.views import HealthInfo, JobInfo, WorkerInfo, WorkerList

UPLOAD_CHUNK = 256 * 1024
"""Bytes of a package sent in one upload request (the gateway's limit)."""
MAX_WORKER_PAGES = 1000
"""Pages of the `workers` operation read at most (each as large as a reply carries)."""
UPLOADED_S = 600.0
"""How long a package this client uploaded is taken to be still stored (packages are kept
retention.code_ttl_s, 30 days by default): its next submits skip the upload."""
UPLOAD_RESTARTS = 3
"""Times an upload starts again from its first chunk when the gateway replica holding the
first chunks is gone."""
UPLOAD_WINDOW = 8
"""Chunks of one upload sent before the first of them is answered: the gateway takes them in
the order sent (services/gateway/objects.py), so a large package streams instead of waiting
a round trip per chunk."""
UPLOAD_TIMEOUT_S = 5.0
"""How long a chunk's answer is waited for (the last one's longer: STORE_RATE)."""
STORE_RATE = 16 * 1024 * 1024
"""Bytes per second the gateway is given to check and store a whole package after its last
chunk (the answer to that chunk waits for it)."""
DEFAULT_URL = "nats://127.0.0.1:4222"

CONNECT_TIMEOUT_S = 5.0
"""How long connect() tries before it gives up with UNAVAILABLE."""

log = logging.getLogger("cumulus")

T = TypeVar("T")

Gpu = float | str | None
"""A GPU amount in the keyword form; None: JobOptions' default (0.5)."""


def default_url() -> str:
    return os.environ.get("CUMULUS_NATS_URL") or DEFAULT_URL


class AsyncClient:
    """The asyncio client. Use it as `async with cumulus.AsyncClient() as client:`.

    `retry` says how calls the cluster cannot take now (RESOURCE_EXHAUSTED, UNAVAILABLE) are
    retried; `packaging` how functions travel ("auto": cloudpickle where the workers run this
    Python, source otherwise). A job's options (`gpu`, `duration`, …) are keyword arguments of
    each call, or one `JobOptions`; left out, they are JobOptions' defaults.
    """

    def __init__(
        self,
        nats_url: str | None = None,
        user: str | None = None,
        *,
        profile: str | None = None,
        retry: RetryPolicy | None = None,
        packaging: Packaging = "auto",
    ) -> None:
        creds, explicit = _profiles.resolve(profile)
        named = _profiles.named(profile)  # a profile of ~/.config/cumulus/config.toml
        self.profile = profile
        """The profile asked for (None: $CUMULUS_PROFILE or `default`)."""
        self.credentials = creds
        """The identity this client connects as (None: none, on an open bus)."""
        from_profile = creds.url if creds is not None else ""
        from_profile = from_profile or (named.url if named is not None else "")
        user = user or (named.user if named is not None else None) or None
        self.nats_url = (
            nats_url
            or (explicit and from_profile)
            or os.environ.get("CUMULUS_NATS_URL")
            or from_profile
            or DEFAULT_URL
        )
        self.user = _user(creds, user)
        self.retry = retry or RetryPolicy()
        self.packaging: Packaging = packaging
        self._upload_retry = dataclasses.replace(self.retry, retry_on=frozenset({"UNAVAILABLE"}))
        self._nc: NatsClient | None = None
        self._worker_pythons: list[str] | None = None
        self._feed: Feed | None = None
        """Every job event of this user, for the handles of jobs submitted here (_jobs.Feed)."""
        self._uploaded: dict[str, float] = {}
        """code_ref -> when this client last saw the gateway store it."""

    def __repr__(self) -> str:
        return f"AsyncClient({self.nats_url!r}, user={self.user!r})"

    @property
    def nc(self) -> NatsClient:
        """The NATS connection underneath, for tools that speak NATS themselves."""
        if self._nc is None:
            raise RuntimeError("client is not connected: use `async with` or await connect()")
        return self._nc

    async def connect(self) -> AsyncClient:
        if self._nc is None:
            nc = NatsClient()
            options = auth.connect_options(self.credentials) or {
                "inbox_prefix": auth.inbox_prefix("user", self.user)
            }
            try:
                await asyncio.wait_for(
                    nc.connect(
                        servers=self.nats_url.split(","),
                        name="cumulus-sdk",
                        connect_timeout=2,
                        max_reconnect_attempts=-1,  # a job outlives a network blip or a restart
                        reconnect_time_wait=0.25,  # type: ignore[arg-type]  # int in the stubs only
                        error_cb=_quiet,
                        disconnected_cb=_note("disconnected from NATS; reconnecting"),
                        reconnected_cb=_note("reconnected to NATS"),
                        **options,
                    ),
                    CONNECT_TIMEOUT_S,
                )
            except nats.errors.Error as exc:
                with contextlib.suppress(Exception):
                    await nc.close()
                if "authorization" in str(exc).lower() or "authentication" in str(exc).lower():
                    raise Unauthenticated(
                        f"Cumulus at {self.nats_url} refused "
                        + (
                            f"the credentials of {self.user!r}"
                            if self.credentials
                            else "a connection without credentials"
                        )
                        + ": use your profile (`cumulus up` writes `default`; an operator "
                        "gives one with `cumulus users add NAME`)"
                    ) from None
                raise CumulusError.from_code(
                    "UNAVAILABLE",
                    f"cannot reach Cumulus at {self.nats_url} ({str(exc) or 'no answer'}); "
                    "is it running (`cumulus up`), and is $CUMULUS_NATS_URL right?",
                ) from None
            except (OSError, TimeoutError) as exc:
                with contextlib.suppress(Exception):
                    await nc.close()
                raise CumulusError.from_code(
                    "UNAVAILABLE",
                    f"cannot reach Cumulus at {self.nats_url} ({str(exc) or 'no answer'}); "
                    "is it running (`cumulus up`), and is $CUMULUS_NATS_URL right?",
                ) from None
            self._nc = nc
        return self

    async def close(self) -> None:
        if self._feed is not None:
            feed, self._feed = self._feed, None
            await feed.close()
        if self._nc is not None:
            nc, self._nc = self._nc, None
            with contextlib.suppress(Exception):
                await nc.drain()

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the API -------------------------------------------------------------------------

    async def request(self, op: str, body: dict[str, Any]) -> dict[str, Any]:
        """Call one gateway operation (`cumulus.api.<op>`), retried as the policy says; the
        reply as JSON decodes it."""
        return await self._call(op, body, dict)

    async def _call(
        self, op: str, body: Any, reply_type: type[T], retry: RetryPolicy | None = None
    ) -> T:
        async def attempt() -> T:
            return await api.request(self.nc, op, body, reply_type, user=self.user)

        return await (retry or self.retry).call(op, attempt)

    def get_job(self, job_id: str) -> AsyncJob:
        """A handle for a job submitted earlier (by id), e.g. from another process."""
        return AsyncJob(self, job_id)

    async def jobs(
        self,
        status: Sequence[str] = (),
        limit: int = 100,
        *,
        name: str = "",
        tags: Mapping[str, str | None] | None = None,
        since: float | str | None = None,
        user: str | None = None,
        all_users: bool = False,
    ) -> list[JobInfo]:
        """This user's jobs, newest first, those the gateway still holds in memory: only
        those in the given statuses, with `name` (or matching it, `train-*`), with every one of
        `tags` (a None value: the key with any value), submitted within `since` (seconds, or
        "15m", "1h", "2d"). An observer's or operator's profile may ask for another `user`'s
        jobs, or everyone's (`all_users`); a user's is PERMISSION_DENIED."""
        body: dict[str, Any] = {"status": [str(s) for s in status], "limit": limit}
        if name:
            body["name"] = name
        if tags:
            body["tags"] = dict(tags)
        if since is not None:
            body["since_s"] = labels.parse_age(since) if isinstance(since, str) else since
        if not all_users and (not user or user == self.user):
            return (await self._call("jobs", body, _JobList)).jobs
        role = self.credentials.role if self.credentials else "admin"
        if role not in ("observer", "admin"):
            raise PermissionDenied(
                f"You are the user {self.user!r}: only an observer or an operator may list "
                "other users' jobs"
            )
        body["users"] = [] if all_users else [user]
        return (await self._call(f"{subjects.OBSERVE_PREFIX}.jobs", body, _JobList)).jobs

    async def workers(self) -> list[WorkerInfo]:
        """Workers and their devices, each with its allocated and free share."""
        return (await self.worker_list()).workers

    async def worker_list(self) -> WorkerList:
        """The workers and how many jobs wait in the queue (the `workers` operation, page by
        page: a fleet's list does not fit one reply)."""
        page = await self._call("workers", {}, WorkerList)
        workers = list(page.workers)
        for _ in range(MAX_WORKER_PAGES):
            if not page.next:
                break
            page = await self._call("workers", {"after": page.next}, WorkerList)
            workers += page.workers
        return WorkerList(workers=workers, queued=page.queued)

    async def health(self) -> HealthInfo:
        """The gateway's health and the scheduler's."""
        return await self._call("health", {}, HealthInfo)

    async def tail(
        self, subject: str = "jobs.>", *, replay: bool = False
    ) -> AsyncGenerator[tuple[str, bytes], None]:
        """(subject, data) of every message on `subject` from now on, like `nats sub`; with
        `replay`, of every job event from the first the job stream still holds. A user sees
        only its own jobs (`jobs.>` means `jobs.<user>.>`); an observer every user's. Decode
        an event with `shared.events.decode`. Runs until the caller stops iterating."""
        role = self.credentials.role if self.credentials else "user"
        if role == "user":
            subject = _own_jobs(subject, self.user)
        if not replay:
            sub = await self.nc.subscribe(subject)
            try:
                while True:
                    msg = await sub.next_msg(timeout=None)
                    yield msg.subject, msg.data
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        op = f"{subjects.OBSERVE_PREFIX}.watch" if role in ("observer", "admin") else "watch"

        async def start(deliver: str, first: int) -> WatchReply:
            body = {"filter": subject, "deliver": deliver, "from_seq": first}
            return await self._call(op, body, WatchReply)

        stream = subjects.stream_of(subject) or subjects.JOBS_STREAM
        async with contextlib.aclosing(watch_messages(self.nc, stream, start, None)) as messages:
            async for _, msg in messages:
                yield msg.subject, msg.data

    # -- secrets -------------------------------------------------------------------------

    async def set_secret(self, name: str, value: str) -> None:
        """Store (or replace) your secret `name`, encrypted at rest by the gateway; a job that
        names it (`secrets=[name]`) gets it as the environment variable `name`."""
        await self._call("secret_put", {"name": name, "value": value}, dict)

    async def secrets(self) -> list[str]:
        """The names of your secrets (their values are never sent back)."""
        return (await self._call("secret_list", {}, api.SecretNames)).names

    async def delete_secret(self, name: str) -> None:
        """Delete your secret `name` (NOT_FOUND if there is none); jobs naming it afterwards
        are refused, and a job that has not started yet fails."""
        await self._call("secret_delete", {"name": name}, dict)

    # -- submitting ----------------------------------------------------------------------

    async def upload(self, data: bytes) -> str:
        """Hand a code package to the gateway (once per content: a package it holds is not
        sent again); returns its code_ref. The gateway checks it before storing it."""
        ref = code_ref(data)
        if time.monotonic() - self._uploaded.get(ref, -UPLOADED_S) < UPLOADED_S:
            return ref  # stored a moment ago (submit uploads again if it is not)
        restarts = 0
        while True:
            try:
                await self._send_package(ref, memoryview(data))
                break
            except _StartAgain as again:
                # The replica holding the first chunks is gone (or forgot them): start again
                # on any gateway, a few times at most.
                if restarts >= UPLOAD_RESTARTS:
                    raise again.error from None
                log.info("upload of %s restarts: %s", ref, again.error.message)
                restarts += 1
        if len(self._uploaded) >= 1024:
            self._uploaded.clear()
        self._uploaded[ref] = time.monotonic()
        return ref

    async def _send_package(self, ref: str, data: memoryview) -> None:
        """One try at the whole package: the first chunk to any gateway, then the rest, up
        to UPLOAD_WINDOW at once, to the replica that answered (its chunks are on its disk).
        _StartAgain when that replica is gone or no longer holds the upload."""
        size = len(data)

        def body(offset: int) -> dict[str, Any]:
            chunk = data[offset : offset + UPLOAD_CHUNK]
            return {"code_ref": ref, "size": size, "offset": offset, "data": chunk}

        def timeout(offset: int) -> float:
            last = offset + UPLOAD_CHUNK >= size  # its answer waits for the checks and store
            return UPLOAD_TIMEOUT_S + (size / STORE_RATE if last else 0.0)

        async def first() -> _Uploaded:
            return await api.request(
                self.nc, "upload", body(0), _Uploaded, timeout=timeout(0), user=self.user
            )

        # a full quota is no "not now": only a gateway that is away is worth retrying
        reply = await self._upload_retry.call("upload", first)
        subject = subjects.api(f"upload.{reply.gateway}" if reply.gateway else "upload", self.user)
        sent: list[asyncio.Task[_Uploaded]] = []
        offset = reply.received
        try:
            while not reply.stored:
                while len(sent) < UPLOAD_WINDOW and offset < size:
                    request = api.request(
                        self.nc, subject, body(offset), _Uploaded, timeout=timeout(offset)
                    )
                    sent.append(asyncio.create_task(request))
                    offset += UPLOAD_CHUNK
                if not sent:
                    raise CumulusError.from_code("INTERNAL", f"upload of {ref} made no progress")
                try:
                    reply = await sent.pop(0)
                except CumulusError as exc:
                    if _start_again(exc):
                        raise _StartAgain(exc) from None
                    raise
        finally:
            # Answers still due are awaited, not abandoned: a try that starts again must not
            # overtake this one's chunks.
            await asyncio.gather(*sent, return_exceptions=True)

    async def submit_package(
        self,
        package: bytes,
        options: JobOptions | None = None,
        *,
        entrypoint: str = "function",
        job_id: str = "",
        packaging_note: str = "",
        map_spec: ev.MapSpec | None = None,
        target: str = "",
        **option_args: Unpack[JobOptionArgs],
    ) -> AsyncJob:
        """Submit a package made by `package_function` or `package_script`; `packaging_note`
        says how it was made (the handle's `packaging`); `map_spec` makes it a warm map's job
        (cumulus/_map.py); `target` names what it runs in job lists (`train.py`, `mod:fn`)."""
        opts = JobOptions.build(options, **option_args)
        job_id = job_id or ev.new_job_id()
        attributes = {
            "messaging.system": "nats",
            "cumulus.job_id": job_id,
            "cumulus.user": self.user,
        }
        with tracing.caller_span("cumulus submit", attributes) as traceparent:
            ref = await self.upload(package)
            return await self._submit(
                package,
                ref,
                opts,
                entrypoint,
                job_id,
                packaging_note,
                map_spec,
                traceparent,
                _target(target),
            )

    async def _submit(
        self,
        package: bytes,
        ref: str,
        opts: JobOptions,
        entrypoint: str,
        job_id: str,
        packaging_note: str,
        map_spec: ev.MapSpec | None,
        traceparent: str,
        target: str = "",
    ) -> AsyncJob:
        request = msgspec.to_builtins(
            api.SubmitRequest(
                code_ref=ref,
                gpu=opts.gpu,
                duration=opts.duration,
                user=self.user,
                job_id=job_id,
                entrypoint=entrypoint,
                requirements=list(opts.requirements),
                priority=opts.priority,
                env=dict(opts.env),
                network=opts.network,
                secrets=list(opts.secrets),
                map=map_spec,
                traceparent=traceparent,
                name=opts.name,
                tags=dict(opts.tags),
                volumes=dict(opts.volumes),
                image=opts.image,
                target=target,
                retries=opts.retries,
            )
        )
        # the feed follows the job before it exists: every event of it comes through there
        route = await Feed.route(self, job_id)
        try:
            try:
                reply = await self._call("submit", request, api.SubmitReply)
            except InvalidArgument as exc:
                if exc.field != "code_ref" or self._uploaded.pop(ref, None) is None:
                    raise
                await self.upload(package)  # the gateway no longer holds it: again, once
                reply = await self._call("submit", request, api.SubmitReply)
        except BaseException:
            if route is not None and self._feed is not None:
                self._feed.forget(route)
            raise
        if route is not None and reply.status != "SUBMITTED" and self._feed is not None:
            self._feed.forget(route)  # a job submitted before: its route lacks its beginning
            route = None
        return AsyncJob(self, reply.job_id, packaging_note, route)

    async def how_to_package(self, requested: Packaging | None = None) -> tuple[str, str]:
        """("pickle" or "source", why), from the Python versions the workers report."""
        requested = requested or self.packaging
        if requested == "auto" and self._worker_pythons is None:
            try:
                reply = await api.request(
                    self.nc, "workers", {}, WorkerList, timeout=2.0, user=self.user
                )
                self._worker_pythons = [w.labels.get("python", "") for w in reply.workers]
            except CumulusError:
                self._worker_pythons = []
        return choose_packaging(requested, self._worker_pythons or [])

    async def submit_call(
        self,
        func: Callable[..., Any],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        options: JobOptions | None = None,
        *,
        job_id: str = "",
        **option_args: Unpack[JobOptionArgs],
    ) -> AsyncJob:
        """Submit `func(*args, **kwargs)`; use this when the function has a keyword argument
        named like one of submit()'s options."""
        opts = JobOptions.build(options, **option_args)
        how, why = await self.how_to_package(opts.packaging)
        package = package_function(func, args, kwargs, opts.requirements, how)  # type: ignore[arg-type]
        return await self.submit_package(
            package, opts, job_id=job_id, packaging_note=why, target=_function_name(func)
        )

    async def submit(
        self,
        func: Callable[..., Any],
        *args: Any,
        gpu: Gpu = None,
        duration: int | None = None,
        requirements: Sequence[str] | None = None,
        priority: int | None = None,
        env: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> AsyncJob:
        """Submit `func(*args, **kwargs)` and return its handle at once."""
        options = JobOptions.build(
            gpu=gpu, duration=duration, requirements=requirements, priority=priority, env=env
        )
        return await self.submit_call(func, args, kwargs, options)

    async def run_call(
        self,
        func: Callable[..., Any],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        options: JobOptions | None = None,
        *,
        logs: Logs = True,
        timeout: float | None = None,
        **option_args: Unpack[JobOptionArgs],
    ) -> Any:
        """Run `func(*args, **kwargs)` and return its value (see run())."""
        opts = JobOptions.build(options, **option_args)
        waits = iter(self.retry.backoffs())
        while True:
            job = await self.submit_call(func, args, kwargs, opts)
            try:
                return await job.result(timeout=timeout, logs=logs)
            except CumulusError as exc:
                # The seed's run_with_retry: a job the cluster could not run *now* (its worker
                # was lost, no capacity) is run again, as a new job; its own errors are raised.
                wait = next(waits, None)
                if not self.retry.retries(exc) or wait is None:
                    raise
                log.warning(
                    "[cumulus] job %s ended with %s: %s; running it again in %g s",
                    job.job_id,
                    exc.code,
                    exc.message,
                    wait,
                )
                await asyncio.sleep(wait)
            except asyncio.CancelledError:
                # Whoever ran it gave up on it (Ctrl-C, a cancelled task): stop the job too.
                with contextlib.suppress(Exception):
                    await asyncio.shield(asyncio.wait_for(job.cancel(), 5))
                raise

    async def run(
        self,
        func: Callable[..., Any],
        *args: Any,
        gpu: Gpu = None,
        duration: int | None = None,
        requirements: Sequence[str] | None = None,
        priority: int | None = None,
        env: dict[str, str] | None = None,
        logs: Logs = True,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run `func(*args, **kwargs)` on `gpu` of a GPU and return its value.

        The job's output is printed as it comes (`logs=False` to keep quiet); its failure is
        raised as the typed error. Cancelling the call cancels the job.
        """
        options = JobOptions.build(
            gpu=gpu, duration=duration, requirements=requirements, priority=priority, env=env
        )
        return await self.run_call(func, args, kwargs, options, logs=logs, timeout=timeout)

    async def map(
        self,
        func: Callable[..., Any],
        *iterables: Iterable[Any],
        options: JobOptions | None = None,
        concurrency: int = 16,
        return_exceptions: bool = False,
        logs: Logs = False,
        timeout: float | None = None,
        warm: int | bool = False,
        retries: int = 0,
        ordered: bool = True,
        **option_args: Unpack[MapOptionArgs],
    ) -> list[Any]:
        """`[func(*xs) for xs in zip(*iterables)]`; results in input order.

        With `warm` (a number of processes, or True to let the SDK choose), ONE job holds its
        GPU share and that many warm processes, which load `func` once and call it on input
        after input from a queue (docs/map.md): per input, a message and a call. Each input
        has its own answer; a failing input does not end the map (an input whose call raised
        is tried `retries` more times); with `ordered=False` the list is in the order the
        answers came. Errors: the first failing input's (by index) is raised once every input
        is answered, unless `return_exceptions` puts errors in the list instead.

        Without `warm`: one job per input, at most `concurrency` jobs in flight; the first
        failure cancels the jobs still running and is raised (or, with `return_exceptions`,
        put in the list)."""
        opts = JobOptions.build(options, **option_args)
        if warm is not False:
            return await run_map(
                self,
                func,
                list(zip(*iterables, strict=False)),
                opts,
                warm=warm,
                retries=retries,
                ordered=ordered,
                return_exceptions=return_exceptions,
                logs=logs,
                timeout=timeout,
            )
        if concurrency < 1:
            raise InvalidArgument("map concurrency must be >= 1")
        inputs = list(zip(*iterables, strict=False))
        results: list[Any] = [None] * len(inputs)
        gate = asyncio.Semaphore(concurrency)

        async def one(index: int, args: tuple[Any, ...]) -> None:
            async with gate:
                try:
                    results[index] = await self.run_call(
                        func, args, None, opts, logs=logs, timeout=timeout
                    )
                except Exception as exc:
                    if not return_exceptions:
                        raise
                    results[index] = exc

        tasks = [asyncio.create_task(one(i, args)) for i, args in enumerate(inputs)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return results

    async def submit_script(
        self,
        path: str | Path,
        args: Sequence[str] = (),
        options: JobOptions | None = None,
        *,
        working_dir: str | Path | None = None,
        **option_args: Unpack[JobOptionArgs],
    ) -> AsyncJob:
        """Submit a script (run as `python script.py *args` in a copy of `working_dir`)."""
        opts = JobOptions.build(options, **option_args)
        package = package_script(path, args, opts.requirements, working_dir)
        entry = script_entry(path, working_dir)
        return await self.submit_package(
            package, opts, entrypoint=entry, packaging_note="script", target=str(path)
        )


class _JobList(msgspec.Struct):
    jobs: list[JobInfo] = []


def _function_name(func: Callable[..., Any]) -> str:
    """`module:qualname` of a function, as `cumulus run module:function` names it."""
    inner = getattr(func, "__cumulus_function__", func)
    module = getattr(inner, "__module__", "") or ""
    name = getattr(inner, "__qualname__", "") or getattr(inner, "__name__", "") or repr(inner)
    return f"{module}:{name}" if module else name


def _target(target: str) -> str:
    """`target` as the gateway takes it: printable, at most labels.MAX_TARGET characters
    (the end kept: a long path's file name is what tells it apart)."""
    if not target.isprintable():
        return ""
    return target if len(target) <= labels.MAX_TARGET else "…" + target[-labels.MAX_TARGET + 1 :]


def _start_again(exc: CumulusError) -> bool:
    """Whether a chunk's answer from the replica holding the upload means "start again": it
    is away (no answer), or no longer holds the upload (restarted: the chunk is out of order)."""
    if exc.code == "UNAVAILABLE":
        return True
    return isinstance(exc, InvalidArgument) and exc.field == "offset"


class _StartAgain(Exception):
    """An upload's try that should start again from its first chunk (`error` says why)."""

    def __init__(self, error: CumulusError) -> None:
        super().__init__(error.message)
        self.error = error


class _Uploaded(msgspec.Struct):
    stored: bool
    received: int = 0
    gateway: str = ""


def _own_jobs(subject: str, user: str) -> str:
    """`jobs.>` and `jobs.*.<rest>` from a user mean its own jobs (the only ones it may see):
    `jobs.<user>.>` / `jobs.<user>.<rest>`; the same under `logs.` and `results.`; another
    user's name is left for the gateway to refuse."""
    head, _, rest = subject.partition(".")
    if head not in subjects.PREFIXES:
        return subject
    if rest == ">":
        return f"{head}.{user}.>"
    token, _, tail = rest.partition(".")
    if token == "*" and tail:
        return f"{head}.{user}.{tail}"
    return subject


def _user(creds: auth.Credentials | None, user: str | None) -> str:
    """Who the client acts as: a user identity is itself and nobody else; an operator's or
    observer's profile, or none, acts as `user` (or $CUMULUS_USER, else `default`)."""
    if creds is not None and creds.role == "user":
        if user and user != creds.name:
            raise PermissionDenied(
                f"This profile is the identity {creds.name!r}; it cannot act as {user!r} "
                "(use that user's profile)"
            )
        return creds.name
    return user or os.environ.get("CUMULUS_USER") or "default"


async def _quiet(exc: Exception) -> None:
    """Connection trouble is retried by nats-py and surfaces as our errors; keep it out of
    the user's terminal (nats-py prints tracebacks by default)."""
    log.debug("nats: %r", exc)


def _note(text: str) -> Callable[[], Coroutine[Any, Any, None]]:
    async def note() -> None:
        log.info(text)

    return note


class Client:
    """The blocking client: the same operations as AsyncClient, returning values."""

    def __init__(
        self,
        nats_url: str | None = None,
        user: str | None = None,
        *,
        profile: str | None = None,
        retry: RetryPolicy | None = None,
        packaging: Packaging = "auto",
    ) -> None:
        self.aio = AsyncClient(nats_url, user, profile=profile, retry=retry, packaging=packaging)
        self._runner = Runner()
        """The asyncio client underneath (its calls run on this client's private loop)."""
        try:
            self._runner.call(self.aio.connect())
        except BaseException:
            self._runner.close()
            raise

    def __repr__(self) -> str:
        return f"Client({self.aio.nats_url!r}, user={self.aio.user!r})"

    @property
    def nats_url(self) -> str:
        return self.aio.nats_url

    @property
    def user(self) -> str:
        return self.aio.user

    def close(self) -> None:
        if not self._runner.loop.is_closed():
            with contextlib.suppress(Exception):
                self._runner.call(self.aio.close(), timeout=10)
            self._runner.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _job(self, inner: AsyncJob) -> Job:
        return Job(inner, self._runner)

    def get_job(self, job_id: str) -> Job:
        """A handle for a job submitted earlier (by id)."""
        return self._job(self.aio.get_job(job_id))

    def jobs(
        self,
        status: Sequence[str] = (),
        limit: int = 100,
        *,
        name: str = "",
        tags: Mapping[str, str | None] | None = None,
        since: float | str | None = None,
        user: str | None = None,
        all_users: bool = False,
    ) -> list[JobInfo]:
        """This user's jobs, newest first, filtered (see AsyncClient.jobs)."""
        listed = self.aio.jobs(
            status, limit, name=name, tags=tags, since=since, user=user, all_users=all_users
        )
        return self._runner.call(listed)

    def workers(self) -> list[WorkerInfo]:
        """Workers and their devices, each with its allocated and free share."""
        return self._runner.call(self.aio.workers())

    def health(self) -> HealthInfo:
        return self._runner.call(self.aio.health())

    def set_secret(self, name: str, value: str) -> None:
        """Store (or replace) your secret `name` (see AsyncClient.set_secret)."""
        self._runner.call(self.aio.set_secret(name, value))

    def secrets(self) -> list[str]:
        """The names of your secrets."""
        names: list[str] = self._runner.call(self.aio.secrets())
        return names

    def delete_secret(self, name: str) -> None:
        """Delete your secret `name`."""
        self._runner.call(self.aio.delete_secret(name))

    def submit(
        self,
        func: Callable[..., Any],
        *args: Any,
        gpu: Gpu = None,
        duration: int | None = None,
        requirements: Sequence[str] | None = None,
        priority: int | None = None,
        env: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Job:
        """Submit `func(*args, **kwargs)` and return its handle at once."""
        options = JobOptions.build(
            gpu=gpu, duration=duration, requirements=requirements, priority=priority, env=env
        )
        return self.submit_call(func, args, kwargs, options)

    def submit_call(
        self,
        func: Callable[..., Any],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        options: JobOptions | None = None,
        **option_args: Unpack[JobOptionArgs],
    ) -> Job:
        """Submit `func(*args, **kwargs)` (see AsyncClient.submit_call)."""
        opts = JobOptions.build(options, **option_args)
        return self._job(self._runner.call(self.aio.submit_call(func, args, kwargs, opts)))

    def run(
        self,
        func: Callable[..., Any],
        *args: Any,
        gpu: Gpu = None,
        duration: int | None = None,
        requirements: Sequence[str] | None = None,
        priority: int | None = None,
        env: dict[str, str] | None = None,
        logs: Logs = True,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run `func(*args, **kwargs)` on `gpu` of a GPU, print its output, return its value.

        Ctrl-C cancels the job and raises KeyboardInterrupt.
        """
        options = JobOptions.build(
            gpu=gpu, duration=duration, requirements=requirements, priority=priority, env=env
        )
        return self.run_call(func, args, kwargs, options, logs=logs, timeout=timeout)

    def run_call(
        self,
        func: Callable[..., Any],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        options: JobOptions | None = None,
        *,
        logs: Logs = True,
        timeout: float | None = None,
        **option_args: Unpack[JobOptionArgs],
    ) -> Any:
        """Run `func(*args, **kwargs)` and return its value (see run())."""
        opts = JobOptions.build(options, **option_args)
        return self._interruptible(
            self.aio.run_call(func, args, kwargs, opts, logs=logs, timeout=timeout)
        )

    def map(
        self,
        func: Callable[..., Any],
        *iterables: Iterable[Any],
        **options: Any,
    ) -> list[Any]:
        """Many jobs, results in input order (see AsyncClient.map for the options)."""
        values: list[Any] = self._interruptible(self.aio.map(func, *iterables, **options))
        return values

    def submit_script(
        self,
        path: str | Path,
        args: Sequence[str] = (),
        options: JobOptions | None = None,
        *,
        working_dir: str | Path | None = None,
        **option_args: Unpack[JobOptionArgs],
    ) -> Job:
        """Submit a script (see AsyncClient.submit_script)."""
        opts = JobOptions.build(options, **option_args)
        submitted = self.aio.submit_script(path, args, opts, working_dir=working_dir)
        return self._job(self._runner.call(submitted))

    def _interruptible(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run on the private loop; Ctrl-C here cancels it there (which cancels its jobs) and
        waits for that before raising KeyboardInterrupt."""

        async def start() -> asyncio.Task[Any]:
            return asyncio.ensure_future(coro)

        async def finish(task: asyncio.Task[Any]) -> Any:
            return await task

        async def stop(task: asyncio.Task[Any]) -> None:
            task.cancel()
            await asyncio.wait([task], timeout=10)

        task = self._runner.call(start())
        try:
            return self._runner.call(finish(task))
        except KeyboardInterrupt:
            self._runner.call(stop(task))
            log.warning("[cumulus] interrupted: the job was cancelled")
            raise
