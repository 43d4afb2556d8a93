"""Bus helpers: connect, ensure the streams, bind durable consumers, publish events.

Every publish carries the event id as `Nats-Msg-Id`, so re-publishing an event after a crash
is dropped by JetStream as a duplicate inside the stream's duplicate window.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterable, Sequence

import nats
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

from shared import events, subjects
from shared.events import Event, JobEvent, WorkerEvent

log = logging.getLogger(__name__)

RESULT_TTL_S = 7 * 24 * 3600.0
"""Large results are kept this long in the object store."""

DUPLICATE_WINDOW_S = 15 * 60.0
"""Long enough to cover a crashed service's restart and its outbox re-publish."""

STREAMS = (
    StreamConfig(
        name=subjects.JOBS_STREAM,
        subjects=["jobs.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        duplicate_window=DUPLICATE_WINDOW_S,
        description="Every job's history, replayable from the start",
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
        name=subjects.DEAD_STREAM,
        subjects=["cumulus.dead.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_msgs=100_000,
        description="Messages a service could not decode, set aside for a person to read",
    ),
)


async def connect(url: str, name: str, timeout: float = 5.0) -> Client:
    """Connect with reconnects forever: a bus restart must not kill a service."""
    return await nats.connect(
        servers=url.split(","),
        name=name,
        connect_timeout=timeout,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        allow_reconnect=True,
    )


async def ensure_streams(js: JetStreamContext) -> None:
    for config in STREAMS:
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError:
            await js.update_stream(config)
    for bucket, description, ttl in (
        (subjects.CODE_BUCKET, "Code packages, named by their sha256", None),
        (subjects.RESULTS_BUCKET, "Results too large for an event, named by job id", RESULT_TTL_S),
    ):
        try:
            await js.object_store(bucket)
        except nats.js.errors.BucketNotFoundError:
            await js.create_object_store(
                bucket, config=ObjectStoreConfig(description=description, ttl=ttl)
            )


async def durable(
    js: JetStreamContext, stream: str, name: str, filters: Sequence[str], after: int = 0
) -> None:
    """Create the durable pull consumer `name` over `filters` of `stream`.

    `after` is the last stream sequence the service has durably applied (its tracking row).
    The consumer is then created anew to deliver from the next one, in order. The server's own
    cursor cannot be trusted after a crash: with AckAll, a message delivered to the dead
    process and never applied is acknowledged by the first later message the new process
    acks, and would be lost. With nothing tracked, an existing consumer is kept as it is.
    """
    if after > 0:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_consumer(stream, name)
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
    await js.add_consumer(stream, config=config)


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


async def ack_all(msg: Msg) -> None:
    """Ack `msg` and, the consumer being AckAll, every message before it."""
    await msg.ack()


def subject_of(event: Event) -> str:
    if isinstance(event, JobEvent):
        return subjects.job(event.user, event.job_id, event.worker_id, event.name)
    if isinstance(event, WorkerEvent):
        return subjects.worker(event.worker_id, event.name)
    raise TypeError(f"no subject for {type(event).__name__}")


def headers(msg_id: str, trace: str) -> dict[str, str]:
    """`Nats-Msg-Id` (JetStream de-duplication) and the W3C trace context."""
    out = {"Nats-Msg-Id": msg_id}
    if trace:
        out["traceparent"] = trace
    return out


async def publish(js: JetStreamContext, event: Event) -> None:
    await js.publish(
        subject_of(event), events.encode(event), headers=headers(event.event_id, event.trace)
    )


async def publish_many(
    js: JetStreamContext, batch: Iterable[tuple[str, dict[str, str], bytes]]
) -> None:
    """Publish (subject, headers, data) triples pipelined, in order, and wait for every ack."""
    futures = []
    for subject, headers, data in batch:
        futures.append(await js.publish_async(subject, data, headers=headers, wait_stall=30))
    if futures:
        await asyncio.wait_for(asyncio.gather(*futures), timeout=30)
