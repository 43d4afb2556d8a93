"""The labels on everything a container backend makes for a job, and the filters that find it.

Containers, Swarm services and environment volumes carry `cumulus.worker`; a job's also carry
`cumulus.job` and `cumulus.attempt`, so a restarted runner finds and removes what it left, and
`cumulus.owner`, the stack that made it (`claim.owner_id`): a runner finds and removes only its
own stack's, never another stack's with the same worker id on the same engine. Something a
runner made before owners existed has no owner label and counts as its worker's.
"""

from __future__ import annotations

LABEL_JOB = "cumulus.job"
LABEL_ATTEMPT = "cumulus.attempt"
LABEL_WORKER = "cumulus.worker"
LABEL_ENV = "cumulus.env"
LABEL_OWNER = "cumulus.owner"


def container_name(job_id: str, attempt: int) -> str:
    return f"cumulus-{job_id}-{attempt}"


def labels(worker_id: str, job_id: str, attempt: int, owner: str) -> dict[str, str]:
    return {
        LABEL_JOB: job_id,
        LABEL_ATTEMPT: str(attempt),
        LABEL_WORKER: worker_id,
        LABEL_OWNER: owner,
    }


def owned(found: dict[str, str] | None, owner: str) -> bool:
    """Is something with these labels this owner's (or made before owners existed)?"""
    return (found or {}).get(LABEL_OWNER, owner) == owner


def parse_labels(found: dict[str, str] | None) -> tuple[str, int] | None:
    """(job id, attempt) of something labelled as a job's; None otherwise."""
    found = found or {}
    attempt = found.get(LABEL_ATTEMPT, "")
    if LABEL_JOB in found and attempt.isdigit():
        return found[LABEL_JOB], int(attempt)
    return None


def label_filter(
    worker_id: str | None = None, job_id: str | None = None, attempt: int | None = None
) -> dict[str, list[str]]:
    """The engine's `filters` argument for what carries the given labels (all of them)."""
    wanted = []
    if worker_id is not None:
        wanted.append(f"{LABEL_WORKER}={worker_id}")
    if job_id is not None:
        wanted.append(f"{LABEL_JOB}={job_id}")
    if attempt is not None:
        wanted.append(f"{LABEL_ATTEMPT}={attempt}")
    return {"label": wanted}
