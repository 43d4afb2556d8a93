"""Replay of a job's events for its owner, without giving users the JetStream API.

A user may not create consumers itself: with that right it could also rewrite the services'
own durable consumers (a consumer create names the consumer, and an existing one is updated).
So the gateway creates, for `cumulus.api.<user>.watch`, an ephemeral push consumer over
`jobs.<user>.<job>.>` only, delivering into the caller's own private inbox, from the stream
sequence it asks for. The consumer goes away by itself once nobody listens.
"""

from __future__ import annotations

import msgspec
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.nuid import NUID

from shared import subjects
from shared.errors import InvalidArgument, NotFound

INACTIVE_S = 5.0
"""A watch consumer with no subscriber for this long is removed by the server."""
HEARTBEAT_S = 2.0
"""Idle heartbeats tell the watcher the consumer is alive while a job is quiet."""


class WatchRequest(msgspec.Struct, kw_only=True):
    job_id: str = ""
    deliver: str
    """The caller's inbox subject the events are pushed to."""
    from_seq: int = 1
    filter: str = ""
    """Instead of one job: a subject under the user's `jobs.<user>.>` (an observer's
    `cumulus.observe.watch`: any under `jobs.>`)."""


class WatchReply(msgspec.Struct, kw_only=True):
    last_seq: int
    """Stream sequence of the newest matching event when the watch began (0: none yet)."""


_nuid = NUID()


def inbox_allowed(user: str, deliver: str, observer: bool) -> bool:
    """Events go only to an inbox of the asking identity's kind: its own for a user, any
    observer's or admin's for an observer. Never a subject the services read: the server
    delivers on behalf of the account, past every permission."""
    tokens = deliver.split(".")
    if len(tokens) < 4 or any(t in ("", "*", ">") for t in tokens) or tokens[0] != "_INBOX":
        return False
    role, name = tokens[1], tokens[2]
    if role in ("observer", "admin"):
        return True
    return not observer and role == "user" and name == user


async def watch(
    js: JetStreamContext, user: str, req: WatchRequest, *, observer: bool = False
) -> WatchReply:
    if not inbox_allowed(user, req.deliver, observer):
        raise InvalidArgument(
            f"Watch delivery to {req.deliver!r} refused: use your own inbox", field="deliver"
        )
    if observer:
        filter_subject = req.filter or "jobs.>"
        if not (filter_subject == "jobs.>" or filter_subject.startswith("jobs.")):
            raise InvalidArgument("A watch filter must be under jobs.>", field="filter")
    elif req.filter:
        filter_subject = req.filter
        if not filter_subject.startswith(f"jobs.{user}."):
            raise InvalidArgument(
                f"A watch filter must be under jobs.{user}.> (your own jobs)", field="filter"
            )
    else:
        if not subjects.valid_token(req.job_id):
            raise InvalidArgument(f"Invalid job id {req.job_id!r}", field="job_id")
        filter_subject = subjects.job_all(req.job_id, user)
    try:
        last = (await js.get_last_msg(subjects.JOBS_STREAM, filter_subject)).seq or 0
    except nats.js.errors.NotFoundError:
        if req.job_id and not req.filter:
            raise NotFound(f"Job {req.job_id} not found") from None
        last = 0
    start = max(1, req.from_seq)
    await js.add_consumer(
        subjects.JOBS_STREAM,
        ConsumerConfig(
            name=f"watch-{_nuid.next().decode()}",
            filter_subject=filter_subject,
            deliver_subject=req.deliver,
            deliver_policy=DeliverPolicy.ALL if start <= 1 else DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=None if start <= 1 else start,
            ack_policy=AckPolicy.NONE,
            idle_heartbeat=HEARTBEAT_S,
            inactive_threshold=INACTIVE_S,
            mem_storage=True,
            num_replicas=1,
        ),
    )
    return WatchReply(last_seq=last)
