"""Bus helpers: connect, ensure the streams, bind durable consumers, publish events.

Every publish carries the event id as `Nats-Msg-Id`, so re-publishing an event after a crash
is dropped by JetStream as a duplicate inside the stream's duplicate window.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from shared import api, auth, events, subjects
from shared.config import RetentionConfig
from shared.errors import ApiUnreachable, PermissionDenied, Unavailable
from shared.events import Event, JobEvent, WorkerEvent

log = logging.getLogger(__name__)
T = TypeVar("T")

CODE_TTL_DAYS = 30
"""The default of `retention.code_ttl_s` in days (code packages are kept this long after their
upload, so each user's quota frees itself)."""

DUPLICATE_WINDOW_S = 15 * 60.0
"""Long enough to cover a crashed service's restart and its outbox re-publish."""

CLUSTER_API_TIMEOUT_S = 10.0
"""How long a stream, bucket or consumer create waits for JetStream's answer: with replicas,
the change goes through the meta leader's Raft group, and with a server down that takes
seconds (measured > 2 s for an R3 consumer)."""
CLUSTER_READY_S = 60.0
"""How long creation is retried while the cluster has no meta leader yet (its servers just
started: ~2.4 s for three on one host) or is electing a new one."""
NOT_YET: tuple[type[Exception], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
)
"""What JetStream answers while it cannot take an API call yet (no meta leader, a stream
electing its leader): worth another try, not a failure."""
JETSTREAM_NOT_READY = (10008, 10009)
"""JetStream error codes for "temporarily unavailable" / "no leader" (a cluster electing)."""


def _limited(
    name: str, subject: str, max_age: float, max_bytes: int, description: str
) -> StreamConfig:
    """A stream that drops its oldest messages past an age or a size."""
    return StreamConfig(
        name=name,
        subjects=[subject],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=max_age,
        max_bytes=max_bytes,
        discard=DiscardPolicy.OLD,
        duplicate_window=min(DUPLICATE_WINDOW_S, max_age),  # the server refuses a longer one
        description=description,
    )


MAX_JOB_CONSUMERS = 100_000
"""Consumers the JOBS stream takes: two durables per worker (its partitioner's and runner's)
plus a few for the control plane, and the job streams' replays (a handle made by id, a large
result's reader, a warm map's answers), one each. nats-server's own default is 1,000 per
stream (and a value <= 0 means that default), which stops a fleet at its 500th worker
(bench/fleet_scale.py)."""


def streams(retention: RetentionConfig | None = None) -> tuple[StreamConfig, ...]:
    """The streams, with the limits `retention` sets (docs/config.md, `retention`)."""
    r = retention or RetentionConfig()
    return (
        dataclasses.replace(
            _limited(
                subjects.JOBS_STREAM,
                "jobs.>",
                r.jobs_max_age_s,
                r.bytes_of("jobs_max_bytes"),
                "Every job's history, replayable from the start (oldest dropped at the limits)",
            ),
            max_consumers=MAX_JOB_CONSUMERS,
        ),
        dataclasses.replace(
            _limited(
                subjects.LOGS_STREAM,
                "logs.>",
                r.logs_max_age_s,
                r.bytes_of("logs_max_bytes"),
                "Every job's output lines (oldest dropped at the limits)",
            ),
            max_consumers=MAX_JOB_CONSUMERS,  # a replay of a job's output is one
        ),
        dataclasses.replace(
            _limited(
                subjects.RESULTS_STREAM,
                "results.>",
                r.results_ttl_s,
                r.bytes_of("results_max_bytes"),
                "Parts of results too large for their completed event; warm maps' answers",
            ),
            max_consumers=MAX_JOB_CONSUMERS,  # a large result's reader, a map's answers
        ),
        StreamConfig(
            name=subjects.WORKERS_STREAM,
            subjects=["workers.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_msgs_per_subject=1,
            discard=DiscardPolicy.OLD,
            duplicate_window=60.0,
            description="Worker inventory: latest registration and heartbeat of each worker",
        ),
        StreamConfig(
            name=subjects.MAPIN_STREAM,
            subjects=["mapin.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            max_age=r.jobs_max_age_s,
            max_bytes=r.bytes_of("map_inputs_max_bytes"),
            discard=DiscardPolicy.NEW,  # a full queue refuses an input: its map is told
            duplicate_window=min(DUPLICATE_WINDOW_S, r.jobs_max_age_s),
            max_consumers=MAX_JOB_CONSUMERS,
            description="Warm maps' inputs (a work queue: an answered input leaves it)",
        ),
        StreamConfig(
            name=subjects.DEAD_STREAM,
            subjects=["cumulus.dead.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_msgs=100_000,
            description="Messages a service could not decode, set aside for a person to read",
        ),
    )


STREAMS = streams()
"""The streams with the default limits (their names and subjects are the same whatever the
configuration says)."""


async def connect(
    url: str,
    name: str,
    timeout: float = 5.0,
    credentials: str = "",
    reconnected: Callable[[], Awaitable[None]] | None = None,
    startup_timeout: float = 0.0,
) -> Client:
    """Connect, and reconnect forever: a bus restart must not kill a service. With
    `credentials` (a file shared/auth.py wrote), as that identity, over TLS where it says.

    While the bus cannot be reached, first or later, each attempt waits a little longer
    (RECONNECT_FIRST_S doubling up to RECONNECT_MAX_S) and the log gets one line when it is
    lost, a summary at most every BUS_SUMMARY_EVERY_S, and one line when it is back (`_Link`).
    The first connection gives up after `startup_timeout` seconds (0: never) with
    BusUnreachable. A permission the server refuses is logged (nats-py does not raise it).
    `reconnected` is called after each reconnection."""
    creds = auth.load_credentials(credentials) if credentials else None
    link = _Link(url, name, reconnected)
    nc = Client()
    link.nc = nc
    attempt = nc.connect(
        servers=url.split(","),
        name=name,
        connect_timeout=timeout,  # type: ignore[arg-type]  # typed int, takes seconds as float
        max_reconnect_attempts=-1,
        reconnect_time_wait=0,  # the wait is the link's backoff, in its error callback
        allow_reconnect=True,
        error_cb=link.error,
        disconnected_cb=link.disconnected,
        reconnected_cb=link.reconnected,
        **auth.connect_options(creds),
    )
    try:
        if startup_timeout > 0:
            await asyncio.wait_for(attempt, startup_timeout)
        else:
            await attempt
    except BaseException as exc:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 1.0)
        if isinstance(exc, asyncio.TimeoutError):
            raise BusUnreachable(
                f"Cannot reach the bus at {url} within nats.startup_timeout ({startup_timeout:g} "
                f"s; {link.attempts} attempts, last error: {link.last_error or 'none'}): start "
                "nats-server there, or fix nats.url (0 waits forever)",
            ) from None
        raise
    link.connected = True
    link.up("connected to the bus")
    return nc


class BusUnreachable(Unavailable):
    """The bus could not be reached before `nats.startup_timeout`."""


RECONNECT_FIRST_S = 0.25
RECONNECT_MAX_S = 2.0
"""Backoff between attempts to reach the bus: from the first, doubling, capped (each with
+-20 % jitter, so a fleet does not knock in step). The cap is how long a service may take to
notice that its bus is back."""
BUS_SUMMARY_EVERY_S = 60.0
"""While the bus stays away, one summary line per connection at most this often."""
BUS_ERROR_EVERY_S = 10.0
"""The same bus error while connected (a slow consumer, a permission refused) is logged at
most once in this time, with a count of those left out: a fault must not flood the logs."""
_bus_errors: dict[str, tuple[float, int]] = {}
"""Each error's text -> (when it was last logged, how many were left out since)."""
CONNECTION_LOST: tuple[type[Exception], ...] = (
    OSError,
    asyncio.TimeoutError,
    nats.errors.UnexpectedEOF,
    nats.errors.StaleConnectionError,
    nats.errors.ConnectionClosedError,
)
"""What nats-py reports as a connection ends: the link's "lost" line tells it, not a line each."""


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:300]


class _Link:
    """One connection's account of its bus, told in few lines and no tracebacks.

    nats-py calls `error` for each failed attempt to reach the server (the first connection
    and reconnections alike) and awaits it before the next attempt: the backoff is a sleep
    here. `disconnected` and `reconnected` mark the loss and the return.
    """

    def __init__(
        self, url: str, name: str, reconnected: Callable[[], Awaitable[None]] | None
    ) -> None:
        self.url, self.name = url, name
        self.nc: Client | None = None
        self.connected = False
        self.lost_at: float | None = None
        """When the bus was lost (monotonic; None while connected)."""
        self.attempts = 0
        self.last_error = ""
        self.summarized = 0.0
        self.backoff = RECONNECT_FIRST_S
        self.on_reconnected = reconnected

    def _fields(self, **more: object) -> dict[str, Any]:
        return {"fields": {"connection": self.name, "url": self.url, **more}}

    def _away_s(self) -> float:
        return round(time.monotonic() - (self.lost_at or time.monotonic()), 1)

    async def error(self, exc: Exception) -> None:
        if self.connected:
            if isinstance(exc, CONNECTION_LOST):
                self.last_error = _describe(exc)  # `disconnected` says it next
                return
            await _log_error(exc)
            return
        self.attempts += 1
        self.last_error = _describe(exc)
        now = time.monotonic()
        if self.lost_at is None:  # the first connection's first failure
            self.lost_at = self.summarized = now
            log.warning(
                "cannot reach the bus; retrying until it comes",
                extra=self._fields(error=self.last_error),
            )
        elif now - self.summarized >= BUS_SUMMARY_EVERY_S:
            self.summarized = now
            log.warning(
                "the bus is still away",
                extra=self._fields(
                    attempts=self.attempts, away_s=self._away_s(), error=self.last_error
                ),
            )
        delay = self.backoff * random.uniform(0.8, 1.2)
        self.backoff = min(self.backoff * 2, RECONNECT_MAX_S)
        await asyncio.sleep(delay)

    async def disconnected(self) -> None:
        if self.nc is None or self.nc.is_closed or not self.connected:
            return  # closed on purpose, or never connected
        self.connected = False
        self.lost_at = self.summarized = time.monotonic()
        self.attempts = 0
        self.backoff = RECONNECT_FIRST_S
        log.warning(
            "lost the bus; reconnecting", extra=self._fields(error=self.last_error or "closed")
        )

    async def reconnected(self) -> None:
        self.connected = True
        self.up("connected to the bus again")
        if self.on_reconnected is not None:
            await self.on_reconnected()

    def up(self, line: str) -> None:
        """The line of a connection made; after a wait, with what the wait took."""
        if self.lost_at is None:
            log.info(line, extra=self._fields())
        else:
            log.info(line, extra=self._fields(attempts=self.attempts, away_s=self._away_s()))
        self.lost_at = None
        self.attempts = 0
        self.last_error = ""
        self.backoff = RECONNECT_FIRST_S


async def _log_error(exc: Exception) -> None:
    text = f"{type(exc).__name__}: {exc}"[:300]
    now = time.monotonic()
    last, left_out = _bus_errors.get(text, (-BUS_ERROR_EVERY_S, 0))
    if now - last < BUS_ERROR_EVERY_S:
        _bus_errors[text] = (last, left_out + 1)
        return
    if len(_bus_errors) > 1000:  # distinct texts are few; this only bounds the memory
        _bus_errors.clear()
    _bus_errors[text] = (now, 0)
    more = f" ({left_out} more like it in the last {now - last:.0f} s)" if left_out else ""
    log.warning("bus error: %s%s", exc, more)


async def wait_streams(js: JetStreamContext, timeout: float | None = 60.0) -> None:
    """Until the streams and buckets exist (a worker may not create them: the control plane
    does, shared/auth.py), for up to `timeout` seconds (None: as long as it takes). A cluster
    still electing its leaders answers 503 meanwhile."""
    names = [c.name for c in STREAMS if c.name] + [
        f"OBJ_{subjects.CODE_BUCKET}",
    ]
    deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
    for name in names:
        while True:
            try:
                await js.stream_info(name)
                break
            except Exception as exc:
                absent = isinstance(exc, nats.js.errors.NotFoundError)
                if not (absent or not_yet(exc)) or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)


DEFAULT_MAX_PAYLOAD = 1024 * 1024
"""nats-server's default max_payload, for a client not (yet) connected."""
HEADER_ROOM = 4096
"""Bytes of a message left for its headers (message id, trace) under max_payload."""


def event_limit(nc: Client | None) -> int:
    """The largest event body the bus carries: its max_payload, less room for the headers."""
    payload = nc.max_payload if nc is not None else 0
    return (payload or DEFAULT_MAX_PAYLOAD) - HEADER_ROOM


INSUFFICIENT_STORAGE = 10047
"""JetStream's error code when a stream's max_bytes exceeds what the server can reserve."""
SMALLEST_STREAM_BYTES = 64 * 1024 * 1024


async def _fit_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create `config`, or bring an existing stream to it.

    JetStream reserves every stream's max_bytes on its disk up front. A new stream whose
    configured limit does not fit (a small disk) gets the largest halving of it that does, and
    a warning names both, rather than no stream at all. An existing stream that cannot grow to
    a new limit keeps its limits (shrinking it on its own would drop history), with a warning;
    it keeps its replicas too (`_keep_replicas`).
    """
    wanted = config.max_bytes or -1
    while True:
        try:
            await until_ready(functools.partial(js.add_stream, config))
            break
        except nats.js.errors.BadRequestError:  # it exists, configured otherwise
            config = await _keep_replicas(js, config)
            try:
                await until_ready(functools.partial(js.update_stream, config))
            except nats.js.errors.ServerError as exc:
                if exc.err_code != INSUFFICIENT_STORAGE:
                    raise
                log.warning(
                    "stream %s keeps its limits: the bus's disk cannot reserve max_bytes %d "
                    "(give nats-server more disk, or lower retention.*_max_bytes)",
                    config.name,
                    wanted,
                )
            return
        except nats.js.errors.ServerError as exc:
            half = (config.max_bytes or -1) // 2
            if exc.err_code != INSUFFICIENT_STORAGE:
                raise
            if half < SMALLEST_STREAM_BYTES:
                raise Unavailable(
                    f"The bus cannot reserve {config.max_bytes} bytes on its disk for stream "
                    f"{config.name}: give nats-server more disk (its store directory), or "
                    "lower retention.*_max_bytes (docs/config.md)"
                ) from exc
            config = dataclasses.replace(config, max_bytes=half)
    if (config.max_bytes or -1) != wanted:
        log.warning(
            "stream %s gets max_bytes %d, not the configured %d: the bus's disk cannot reserve "
            "more (give nats-server more disk, or lower retention.*_max_bytes)",
            config.name,
            config.max_bytes,
            wanted,
        )


async def _keep_replicas(js: JetStreamContext, config: StreamConfig) -> StreamConfig:
    """`config` with the replicas the existing stream has: changing them moves every message
    between servers, an operator's decision (`nats stream edit --replicas`), not a side effect
    of a service's start. A warning says when `nats.replicas` asks for another number."""
    assert config.name is not None
    info = await until_ready(lambda: js.stream_info(config.name or ""))
    have = info.config.num_replicas or 1
    if have != (config.num_replicas or 1):
        log.warning(
            "stream %s keeps its %d replica(s), not nats.replicas=%d: change an existing "
            "stream's replicas with `nats stream edit %s --replicas %d` (docs/deploy.md)",
            config.name,
            have,
            config.num_replicas or 1,
            config.name,
            config.num_replicas or 1,
        )
    return dataclasses.replace(config, num_replicas=have)


async def until_ready(call: Callable[[], Awaitable[T]], within: float = CLUSTER_READY_S) -> T:
    """`call()`, tried again while JetStream cannot take it yet (a cluster without a meta
    leader, just started or electing one after losing a server), for up to `within` seconds.
    For a JetStream API call whose failure would otherwise end something for good (a job's
    start, a service's start)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await call()
        except Exception as exc:
            if not not_yet(exc) or time.monotonic() > deadline:
                raise
            log.info("JetStream not ready (%s); trying again", exc)
            await asyncio.sleep(0.5)


def not_yet(exc: Exception) -> bool:
    """Whether `exc` is JetStream saying "not now" rather than "no"."""
    if isinstance(exc, NOT_YET):
        return True
    return isinstance(exc, nats.js.errors.APIError) and exc.err_code in JETSTREAM_NOT_READY


def cluster_js(js: JetStreamContext) -> JetStreamContext:
    """`js` with CLUSTER_API_TIMEOUT_S for its API calls: creating or changing a replicated
    stream or consumer takes seconds when a server of the cluster is down."""
    return js._nc.jetstream(timeout=CLUSTER_API_TIMEOUT_S)


async def ensure_streams(
    js: JetStreamContext, retention: RetentionConfig | None = None, replicas: int = 1
) -> None:
    """Create the streams and the code bucket with `replicas` copies each (`nats.replicas`),
    or bring existing ones to the limits `retention` sets (the defaults if None): a changed
    configuration takes effect at the next start of the control plane. Existing streams keep
    their replicas. On a cluster just started, waits for its meta leader."""
    r = retention or RetentionConfig()
    js = cluster_js(js)
    for stream in streams(r):
        await _fit_stream(js, dataclasses.replace(stream, num_replicas=replicas))
    await _ensure_code_bucket(js, r, replicas)


async def _ensure_code_bucket(js: JetStreamContext, r: RetentionConfig, replicas: int) -> None:
    bucket = subjects.CODE_BUCKET
    try:
        await until_ready(lambda: js.object_store(bucket))
    except nats.js.errors.BucketNotFoundError:
        config = ObjectStoreConfig(
            description="Code packages, named <user>.<sha256>",
            ttl=r.code_ttl_s,
            replicas=replicas,
        )
        await until_ready(lambda: js.create_object_store(bucket, config=config))
        return
    info = await until_ready(lambda: js.stream_info(f"OBJ_{bucket}"))
    if (info.config.num_replicas or 1) != replicas:
        log.warning(
            "object store %s keeps its %d replica(s), not nats.replicas=%d (docs/deploy.md)",
            bucket,
            info.config.num_replicas or 1,
            replicas,
        )
    if abs((info.config.max_age or 0.0) - r.code_ttl_s) > 1e-3:
        stream = dataclasses.replace(info.config, max_age=r.code_ttl_s)
        await until_ready(lambda: js.update_stream(stream))


async def durable(
    js: JetStreamContext, stream: str, name: str, filters: Sequence[str], after: int = 0
) -> None:
    """Create the durable pull consumer `name` over `filters` of `stream`.

    `after` is the last stream sequence the service has durably applied (its tracking row;
    0 when it has applied none). The consumer is always created anew to deliver from the next
    one, in order. The server's own cursor cannot be trusted after a crash: with AckAll, a
    message delivered to the dead process and never applied is acknowledged by the first later
    message the new process acks, and would be lost (also when the crash came in the very
    first batch, with nothing tracked yet).
    """
    js = cluster_js(js)  # a replicated consumer takes seconds with a server down
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await until_ready(functools.partial(js.delete_consumer, stream, name))
    config = ConsumerConfig(
        durable_name=name,
        name=name,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE if after > 0 else DeliverPolicy.ALL,
        opt_start_seq=after + 1 if after > 0 else None,
        ack_policy=AckPolicy.ALL,
        ack_wait=30.0,
        max_ack_pending=20_000,
        filter_subjects=list(filters) if len(filters) > 1 else None,
        filter_subject=filters[0] if len(filters) == 1 else None,
    )
    await until_ready(functools.partial(js.add_consumer, stream, config=config))


class ConsumerRequest(msgspec.Struct, kw_only=True):
    """A worker's request to the control plane to (re)create one of its durable consumers."""

    stream: str
    durable: str
    filters: list[str]
    after: int = 0


def consumer_refusal(worker_id: str, req: ConsumerRequest) -> str:
    """Why a worker may not have this consumer ("" if it may): only its own durables
    (`partitioner-<W>`, `runner-<W>`) on the job stream, filtered to events under its own
    worker token, so a worker reads no other worker's or user's traffic, and the scheduler's
    election marker (`jobs._._._.elected`), which fences stale placements."""
    if req.stream != subjects.JOBS_STREAM:
        return f"stream {req.stream!r}: a worker consumes only {subjects.JOBS_STREAM}"
    if req.durable not in (f"partitioner-{worker_id}", f"runner-{worker_id}"):
        return f"consumer {req.durable!r} is not one of worker {worker_id}'s"
    if not req.filters:
        return "a worker's consumer needs filters"
    for subject in req.filters:
        if subject == subjects.ELECTED:
            continue
        tokens = subject.split(".")
        if len(tokens) != 5 or tokens[:3] != ["jobs", "*", "*"] or tokens[3] != worker_id:
            return f"filter {subject!r} is not under jobs.*.*.{worker_id}.<event>"
        if tokens[4] in ("*", ">") or not subjects.valid_token(tokens[4]):
            return f"filter {subject!r} must name one event"
    return ""


async def create_worker_consumer(
    js: JetStreamContext, worker_id: str, req: ConsumerRequest
) -> None:
    """The control plane's side of `request_durable`: make the consumer if the worker may
    have it (else PermissionDenied naming why)."""
    if reason := consumer_refusal(worker_id, req):
        raise PermissionDenied(f"Consumer refused: {reason}")
    await durable(js, req.stream, req.durable, req.filters, req.after)


async def request_durable(
    nc: Client, worker_id: str, req: ConsumerRequest, timeout: float = 60.0
) -> None:
    """Have the control plane (the scheduler) create a worker's durable consumer: a worker's
    identity may not create consumers itself, since a consumer create chooses its filter.
    Waits for the scheduler while it is away; a refusal is PERMISSION_DENIED."""
    deadline = time.monotonic() + timeout
    subject = subjects.consumer_request(worker_id)
    while True:
        try:
            await api.request(nc, subject, req, dict, timeout=5.0)
            return
        except ApiUnreachable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


class Puller:
    """Streams a durable pull consumer's messages in batches, each as soon as it arrives.

    nats-py's `fetch(n)` holds a long poll until all n messages came or it timed out; here a
    pull request stays open and every message the server sends is handed on at once, together
    with whatever else is already waiting (the batch), so one event costs one hop and a burst
    is applied in one transaction.
    """

    def __init__(
        self, nc: Client, stream: str, consumer: str, batch: int = 512, expires_s: float = 5.0
    ) -> None:
        self._nc = nc
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._batch = batch
        self._expires_s = expires_s
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._inbox = ""
        self._sub: Subscription | None = None
        self._left = 0
        self._requested_at = 0.0

    async def start(self) -> None:
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox, cb=self._queue.put)
        await self._request()

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def restart(self) -> None:
        """Pull afresh (after the consumer was made anew): a new inbox, so nothing the old
        consumer delivered late is taken for the new one's."""
        await self.stop()
        self._queue = asyncio.Queue()
        await self.start()

    async def _request(self) -> None:
        self._left = self._batch
        self._requested_at = time.monotonic()
        body = {"batch": self._batch, "expires": int(self._expires_s * 1e9)}
        await self._nc.publish(self._next, json.dumps(body).encode(), reply=self._inbox)

    async def next_batch(self, max_msgs: int = 1024) -> list[Msg]:
        """The next messages (at least one), waiting as long as it takes."""
        out: list[Msg] = []
        while not out:
            try:
                msg = await asyncio.wait_for(self._queue.get(), timeout=self._expires_s + 1.0)
            except TimeoutError:
                # The pull request (or its expiry notice) was lost, e.g. over a reconnect.
                await self._request()
                continue
            self._take(msg, out)
            while len(out) < max_msgs and not self._queue.empty():
                self._take(self._queue.get_nowait(), out)
            if self._left <= 0:
                await self._request()
        return out

    def _take(self, msg: Msg, out: list[Msg]) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status is None and msg.reply:
            out.append(msg)
            self._left -= 1
        elif status in ("404", "408", "409"):
            self._left = 0  # this pull request is over; ask again


def stream_seq(msg: Msg) -> int:
    """The stream sequence of a message a JetStream consumer delivered, read straight from its
    reply subject `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.
    <pending>` (with a domain: `$JS.ACK.<domain>.<account hash>.<stream>.…`, 12 tokens or
    more). nats-py's `msg.metadata` parses every token into objects, a fifth of a busy
    consumer's time for this one number; it stays the answer for anything else."""
    seq = _reply_token(msg, 0)
    return int(msg.metadata.sequence.stream) if seq is None else seq


def consumer_seq(msg: Msg) -> int:
    """The consumer sequence of a delivered message (the token after the stream sequence in
    its reply subject): it counts the consumer's deliveries one by one, so a jump over a
    number is a delivery that never arrived. A redelivery carries its first number again."""
    seq = _reply_token(msg, 1)
    return int(msg.metadata.sequence.consumer) if seq is None else seq


def _reply_token(msg: Msg, after: int) -> int | None:
    """The number `after` tokens past the stream sequence in a delivery's reply subject (0:
    the stream sequence, 1: the consumer's); None where the subject has another form."""
    tokens = (msg.reply or "").split(".")
    if tokens[:2] == ["$JS", "ACK"]:
        if len(tokens) == 9:
            return int(tokens[5 + after])
        if len(tokens) >= 12:
            return int(tokens[7 + after])
    return None


async def ack_all(msg: Msg) -> None:
    """Ack `msg` and, the consumer being AckAll, every message before it."""
    await msg.ack()


def subject_of(event: Event) -> str:
    """Where `event` is published: a job's output and result parts in streams of their own
    (LOGS, RESULTS), the rest of its history under `jobs.`, a worker's facts under `workers.`."""
    if isinstance(event, events.JobLog):
        return subjects.log(event.user, event.job_id, event.worker_id)
    if isinstance(event, events.JobResultPart):
        return subjects.result(event.user, event.job_id, event.worker_id, event.attempt)
    if isinstance(event, events.JobOutputsPart):
        return subjects.outputs(event.user, event.job_id, event.worker_id, event.attempt)
    if isinstance(event, JobEvent):
        return subjects.job(event.user, event.job_id, event.worker_id, event.name)
    if isinstance(event, WorkerEvent):
        return subjects.worker(event.worker_id, event.name)
    if isinstance(event, events.SchedulerElected):
        return subjects.ELECTED
    raise TypeError(f"no subject for {type(event).__name__}")


def headers(msg_id: str, trace: str) -> dict[str, str]:
    """`Nats-Msg-Id` (JetStream de-duplication) and the W3C trace context."""
    out = {"Nats-Msg-Id": msg_id}
    if trace:
        out["traceparent"] = trace
    return out


PUBLISH_TIMEOUT_S = 3.0
"""How long a direct publish waits for JetStream's ack (an API call answers within it)."""
PUBLISH_BUDGET_S = 4.0
"""How long a direct publish keeps trying (the same message id each time: JetStream stores it
once) while the stream has no leader, e.g. a cluster electing a new one after losing a server
(5-7 s measured): less than a client's 5 s API timeout, so the caller hears UNAVAILABLE and
retries rather than timing out."""
PUBLISH_RETRY_S = 0.25


async def publish(js: JetStreamContext, event: Event) -> None:
    """Publish one event and wait for JetStream to store it; Unavailable if it does not within
    PUBLISH_BUDGET_S (the bus is away, its stream is electing a leader, or its store refuses
    writes: a full disk), so a caller can answer that."""
    deadline = time.monotonic() + PUBLISH_BUDGET_S
    while True:
        try:
            await js.publish(
                subject_of(event),
                events.encode(event),
                headers=headers(event.event_id, event.trace),
                timeout=min(PUBLISH_TIMEOUT_S, max(0.1, deadline - time.monotonic())),
            )
            return
        except (
            nats.errors.TimeoutError,
            nats.errors.NoRespondersError,
            nats.js.errors.NoStreamResponseError,
            nats.js.errors.ServiceUnavailableError,
            nats.js.errors.ServerError,
        ) as exc:
            leaderless = not isinstance(exc, nats.js.errors.ServerError)
            if leaderless and time.monotonic() + PUBLISH_RETRY_S < deadline:
                await asyncio.sleep(PUBLISH_RETRY_S)
                continue
            raise Unavailable(
                f"The bus did not store the {event.name} event ({type(exc).__name__}): it is "
                "away, electing a leader, or its disk is full; retry shortly"
            ) from exc


async def publish_many(
    js: JetStreamContext, batch: Iterable[tuple[str, dict[str, str], bytes]]
) -> None:
    """Publish (subject, headers, data) triples pipelined, in order, and wait for every ack."""
    futures = []
    for subject, headers, data in batch:
        futures.append(await js.publish_async(subject, data, headers=headers, wait_stall=30))
    if futures:
        await asyncio.wait_for(asyncio.gather(*futures), timeout=30)
