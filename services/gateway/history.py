"""A job the gateway no longer keeps in memory, answered from the job stream.

A job leaves the job table some time after it ended (retention.forget_after_s). Its events stay
in the JOBS stream (retention.jobs_max_age_s), so status, cancel and a repeated submit still
answer for it: `job_from_stream` reads the job's events back and folds them with the table's
own `apply`. It reads message by message (JetStream's "next message on this subject"), one
chain per event type the table acts on, all at once: the job's output (`log` events, any
number of them) is never read, so the time it takes is bounded by the job's few state events.
A job with no `submitted` event under the user's subjects does not exist for that user.
"""

from __future__ import annotations

import asyncio

import nats.js.errors
from nats.js import JetStreamContext

from services.gateway.state import JobTable, JobView, tracked_events
from shared import events as ev
from shared import subjects, trust
from shared.errors import MalformedEvent

FOLD_S = 3.0
"""Longest a fold of one job's events may take; past it the job reads as unavailable."""
MAX_PER_KIND = 1000
"""Events of one kind read per job at most (a job is placed a few times at most)."""


async def job_from_stream(js: JetStreamContext, job_id: str, user: str = "*") -> JobView | None:
    """The job's view folded from its events in the stream; None if there is no such job
    (of `user`, if given: another user's job is not found).

    Raises asyncio.TimeoutError if the stream does not answer within FOLD_S."""
    if not subjects.valid_token(job_id) or not (user == "*" or subjects.valid_token(user)):
        return None
    return await asyncio.wait_for(_fold(js, user, job_id), FOLD_S)


async def _fold(js: JetStreamContext, user: str, job_id: str) -> JobView | None:
    first = subjects.job(user, job_id, "", ev.JobSubmitted.name)
    try:
        submitted = await js.get_last_msg(subjects.JOBS_STREAM, first)
    except nats.js.errors.NotFoundError:
        return None
    subject = submitted.subject or first
    owner = subjects.parse_job_subject(subject)[0]  # the one user whose job it is
    start = (submitted.seq or 0) + 1
    kinds = [name for name in tracked_events() if name != ev.JobSubmitted.name]
    chains = await asyncio.gather(
        *(_chain(js, subjects.job(owner, job_id, "*", name), start) for name in kinds)
    )
    found = [(submitted.seq or 0, subject, submitted.data or b"")]
    found += [item for chain in chains for item in chain]
    table = JobTable()
    for _, on, data in sorted(found, key=lambda item: item[0]):
        try:
            event = ev.decode(data)
        except MalformedEvent:
            continue  # the consumers set it aside too
        if not trust.disagreement(on, event):
            table.apply(event)
    return table.get(job_id)


async def _chain(js: JetStreamContext, subject: str, start: int) -> list[tuple[int, str, bytes]]:
    """(sequence, subject, data) of every message on `subject` from sequence `start` on."""
    out: list[tuple[int, str, bytes]] = []
    seq = start
    while len(out) < MAX_PER_KIND:
        try:
            msg = await js.get_msg(subjects.JOBS_STREAM, seq=seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            break
        if not msg.seq:
            break
        out.append((msg.seq, msg.subject or subject, msg.data or b""))
        seq = msg.seq + 1
    return out
