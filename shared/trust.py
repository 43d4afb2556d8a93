"""Defence in depth: an event is believed only if it says of itself what its subject says.

NATS permissions (shared/auth.py) decide who may publish on which subject: only worker W on
`jobs.*.*.W.<run event>`, `logs.*.*.W`, `results.*.*.W.*` and `workers.W.>`, only the gateway
`submitted`, only the scheduler placements. The subject is therefore the publisher's role and
identity; the body is whatever the publisher wrote. A consumer sets aside (dead-letters) an
event whose body disagrees with its subject (another job, user or worker, another event type,
a user or job id that is no subject token), or an event a worker alone publishes that arrived
without a worker token. A scheduler's election marker is believed on its own subject only
(`jobs._._._.elected`, which only a scheduler may publish on), and nothing else there.
"""

from __future__ import annotations

from typing import Any

from shared import auth, events, subjects

WORKER_ONLY = frozenset(auth.WORKER_JOB_EVENTS) - frozenset(auth.SCHEDULER_JOB_EVENTS)
"""Job events only the job's worker publishes: never without a worker token."""


def disagreement(subject: str, event: Any) -> str:
    """Why `event` may not be believed on `subject`; "" when subject and body agree."""
    if isinstance(event, events.JobEvent):
        return _job(subject, event)
    if isinstance(event, events.SchedulerElected) != (subject == subjects.ELECTED):
        return f"a {type(event).__name__} on {subject}: a marker goes on {subjects.ELECTED} alone"
    tokens = subject.split(".")
    if isinstance(event, events.WorkerEvent):
        if len(tokens) != 3 or tokens[0] != "workers":
            return f"a worker event on {subject}"
        if tokens[2] != event.name:
            return f"a {event.name} event on a {tokens[2]} subject"
        if tokens[1] != event.worker_id:
            return f"worker {event.worker_id!r} in the body, {tokens[1]!r} in the subject"
    return ""


def _job(subject: str, event: events.JobEvent) -> str:
    try:
        user, job_id, worker, name = subjects.parse_job_subject(subject)
    except ValueError:
        return f"a {event.name} event outside {subjects.layout_of(event.name)}"
    if not (subjects.valid_token(event.user) and subjects.valid_token(event.job_id)):
        return f"user {event.user[:80]!r} or job {event.job_id[:80]!r} is not a subject token"
    if name != event.name:
        return f"a {event.name} event on a {name} subject"
    if (user, job_id) != (event.user, event.job_id):
        return f"job {event.user}/{event.job_id} in the body, {user}/{job_id} in the subject"
    if worker != event.worker_id:
        shown = worker or subjects.NO_WORKER
        return f"worker {event.worker_id!r} in the body, {shown!r} in the subject"
    if name in WORKER_ONLY and not worker:
        return f"a {name} event without its worker"
    if isinstance(event, events.JobResultPart):
        token = subject.rsplit(".", 1)[-1]
        if token != str(event.attempt):
            return f"attempt {event.attempt} in the body, {token!r} in the subject"
    if isinstance(event, events.JobOutputsPart):
        token = subject.rsplit(".", 1)[-1]
        if token != f"{event.attempt}-outputs":
            return f"outputs of attempt {event.attempt} in the body, {token!r} in the subject"
    return ""
