"""The operator's policy applied to one submit: pure checks, each raising the typed error.

The gateway calls these before it publishes `submitted` (services/gateway/app.py):

    env           what Cumulus owns is refused (shared.policy.env_refusal), sizes bounded
    requirements  PEP 508 specifiers only, in canonical form (job_image.requirements)
    priority      |priority| <= the user's max_priority
    network       only where the user's policy allows it
    waiting       at most max_queued jobs waiting per user
    share         a job larger than the user's max_share can never run: refused at once

Each returns the value to put in the job's spec (or nothing) and raises InvalidArgument,
PermissionDenied or ResourceExhausted with a message naming the field or policy key at fault.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from cumulus_core.amounts import format_amount
from job_image.requirements import RequirementError, canonical_list
from shared.errors import InvalidArgument, PermissionDenied, ResourceExhausted
from shared.policy import UserPolicy, env_refusal
from shared.views import JobInfo, JobStatus

MAX_ENV_NAMES = 256
"""Variables one job may set."""
MAX_ENV_VALUE = 32 * 1024
"""Bytes (UTF-8) of one variable's value."""
MAX_ENV_TOTAL = 256 * 1024
"""Bytes of every name and value together."""

WAITING = (JobStatus.SUBMITTED, JobStatus.QUEUED)
"""The statuses that count against `max_queued`."""


def check_env(env: Mapping[str, str]) -> dict[str, str]:
    """The job's own variables, if none is Cumulus's and all are within bounds."""
    if len(env) > MAX_ENV_NAMES:
        raise InvalidArgument(
            f"env sets {len(env)} variables; at most {MAX_ENV_NAMES} are accepted", field="env"
        )
    total = 0
    for name, value in env.items():
        why = env_refusal(name)
        if why:
            raise InvalidArgument(f"env variable {name!r} is refused: {why}", field="env")
        if not isinstance(value, str):
            raise InvalidArgument(f"env variable {name}: the value must be a string", field="env")
        if "\x00" in value:
            raise InvalidArgument(
                f"env variable {name}: the value contains a NUL byte, which no environment "
                "can hold",
                field="env",
            )
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > MAX_ENV_VALUE:
            raise InvalidArgument(
                f"env variable {name}: the value is {size} bytes; at most {MAX_ENV_VALUE} "
                "are accepted (ship large data in the code package)",
                field="env",
            )
        total += size + len(name)
    if total > MAX_ENV_TOTAL:
        raise InvalidArgument(
            f"env is {total} bytes in all; at most {MAX_ENV_TOTAL} are accepted", field="env"
        )
    return dict(env)


def check_requirements(lines: Sequence[str]) -> list[str]:
    """The requirements in canonical PEP 508 form; a pip option, a URL or a path is refused."""
    try:
        return canonical_list(list(lines))
    except RequirementError as exc:
        raise InvalidArgument(f"Invalid requirements: {exc}", field="requirements") from None


def check_priority(priority: int, policy: UserPolicy, user: str) -> int:
    """`priority` if within ±max_priority."""
    limit = policy.max_priority
    if isinstance(priority, bool) or not isinstance(priority, int) or abs(priority) > limit:
        raise InvalidArgument(
            f"Invalid priority: {priority}. Must be from -{limit} to {limit} "
            f"(policy.max_priority for user {user})",
            field="priority",
        )
    return priority


def check_network(wanted: bool, policy: UserPolicy, user: str) -> bool:
    """`wanted`, if the user's policy allows network access when it is asked for."""
    if wanted and not policy.network:
        raise PermissionDenied(
            f"Network access is not allowed for user {user}: the operator's policy.network is "
            f"false (an operator may allow it with policy.users.{user}.network: true)"
        )
    return wanted


def waiting_jobs(jobs: Iterable[JobInfo], user: str) -> int:
    """How many of `user`'s jobs wait (submitted or queued), from the gateway's job table."""
    return sum(1 for job in jobs if job.user == user and job.status in WAITING)


def check_waiting(count: int, policy: UserPolicy, user: str) -> None:
    """One more job may wait if the user has fewer than max_queued waiting."""
    if count >= policy.max_queued:
        raise ResourceExhausted(
            f"User {user} already has {count} jobs waiting, the most policy.max_queued allows "
            f"({policy.max_queued}); wait for some to start or cancel them, then submit again"
        )


def check_share(tenths: int, policy: UserPolicy, user: str) -> None:
    """A job larger than the user's max_share could never be placed: refuse it now."""
    limit = policy.max_share
    if limit and tenths > limit:
        asked = format_amount(tenths)
        raise ResourceExhausted(
            f"Job asks for {asked} GPU but user {user}'s running jobs may hold at most "
            f"{format_amount(limit)} GPU (policy.max_share); ask for at most that",
            requested=asked,
        )
