"""Replay of a job's events for its owner, without giving users the JetStream API.

A user may not create consumers itself: with that right it could also rewrite the services'
own durable consumers (a consumer create names the consumer, and an existing one is updated).
So the gateway creates, for `cumulus.api.<user>.watch`, an ephemeral push consumer over
`jobs.<user>.<job>.>` only (and with `logs`, a second one over the job's output in the LOGS
stream), delivering into the caller's own private inbox, from the stream sequence it asks for.
A filter picks one subject under the caller's `jobs.`, `logs.` or `results.` (the stream is the
subject's). The consumers go away by themselves once nobody listens.

A client follows the jobs it submits through ONE such watch per stream (its feed,
cumulus/_jobs.py): a filter over all its user's jobs, `after_last` (from the message after the
stream's newest when the watch began). Per job then, no consumer and no round trip here.
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
    """Instead of one job: a subject under the user's `jobs.<user>.>`, `logs.<user>.>` or
    `results.<user>.>` (an observer's `cumulus.observe.watch`: any under `jobs.>`, `logs.>`,
    `results.>`)."""
    logs: bool = False
    """With `job_id`: the job's output lines too (stream LOGS), into `log_deliver`."""
    log_deliver: str = ""
    """With `logs`: the caller's inbox subject the output lines are pushed to ("": `deliver`).
    A subject of its own lets the caller tell the two consumers' heartbeats apart, and so
    notice one of them lost while the other still beats."""
    from_log_seq: int = 1
    """Where in the LOGS stream the output starts (the stream sequence after the last line
    the caller has)."""
    after_last: bool = False
    """With `filter`: start after the newest message of the filter's stream when the watch
    begins (`from_seq` ignored; the reply's `last_seq` is that newest message): only what is
    published from now on, e.g. the events of jobs the caller is about to submit."""


class WatchReply(msgspec.Struct, kw_only=True):
    last_seq: int
    """Stream sequence of the newest matching event when the watch began (0: none yet); with
    `after_last`, of the stream's newest message."""
    stream: str = subjects.JOBS_STREAM
    """The stream `last_seq` is of (the filter's)."""
    last_log_seq: int = 0
    """With `logs`: the LOGS sequence of the job's newest output when the watch began."""


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


def _own_inbox(user: str, deliver: str, observer: bool, field: str) -> None:
    if not inbox_allowed(user, deliver, observer):
        raise InvalidArgument(
            f"Watch delivery to {deliver!r} refused: use your own inbox", field=field
        )


def _filter(user: str, req: WatchRequest, observer: bool) -> str:
    """The subject a watch by filter follows, checked: the caller's own (any, for observers),
    under a prefix of a job stream."""
    subject = req.filter or "jobs.>"
    head = subject.split(".", 1)[0]
    if not subjects.stream_of(subject) or subject == head:
        raise InvalidArgument(
            "A watch filter must be under jobs.>, logs.> or results.>", field="filter"
        )
    if not observer and not subject.startswith(f"{head}.{user}."):
        raise InvalidArgument(
            f"A watch filter must be under {head}.{user}.> (your own jobs)", field="filter"
        )
    return subject


async def _last(js: JetStreamContext, stream: str, subject: str) -> int | None:
    """Stream sequence of the newest message on `subject`; None if there is none."""
    try:
        return (await js.get_last_msg(stream, subject)).seq or 0
    except nats.js.errors.NotFoundError:
        return None


async def _stream_last(js: JetStreamContext, stream: str) -> int:
    """Stream sequence of the stream's newest message (0: none): one cheap look, where the
    newest of a wildcard subject would walk every subject under it."""
    info = await js.stream_info(stream)
    return int(info.state.last_seq or 0)


async def _push(js: JetStreamContext, stream: str, subject: str, deliver: str, first: int) -> None:
    """An ephemeral push consumer over `subject` into `deliver`, from stream sequence `first`."""
    start = max(1, first)
    await js.add_consumer(
        stream,
        ConsumerConfig(
            name=f"watch-{_nuid.next().decode()}",
            filter_subject=subject,
            deliver_subject=deliver,
            deliver_policy=DeliverPolicy.ALL if start <= 1 else DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=None if start <= 1 else start,
            ack_policy=AckPolicy.NONE,
            idle_heartbeat=HEARTBEAT_S,
            flow_control=True,  # a large replay (a 300 MB result) waits for the reader
            inactive_threshold=INACTIVE_S,
            mem_storage=True,
            num_replicas=1,
        ),
    )


async def watch(
    js: JetStreamContext, user: str, req: WatchRequest, *, observer: bool = False
) -> WatchReply:
    _own_inbox(user, req.deliver, observer, "deliver")
    if req.log_deliver:
        _own_inbox(user, req.log_deliver, observer, "log_deliver")
    if observer or req.filter:
        subject = _filter(user, req, observer)
        stream = subjects.stream_of(subject)
        if req.after_last:
            newest = await _stream_last(js, stream)
            await _push(js, stream, subject, req.deliver, newest + 1)
            return WatchReply(last_seq=newest, stream=stream)
        last = await _last(js, stream, subject)
        await _push(js, stream, subject, req.deliver, req.from_seq)
        return WatchReply(last_seq=last or 0, stream=stream)
    if not subjects.valid_token(req.job_id):
        raise InvalidArgument(f"Invalid job id {req.job_id!r}", field="job_id")
    subject = subjects.job_all(req.job_id, user)
    last = await _last(js, subjects.JOBS_STREAM, subject)
    if last is None:
        raise NotFound(f"Job {req.job_id} not found")
    reply = WatchReply(last_seq=last)
    await _push(js, subjects.JOBS_STREAM, subject, req.deliver, req.from_seq)
    if req.logs:
        output = subjects.job_logs(req.job_id, user)
        reply.last_log_seq = await _last(js, subjects.LOGS_STREAM, output) or 0
        deliver = req.log_deliver or req.deliver
        await _push(js, subjects.LOGS_STREAM, output, deliver, req.from_log_seq)
    return reply
