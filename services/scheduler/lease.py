"""The scheduler's lease: which scheduler decides, held in a JetStream key-value bucket.

Bucket `cumulus-scheduler` (replicas `nats.replicas`, history 1), key `leader`, value
`{"holder": <instance>, "epoch": N}`. Every scheduler runs one `Lease`:

- A standby (`campaign`) reads the key every `poll_s`. It takes the lease by compare-and-set
  with epoch N+1 when the key is absent (`create`), released (holder ""), its own (a restart of
  the same instance), or once the key's revision has not moved for `ttl_s` as measured by the
  standby's own monotonic clock: no clocks of two hosts are ever compared (`Watch`).
- The holder (`keep`) renews every `ttl_s/4` by compare-and-set on its last revision, same
  epoch. It may decide only until `ttl_s - margin` after the start of its last successful
  renewal (`valid`): a standby takes over no sooner than `ttl_s` after that renewal was
  written, so the two never decide at once. A holder that missed its renewals resumes only by
  a compare-and-set on its own last revision (nobody took over meanwhile); one that finds
  another holder or epoch there is superseded, and says so.

What a stale holder still publishes is fenced by the epoch (shared/events.py `stale`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from shared import subjects

log = logging.getLogger(__name__)

CALL_TIMEOUT_FRACTION = 4
"""Each call to the bucket waits at most ttl_s / this."""
NETWORK_ERRORS = (
    asyncio.TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.ServerError,
    nats.js.errors.NoStreamResponseError,  # the bucket's stream is electing its leader
)


class LeaseValue(msgspec.Struct, kw_only=True):
    holder: str
    """The scheduler instance holding the lease; "" once its holder released it."""
    epoch: int


class Superseded(Exception):
    """Another scheduler holds the lease now: this one must stop deciding at once."""

    def __init__(self, value: LeaseValue) -> None:
        super().__init__(
            f"scheduler {value.holder or '(none)'} holds the lease at epoch {value.epoch}"
        )
        self.value = value


@dataclass
class Watch:
    """A standby's view of the key: the revision it last saw move, and when (its own
    monotonic clock). Pure, for tests."""

    ttl_s: float
    revision: int = 0
    since: float = 0.0

    def due(self, revision: int, now: float) -> bool:
        """True once `revision` has stood still for `ttl_s` since this standby saw it appear."""
        if revision != self.revision:
            self.revision, self.since = revision, now
            return False
        return now - self.since >= self.ttl_s


def next_epoch(current: LeaseValue | None, known: int) -> int:
    """The epoch a new holder takes: one past both the lease's and the largest seen in the
    stream (a bucket made afresh must not reuse an epoch)."""
    return max(current.epoch if current else 0, known) + 1


class Lease:
    """One scheduler's side of the lease (see the module docstring)."""

    def __init__(self, js: JetStreamContext, holder: str, ttl_s: float, replicas: int) -> None:
        self.js = js
        self.holder = holder
        self.ttl_s = ttl_s
        self.replicas = replicas
        self.margin_s = ttl_s / 4
        self.poll_s = min(0.5, ttl_s / 4)
        self.kv: KeyValue | None = None
        self.epoch = 0
        """The epoch this scheduler holds the lease with; 0: it does not."""
        self.revision = 0
        self.valid_until = 0.0
        """Monotonic time until which the holder may decide."""

    @property
    def call_timeout(self) -> float:
        return self.ttl_s / CALL_TIMEOUT_FRACTION

    async def open(self, timeout: float = 30.0) -> None:
        """The bucket, made if missing; retried while the bus cannot answer yet (a cluster
        still electing its meta leader), up to `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                await self._open()
                return
            except (*NETWORK_ERRORS, nats.js.errors.APIError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def _open(self) -> None:
        try:
            self.kv = await self.js.key_value(subjects.LEASE_BUCKET)
        except nats.js.errors.BucketNotFoundError:
            config = KeyValueConfig(
                bucket=subjects.LEASE_BUCKET,
                description="The active scheduler's lease (key leader)",
                history=1,
                replicas=self.replicas,
            )
            self.kv = await self.js.create_key_value(config=config)

    async def read(self) -> tuple[int, LeaseValue | None]:
        """(revision, value) of the key; (0, None) when there is none (or it was deleted)."""
        assert self.kv is not None
        try:
            entry = await asyncio.wait_for(self.kv.get(subjects.LEASE_KEY), self.call_timeout)
        except nats.js.errors.KeyNotFoundError:
            return 0, None
        try:
            value = msgspec.json.decode(entry.value or b"", type=LeaseValue)
        except msgspec.DecodeError:
            value = LeaseValue(holder="?", epoch=0)
        return entry.revision or 0, value

    def valid(self) -> bool:
        """The holder may decide now."""
        return self.epoch > 0 and time.monotonic() < self.valid_until

    async def campaign(self, known: Callable[[], int]) -> int:
        """Wait until this scheduler holds the lease; its epoch. `known` gives the largest
        epoch seen in the stream."""
        watch = Watch(self.ttl_s)
        while True:
            with contextlib.suppress(*NETWORK_ERRORS):
                if await self._try_take(watch, known()):
                    return self.epoch
            await asyncio.sleep(self.poll_s)

    async def _try_take(self, watch: Watch, known: int) -> bool:
        revision, current = await self.read()
        now = time.monotonic()
        free = current is None or current.holder in ("", self.holder)
        if not free and not watch.due(revision, now):
            return False
        value = LeaseValue(holder=self.holder, epoch=next_epoch(current, known))
        assert self.kv is not None
        data = msgspec.json.encode(value)
        try:
            if current is None:
                rev = await asyncio.wait_for(
                    self.kv.create(subjects.LEASE_KEY, data), self.call_timeout
                )
            else:
                rev = await asyncio.wait_for(
                    self.kv.update(subjects.LEASE_KEY, data, last=revision), self.call_timeout
                )
        except nats.js.errors.KeyWrongLastSequenceError:
            return False  # another standby was first, or the holder renewed just now
        self.epoch, self.revision, self.valid_until = (
            value.epoch,
            rev,
            now + self.ttl_s - self.margin_s,
        )
        log.info(
            "scheduler lease taken",
            extra={
                "fields": {
                    "holder": self.holder,
                    "epoch": value.epoch,
                    "from": current.holder if current else "",
                }
            },
        )
        return True

    async def renew(self) -> bool:
        """One renewal; True if it succeeded (`valid_until` moved on). Raises Superseded
        when another scheduler holds the lease."""
        assert self.kv is not None
        started = time.monotonic()
        data = msgspec.json.encode(LeaseValue(holder=self.holder, epoch=self.epoch))
        try:
            self.revision = await asyncio.wait_for(
                self.kv.update(subjects.LEASE_KEY, data, last=self.revision), self.call_timeout
            )
        except nats.js.errors.KeyWrongLastSequenceError:
            revision, current = await self.read()
            if current is None or (current.holder, current.epoch) != (self.holder, self.epoch):
                raise Superseded(current or LeaseValue(holder="", epoch=0)) from None
            self.revision = revision  # our own update went through; its reply was lost
            return False
        self.valid_until = started + self.ttl_s - self.margin_s
        return True

    async def keep(self, regained: Callable[[], None]) -> None:
        """Renew every ttl_s/4 until superseded (raises Superseded). `regained` is called when
        a renewal succeeds after the lease had lapsed: what was not decided meanwhile is owed.

        Lapsed means: the validity the last successful renewal gave ran out before this one
        took effect, checked once the renewal is back. A renewal still in flight when the
        lease runs out (an event loop held up by a long batch on a loaded host) counts too:
        the events consumed meanwhile were not decided, and nothing else would decide them."""
        while True:
            valid_until = self.valid_until
            with contextlib.suppress(*NETWORK_ERRORS):
                renewed = await self.renew()
                if renewed and time.monotonic() >= valid_until:
                    log.warning(
                        "scheduler lease renewed after it had lapsed; deciding again",
                        extra={"fields": {"holder": self.holder, "epoch": self.epoch}},
                    )
                    regained()
            await asyncio.sleep(self.ttl_s / 4)

    async def release(self) -> None:
        """Give the lease up (a clean stop): a standby takes it at once."""
        if self.kv is None or not self.epoch:
            return
        data = msgspec.json.encode(LeaseValue(holder="", epoch=self.epoch))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self.kv.update(subjects.LEASE_KEY, data, last=self.revision), self.call_timeout
            )
        self.epoch = 0
