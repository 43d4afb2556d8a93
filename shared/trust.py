"""Defence in depth: an event is believed only if it says of itself what its subject says.

NATS permissions (shared/auth.py) decide who may publish on which subject: only worker W on
`jobs.*.*.W.<run event>` and `workers.W.>`, only the gateway `submitted`, only the scheduler
placements. The subject is therefore the publisher's role and identity; the body is whatever the
publisher wrote. A consumer sets aside (dead-letters) an event whose body disagrees with its
subject (another job, user or worker, another event type), or an event a worker alone publishes
that arrived without a worker token.
"""

from __future__ import annotations

from typing import Any

from shared import auth, events, subjects

WORKER_ONLY = frozenset(auth.WORKER_JOB_EVENTS) - frozenset(auth.SCHEDULER_JOB_EVENTS)
"""Job events only the job's worker publishes: never without a worker token."""


def disagreement(subject: str, event: Any) -> str:
    """Why `event` may not be believed on `subject`; "" when subject and body agree."""
    tokens = subject.split(".")
    if isinstance(event, events.JobEvent):
        return _job(tokens, event)
    if isinstance(event, events.WorkerEvent):
        if len(tokens) != 3 or tokens[0] != "workers":
            return f"a worker event on {subject}"
        if tokens[2] != event.name:
            return f"a {event.name} event on a {tokens[2]} subject"
        if tokens[1] != event.worker_id:
            return f"worker {event.worker_id!r} in the body, {tokens[1]!r} in the subject"
    return ""


def _job(tokens: list[str], event: events.JobEvent) -> str:
    if len(tokens) != 5 or tokens[0] != "jobs":
        return "a job event outside jobs.<user>.<job>.<worker>.<event>"
    _, user, job_id, worker, name = tokens
    if name != event.name:
        return f"a {event.name} event on a {name} subject"
    if (user, job_id) != (event.user, event.job_id):
        return f"job {event.user}/{event.job_id} in the body, {user}/{job_id} in the subject"
    if worker != (event.worker_id or subjects.NO_WORKER):
        return f"worker {event.worker_id!r} in the body, {worker!r} in the subject"
    if name in WORKER_ONLY and worker == subjects.NO_WORKER:
        return f"a {name} event without its worker"
    return ""
