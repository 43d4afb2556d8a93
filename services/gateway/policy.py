"""The operator's policy applied to one submit: pure checks, each raising the typed error.

The gateway calls these before it publishes `submitted` (services/gateway/app.py):

    entrypoint    `function` or a script path, at most MAX_ENTRYPOINT characters
    env           what Cumulus owns is refused (shared.policy.env_refusal), sizes bounded
    requirements  PEP 508 specifiers only, in canonical form (job_image.requirements)
    priority      |priority| <= the user's max_priority
    network       only where the user's policy allows it
    image         a well-formed reference that policy.images allows (shared/images.py)
    waiting       at most max_queued jobs waiting per user
    share         a job larger than the user's max_share can never run: refused at once
    spec          the whole spec, encoded, within its budget (spec_limit): every event about
                  the job must fit on the bus

Each returns the value to put in the job's spec (or nothing) and raises InvalidArgument,
PermissionDenied or ResourceExhausted with a message naming the field or policy key at fault.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import msgspec

from cumulus_core.amounts import format_amount
from job_image.requirements import RequirementError, canonical_list
from shared.errors import InvalidArgument, PermissionDenied, ResourceExhausted, shown
from shared.events import JobSpec
from shared.policy import UserPolicy, env_refusal
from shared.views import JobInfo, JobStatus

MAX_ENV_NAMES = 256
"""Variables one job may set."""
MAX_ENV_VALUE = 32 * 1024
"""Bytes (UTF-8) of one variable's value."""
MAX_ENV_TOTAL = 256 * 1024
"""Bytes of every name and value together."""
MAX_REQUIREMENTS_BYTES = 64 * 1024
"""Bytes of the requirements list encoded as JSON: the runner hands it to the job in one
environment variable (CUMULUS_REQUIREMENTS), and Linux takes at most 128 KiB in one."""
MAX_JOB_ENV_BYTES = 1024 * 1024
"""Bytes of a job's environment, its env and the values of the secrets it names together:
Linux starts a process with at most 2 MiB of arguments and environment (ARG_MAX), and the
runner's own variables need some of it."""
MAX_ENTRYPOINT = 1024
"""Characters of the entrypoint (`function`, or the script's path inside its package)."""

MAX_SPEC_BYTES = 512 * 1024
"""Bytes of a job's spec encoded as JSON, as every event that carries it encodes it.

Each field's own bound allows less than this all at once (env 256 KiB, requirements 64 KiB,
100 secret names of 128 characters, the entrypoint: about 345 KiB in plain ASCII); the
budget refuses what JSON escaping inflates (a control character is 6 bytes, `\\u0001`)."""
EVENT_HEADROOM = 64 * 1024
"""What the largest event derived from a spec may add to it, headers included: WorkerSelected
and PartitionReady carry the spec plus the job, user and worker ids, the trace, up to 8
devices with their partition ids and environment (under 2 KiB in all; the rest is margin).
With the default 1 MiB max_payload a job's largest event stays under 576 KiB."""

_json = msgspec.json.Encoder()

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
            raise InvalidArgument(
                f"env variable {shown(repr(name))} is refused: {why}", field="env"
            )
        if not isinstance(value, str):
            raise InvalidArgument(f"env variable {name}: the value must be a string", field="env")
        if "\x00" in value:
            raise InvalidArgument(
                f"env variable {shown(name)}: the value contains a NUL byte, which no "
                "environment can hold",
                field="env",
            )
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > MAX_ENV_VALUE:
            raise InvalidArgument(
                f"env variable {shown(name)}: the value is {size} bytes; at most {MAX_ENV_VALUE} "
                "are accepted (ship large data in the code package)",
                field="env",
            )
        total += size + len(name)
    if total > MAX_ENV_TOTAL:
        raise InvalidArgument(
            f"env is {total} bytes in all; at most {MAX_ENV_TOTAL} are accepted", field="env"
        )
    return dict(env)


def check_entrypoint(entrypoint: str) -> str:
    """`function`, or a script's path: a name without control characters, bounded."""
    if not entrypoint:
        raise InvalidArgument(
            "Missing entrypoint: 'function' for a function call, else the script's path "
            "inside its package",
            field="entrypoint",
        )
    if len(entrypoint) > MAX_ENTRYPOINT:
        raise InvalidArgument(
            f"entrypoint is {len(entrypoint)} characters; at most {MAX_ENTRYPOINT} are accepted",
            field="entrypoint",
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in entrypoint):
        raise InvalidArgument(
            f"entrypoint {shown(repr(entrypoint))} contains control characters",
            field="entrypoint",
        )
    return entrypoint


def spec_size(spec: JobSpec) -> int:
    """Bytes of `spec` as the events that carry it encode it."""
    return len(_json.encode(spec))


def spec_limit(max_payload: int) -> int:
    """The largest spec accepted on a bus whose messages carry at most `max_payload` bytes:
    MAX_SPEC_BYTES, less on a bus configured below 1 MiB (room for EVENT_HEADROOM kept)."""
    return max(0, min(MAX_SPEC_BYTES, max_payload - EVENT_HEADROOM))


def check_spec(spec: JobSpec, max_payload: int) -> JobSpec:
    """`spec` if it is within its budget, so that every event about the job fits on the bus."""
    size, limit = spec_size(spec), spec_limit(max_payload)
    if size > limit:
        raise InvalidArgument(
            f"The job's spec is {size} bytes encoded; at most {limit} are accepted so that "
            f"every event about the job fits on the bus (max_payload {max_payload} bytes). "
            "Shorten env, requirements, secrets or entrypoint (a control character takes 6 "
            "bytes); ship large data in the code package",
            field="spec",
        )
    return spec


def check_requirements(lines: Sequence[str]) -> list[str]:
    """The requirements in canonical PEP 508 form; a pip option, a URL or a path is refused,
    and the list is at most MAX_REQUIREMENTS_BYTES."""
    try:
        canonical = canonical_list(list(lines))
    except RequirementError as exc:
        raise InvalidArgument(f"Invalid requirements: {exc}", field="requirements") from None
    size = len(_json.encode(canonical))
    if size > MAX_REQUIREMENTS_BYTES:
        raise InvalidArgument(
            f"requirements are {size} bytes in all; at most {MAX_REQUIREMENTS_BYTES} are "
            "accepted (list the packages you import; pip resolves their dependencies)",
            field="requirements",
        )
    return canonical


def check_job_env(env: Mapping[str, str], secrets: Mapping[str, int]) -> None:
    """The job's environment (its env, and its secrets: name -> bytes of the value) within
    MAX_JOB_ENV_BYTES, so that its process can start."""
    total = sum(len(k) + len(v.encode("utf-8", "surrogatepass")) for k, v in env.items())
    total += sum(len(name) + size for name, size in secrets.items())
    if total > MAX_JOB_ENV_BYTES:
        raise InvalidArgument(
            f"The job's environment (env and secrets) is {total} bytes; at most "
            f"{MAX_JOB_ENV_BYTES} are accepted (a process starts with at most 2 MiB of "
            "environment): name fewer or smaller secrets",
            field="secrets",
        )


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
            permanent=True,
        )
