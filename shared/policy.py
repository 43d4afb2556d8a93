"""Operator policy: the per-user limits of config `policy`, and what Cumulus owns in a job.

`policy_for(config, user)` is one user's `UserPolicy`: the section's values with that user's
overrides (`policy.users.<user>`) on top. `check_policy` validates the overrides when the
config is loaded, so a typo is a ConfigError naming `policy.users.<user>.<key>` at start-up,
never a surprise at the first submit. `env_refusal(name)` says why a variable belongs to
Cumulus (the partition's devices and limits, the runner's own settings, the interpreter's and
pip's start-up), so a job may not set it: the gateway refuses it and the runner drops it.
Pure: no I/O. docs/security.md explains each rule.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from cumulus_core.amounts import TENTHS_PER_GPU
from shared.errors import ConfigError
from shared.sizes import parse_size
from shared.subjects import valid_token

if TYPE_CHECKING:
    from shared.config import Config, PolicyConfig

MAX_PRIORITY_LIMIT = 1_000_000
"""The highest `max_priority` an operator may set (the config's own bound)."""
MAX_SHARE_LIMIT = 100_000
"""The highest `max_share` in GPUs (the config's own bound)."""


@dataclass(frozen=True)
class UserPolicy:
    """What one user may do; every field has the config's default."""

    network: bool = False
    """Jobs may ask for network access (`network=True`)."""
    max_priority: int = 100
    """|priority| a job may ask for."""
    max_share: int = 0
    """Tenths of GPUs the user's placed jobs may hold at once; 0: no limit."""
    max_queued: int = 1000
    """Jobs the user may have waiting (submitted or queued)."""
    stored_bytes: int = 4 << 30
    """Bytes of code the user may keep in the code store."""


KEYS = ("network", "max_priority", "max_share", "max_queued", "stored_bytes")
"""The keys a `policy.users.<user>` override may set."""


# -- converting one value ---------------------------------------------------------------------


def _network(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _integer(value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"must be a whole number from {low} to {high}")
    return value


def _max_priority(value: Any) -> int:
    return _integer(value, 0, MAX_PRIORITY_LIMIT)


def _max_queued(value: Any) -> int:
    return _integer(value, 1, 1 << 31)


def _max_share(value: Any) -> int:
    """GPUs (a number, steps of 0.1) -> tenths."""
    why = f"must be GPUs from 0 to {MAX_SHARE_LIMIT} in steps of 0.1 (0: no limit)"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(why)
    try:
        tenths = Decimal(str(value).strip()) * TENTHS_PER_GPU
    except InvalidOperation:
        raise ValueError(why) from None
    if not tenths.is_finite() or tenths != tenths.to_integral_value():
        raise ValueError(why)
    if not 0 <= tenths <= MAX_SHARE_LIMIT * TENTHS_PER_GPU:
        raise ValueError(why)
    return int(tenths)


def _stored_bytes(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        return parse_size(value)  # ValueError naming the text
    raise ValueError("must be a size such as 512MiB or 2GiB, or a number of bytes")


_CONVERT: dict[str, Callable[[Any], Any]] = {
    "network": _network,
    "max_priority": _max_priority,
    "max_share": _max_share,
    "max_queued": _max_queued,
    "stored_bytes": _stored_bytes,
}


def _convert(key: str, value: Any, where: str, origin: Callable[[str], str]) -> Any:
    try:
        return _CONVERT[key](value)
    except ValueError as exc:
        raise ConfigError(f"Invalid {where}: {value!r}{origin(where)}. {exc}", key=where) from None


# -- the whole section --------------------------------------------------------------------------


def _base(policy: PolicyConfig, origin: Callable[[str], str]) -> dict[str, Any]:
    return {key: _convert(key, getattr(policy, key), f"policy.{key}", origin) for key in KEYS}


def _overrides(user: str, given: Mapping[str, Any], origin: Callable[[str], str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in given.items():
        where = f"policy.users.{user}.{key}"
        if key not in _CONVERT:
            raise ConfigError(
                f"Unknown config key {where}{origin(where)}; a user's policy has {', '.join(KEYS)}",
                key=where,
                allowed=KEYS,
            )
        out[key] = _convert(key, value, where, origin)
    return out


def _no_origin(key: str) -> str:
    return ""


def check_policy(policy: PolicyConfig, origin: Callable[[str], str] = _no_origin) -> None:
    """Every value of the `policy` section and of each user's overrides is valid.

    `origin(key)` says where the user wrote a key (" (in config.yaml)"), for the message.
    Raises ConfigError naming the key (`policy.users.alice.max_share`).
    """
    _base(policy, origin)
    for user, given in policy.users.items():
        where = f"policy.users.{user}"
        if not valid_token(user):
            raise ConfigError(
                f"Invalid {where}{origin(where)}: a user name is letters, digits, '-' and '_'",
                key=where,
            )
        if not isinstance(given, Mapping):
            raise ConfigError(
                f"Invalid {where}{origin(where)}: must map policy keys ({', '.join(KEYS)}) "
                "to values",
                key=where,
            )
        _overrides(user, given, origin)


def policy_for(config: Config, user: str) -> UserPolicy:
    """`user`'s limits: the `policy` section with `policy.users.<user>` on top."""
    policy = config.policy
    values = _base(policy, _no_origin)
    given = policy.users.get(user)
    if isinstance(given, Mapping):
        values.update(_overrides(user, given, _no_origin))
    return UserPolicy(**values)


def share_limits(config: Config) -> tuple[int, dict[str, int]]:
    """(everyone's `max_share` in tenths, the users whose own differs): for the scheduler."""
    default = policy_for(config, "").max_share
    users = {user: policy_for(config, user).max_share for user in config.policy.users}
    return default, {user: tenths for user, tenths in users.items() if tenths != default}


# -- what Cumulus owns in a job's environment ------------------------------------------------

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
"""A portable environment variable name (POSIX: letters, digits, '_', not a digit first)."""

RESERVED_PREFIXES: dict[str, str] = {
    "CUDA_": "the partition's devices and MPS limits (CUDA_VISIBLE_DEVICES, CUDA_MPS_*)",
    "NVIDIA_": "the container runtime's device list (NVIDIA_VISIBLE_DEVICES)",
    "CHRONOS_": "the GPU partition's identity and limits",
    "CUMULUS_": "the runner's own settings for the job",
    "GPU_": "the AMD device selection (GPU_DEVICE_ORDINAL)",
    "ROCR_": "the AMD device selection (ROCR_VISIBLE_DEVICES)",
    "HIP_": "the AMD device selection (HIP_VISIBLE_DEVICES)",
    "ZE_": "the Intel device selection (ZE_AFFINITY_MASK)",
    "LD_": "the dynamic linker (LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT load code into "
    "every program the job starts, the runner's included)",
    "PIP_": "pip's settings while Cumulus installs the requirements (PIP_INDEX_URL, "
    "PIP_CONFIG_FILE)",
}
"""Name prefixes Cumulus owns, with why."""

RESERVED_NAMES: dict[str, str] = {
    "PATH": "where the runner finds the programs it starts",
    "HOME": "set by the runner (the job's private, writable home)",
    "BASH_ENV": "a script every non-interactive bash sources before it runs",
    "ENV": "a script every POSIX shell may source before it runs",
    **dict.fromkeys(
        (
            "GCONV_PATH",
            "GETCONF_DIR",
            "GLIBC_TUNABLES",
            "HOSTALIASES",
            "LOCALDOMAIN",
            "LOCPATH",
            "MALLOC_TRACE",
            "NIS_PATH",
            "NLSPATH",
            "RESOLV_HOST_CONF",
            "RES_OPTIONS",
            "TZDIR",
        ),
        "the C library loads code or files it names (glibc ignores it in privileged programs "
        "for that reason), in every program the job starts, the runner's included",
    ),
}
"""Whole names Cumulus owns, with why: the C library's list of variables unsafe for
privileged programs (glibc's UNSECURE_ENVVARS, less TMPDIR) and the shells' start-up files."""

PYTHON_ALLOWED = frozenset(
    {
        "PYTHONHASHSEED",
        "PYTHONIOENCODING",
        "PYTHONUTF8",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONFAULTHANDLER",
        "PYTHONDEVMODE",
        "PYTHONWARNDEFAULTENCODING",
    }
)
"""The `PYTHON*` variables a job may set: they change nothing but the job's own behaviour.
Every other one is refused: PYTHONPATH, PYTHONHOME, PYTHONSTARTUP, PYTHONINSPECT,
PYTHONUSERBASE, PYTHONSAFEPATH, PYTHONPLATLIBDIR, PYTHONEXECUTABLE and PYTHONWARNINGS (its
category is imported) choose or run code when the interpreter starts, before the in-job runner
has read its result nonce; PYTHONUNBUFFERED is the runner's (it frames the result)."""


def env_refusal(name: str) -> str:
    """Why a job may not set `name`, or "" if it may."""
    if not ENV_NAME.fullmatch(name):
        return "not a valid variable name (letters, digits and '_', not starting with a digit)"
    upper = name.upper()
    if upper in RESERVED_NAMES:
        return f"Cumulus owns it: {RESERVED_NAMES[upper]}"
    for prefix, why in RESERVED_PREFIXES.items():
        if upper.startswith(prefix):
            return f"Cumulus owns {prefix}* variables: {why}"
    if upper.startswith("PYTHON") and upper not in PYTHON_ALLOWED:
        return (
            "it changes how the Python interpreter starts (which code it loads or runs); "
            f"a job may set only {', '.join(sorted(PYTHON_ALLOWED))}"
        )
    return ""
